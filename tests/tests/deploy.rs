//! The deployment files in `deploy/` against the real binaries: every
//! Kubernetes manifest and systemd unit parses; every flag and `TIDEMARK_*`
//! variable they use is one the binary's `--help` lists; ports agree between
//! listen flags, container ports, probes, Services, the sidecars' collector
//! address and the KEDA ScaledObject; the scaling config loads; and the
//! sidecar's attach script finds an app's process.
//!
//! The checks collect problems instead of stopping at the first, and
//! `a_typo_fails_the_checks` feeds them broken copies to show that they fail.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_e2e::{bin, start_dev};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

// ----- what the binaries say about themselves -----

/// A binary's flags as its `--help` lists them: `--flag` → its env var
/// (if shown) and whether a default is shown.
#[derive(Debug, Default)]
struct Help {
    flags: BTreeMap<String, FlagHelp>,
}

#[derive(Debug, Default, Clone)]
struct FlagHelp {
    env: Option<String>,
    default: bool,
}

impl Help {
    /// `--help` of `binary` (`tidemark-sidecar`) or of a subcommand (`tidemark doctor`).
    fn of(program: &str) -> Help {
        let mut words = program.split_whitespace();
        let binary = words.next().unwrap();
        let output = Command::new(bin(binary))
            .args(words)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        assert!(output.status.success(), "{program} --help failed: {output:?}");
        Help::parse(&String::from_utf8(output.stdout).unwrap())
    }

    fn parse(text: &str) -> Help {
        let mut help = Help::default();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('-') && line.len() - trimmed.len() <= 6 {
                // `  -h, --help`, `      --listen <LISTEN>`
                current = trimmed
                    .split([' ', ','])
                    .find(|w| w.starts_with("--"))
                    .map(str::to_owned);
                if let Some(flag) = &current {
                    help.flags.entry(flag.clone()).or_default();
                }
            }
            let Some(flag) = &current else { continue };
            let entry = help.flags.get_mut(flag).unwrap();
            if let Some(rest) = line.split("[env: ").nth(1) {
                let name: String = rest.chars().take_while(|c| *c != '=' && *c != ']').collect();
                entry.env = Some(name);
            }
            if line.contains("[default: ") {
                entry.default = true;
            }
        }
        help
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.contains_key(flag)
    }

    /// The flag whose env twin is `env`.
    fn flag_of_env(&self, env: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(_, h)| h.env.as_deref() == Some(env))
            .map(|(f, _)| f.as_str())
    }
}

/// `--help` of every program a deployment file may run, looked up once.
struct Helps(BTreeMap<String, Help>);

impl Helps {
    fn load() -> Helps {
        let mut helps = BTreeMap::new();
        for program in ["tidemark-sidecar", "tidemark-collector", "tidemark-billing"] {
            helps.insert(program.to_owned(), Help::of(program));
        }
        let mut parents = vec!["tidemark".to_owned()];
        while let Some(parent) = parents.pop() {
            for sub in subcommands(&parent) {
                let program = format!("{parent} {sub}");
                let help = Help::of(&program);
                if help.flags.keys().all(|f| f == "--help" || f == "--version") && !subcommands(&program).is_empty() {
                    parents.push(program); // a group of subcommands, e.g. `tidemark invoice`
                } else {
                    helps.insert(program, help);
                }
            }
        }
        Helps(helps)
    }

    fn get(&self, program: &str) -> Option<&Help> {
        self.0.get(program)
    }
}

/// The subcommands `program --help` lists (`tidemark`, `tidemark invoice`).
fn subcommands(program: &str) -> Vec<String> {
    let mut words = program.split_whitespace();
    let output = Command::new(bin(words.next().unwrap()))
        .args(words)
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

// ----- settings, as flags and env vars -----

/// One program's settings, from its arguments and its environment.
#[derive(Debug, Default, Clone)]
struct Settings {
    /// `tidemark-sidecar` or `tidemark <subcommand>`.
    program: String,
    /// `--flag` → value (`None` for a switch or a value from elsewhere).
    values: BTreeMap<String, Option<String>>,
}

impl Settings {
    fn get(&self, flag: &str) -> Option<&str> {
        self.values.get(flag).and_then(|v| v.as_deref())
    }
}

/// Checks `args` and `env` against the program's help; problems go to `problems`
/// prefixed with `at`. Env values `None` come from a Secret or a field.
fn settings(
    helps: &Helps,
    at: &str,
    program: &str,
    args: &[String],
    env: &[(String, Option<String>)],
    problems: &mut Vec<String>,
) -> Settings {
    let mut settings = Settings {
        program: program.to_owned(),
        ..Settings::default()
    };
    let Some(help) = helps.get(program) else {
        problems.push(format!("{at}: runs {program:?}, which is no Tidemark program"));
        return settings;
    };
    for arg in args {
        if !arg.starts_with("--") {
            problems.push(format!("{at}: argument {arg:?} is not a --flag=value"));
            continue;
        }
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        if !help.has_flag(flag) {
            problems.push(format!("{at}: {program} has no flag {flag} (see {program} --help)"));
        }
        settings.values.insert(flag.to_owned(), value);
    }
    for (name, value) in env {
        if !name.starts_with("TIDEMARK_") {
            continue;
        }
        match help.flag_of_env(name) {
            Some(flag) => {
                if settings.values.contains_key(flag) {
                    problems.push(format!("{at}: {name} and {flag} both set"));
                }
                settings.values.insert(flag.to_owned(), value.clone());
            }
            None => problems.push(format!(
                "{at}: {program} reads no variable {name} (see {program} --help)"
            )),
        }
    }
    settings
}

/// `host:port` → (host, port); a URL's scheme and path are dropped.
fn host_port(text: &str) -> Option<(String, u16)> {
    let rest = text.split_once("://").map_or(text, |(_, r)| r);
    let rest = rest.split('/').next()?;
    let (host, port) = rest.rsplit_once(':')?;
    Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
}

fn is_wildcard(host: &str) -> bool {
    matches!(host, "0.0.0.0" | "::" | "")
}

// ----- Kubernetes -----

fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Every YAML document of every `*.yaml` file in `dir`, with its file name.
fn load_yaml(dir: &Path) -> Vec<(String, Yaml)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let parsed = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: not valid YAML: {e}"));
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()).map(|d| (name.clone(), d)));
    }
    docs
}

fn s(yaml: &Yaml) -> Option<String> {
    match yaml {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        _ => None,
    }
}

fn list(yaml: &Yaml) -> &[Yaml] {
    yaml.as_vec().map_or(&[], Vec::as_slice)
}

fn strings(yaml: &Yaml) -> Vec<String> {
    list(yaml).iter().filter_map(s).collect()
}

fn labels(yaml: &Yaml) -> BTreeMap<String, String> {
    yaml.as_hash()
        .map(|h| h.iter().filter_map(|(k, v)| Some((s(k)?, s(v)?))).collect())
        .unwrap_or_default()
}

/// The generated ConfigMaps of kustomization.yaml: name → keys.
fn generated_config_maps(kustomization: &Yaml, problems: &mut Vec<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut maps = BTreeMap::new();
    for generator in list(&kustomization["configMapGenerator"]) {
        let name = s(&generator["name"]).unwrap();
        let mut keys = BTreeSet::new();
        for literal in strings(&generator["literals"]) {
            keys.insert(literal.split_once('=').unwrap().0.to_owned());
        }
        for file in strings(&generator["files"]) {
            if !kube_dir().join(&file).is_file() {
                problems.push(format!("kustomization.yaml: configMapGenerator {name}: no file {file}"));
            }
            keys.insert(file.rsplit('/').next().unwrap().to_owned());
        }
        maps.insert(name, keys);
    }
    maps
}

/// The documents of one kind.
fn of_kind<'a>(docs: &'a [(String, Yaml)], kind: &'a str) -> impl Iterator<Item = &'a (String, Yaml)> {
    docs.iter().filter(move |(_, d)| d["kind"].as_str() == Some(kind))
}

/// A container that runs a Tidemark program, with its pod.
#[derive(Debug, Clone)]
struct Container {
    /// `file: Deployment/name container`
    at: String,
    /// The Deployment's or Job's name.
    owner: String,
    pod_labels: BTreeMap<String, String>,
    settings: Settings,
    /// Port name → number.
    ports: BTreeMap<String, u16>,
}

/// Which Tidemark program a container runs, and its arguments.
fn program_of(container: &Yaml) -> Option<(String, Vec<String>)> {
    let command = strings(&container["command"]);
    let mut args = strings(&container["args"]);
    let first = command.first()?;
    let base = first.rsplit('/').next().unwrap();
    if base == "tidemark" {
        let mut rest: Vec<String> = command[1..].to_vec();
        rest.append(&mut args);
        let sub = rest.remove(0);
        return Some((format!("tidemark {sub}"), rest));
    }
    if base.starts_with("tidemark-") {
        return Some((base.to_owned(), args));
    }
    // ["/bin/sh", ".../tidemark-attach.sh"]: the script execs tidemark-sidecar
    // with these arguments (checked in attach_script_finds_the_app_and_starts_the_sidecar).
    if command.iter().any(|c| c.ends_with("/tidemark-attach.sh")) {
        return Some(("tidemark-sidecar".to_owned(), args));
    }
    None
}

/// Every absolute path a flag names lies on a volume the container mounts:
/// a file a ConfigMap or Secret has, or anywhere in an emptyDir.
fn check_paths(
    at: &str,
    settings: &Settings,
    container: &Yaml,
    volumes: &BTreeMap<String, &Yaml>,
    config_maps: &BTreeMap<String, BTreeSet<String>>,
    p: &mut Vec<String>,
) {
    for (flag, value) in &settings.values {
        let Some(path) = value.as_deref().filter(|v| v.starts_with('/')) else {
            continue;
        };
        let mount = list(&container["volumeMounts"]).iter().find_map(|m| {
            let dir = s(&m["mountPath"])?;
            let rest = path.strip_prefix(dir.as_str())?;
            (rest.is_empty() || rest.starts_with('/'))
                .then(|| (s(&m["name"]).unwrap(), rest.trim_start_matches('/').to_owned()))
        });
        let Some((volume_name, rest)) = mount else {
            p.push(format!("{at}: {flag}={path} is on no volume the container mounts"));
            continue;
        };
        let Some(volume) = volumes.get(&volume_name) else {
            p.push(format!(
                "{at}: mounts volume {volume_name}, which the pod does not have"
            ));
            continue;
        };
        let files: Option<BTreeSet<String>> = if let Some(map) = s(&volume["configMap"]["name"]) {
            config_maps.get(&map).cloned()
        } else if !volume["secret"].is_badvalue() {
            Some(
                list(&volume["secret"]["items"])
                    .iter()
                    .filter_map(|i| s(&i["path"]))
                    .collect(),
            )
        } else {
            None // emptyDir: anything goes
        };
        if let Some(files) = files
            && !rest.is_empty()
            && !files.contains(&rest)
        {
            p.push(format!(
                "{at}: {flag}={path}: volume {volume_name} has no file {rest} (it has {files:?})"
            ));
        }
    }
}

/// Everything the Kubernetes manifests say, checked; the problems found.
fn check_kubernetes(helps: &Helps, docs: &[(String, Yaml)]) -> Vec<String> {
    let mut problems = Vec::new();
    let p = &mut problems;

    // Kinds: exactly the expected set, each with its apiVersion.
    let kinds: BTreeSet<(String, String)> = docs
        .iter()
        .map(|(_, d)| {
            (
                s(&d["apiVersion"]).unwrap_or_default(),
                s(&d["kind"]).unwrap_or_default(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
        ("v1", "Namespace"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "Secret"),
        ("batch/v1", "Job"),
        ("keda.sh/v1alpha1", "ScaledObject"),
    ]
    .iter()
    .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
    .collect();
    if kinds != expected {
        p.push(format!("kinds: expected {expected:?}, found {kinds:?}"));
    }

    // kustomization.yaml: every manifest but the examples and the on-demand Job is a resource.
    let kustomization = &of_kind(docs, "Kustomization").next().unwrap().1;
    let namespace = s(&kustomization["namespace"]).unwrap();
    let resources: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let files: BTreeSet<String> = docs.iter().map(|(f, _)| f.clone()).collect();
    for file in &files {
        let listed = resources.contains(file);
        let on_demand = file.ends_with(".example.yaml") || file == "doctor-job.yaml" || file == "kustomization.yaml";
        if listed == on_demand {
            p.push(format!(
                "kustomization.yaml: {file} {}",
                if listed {
                    "must not be a resource"
                } else {
                    "is not a resource"
                }
            ));
        }
    }
    for resource in &resources {
        if !files.contains(resource) {
            p.push(format!("kustomization.yaml: resource {resource} does not exist"));
        }
    }
    let config_maps = generated_config_maps(kustomization, p);
    let secrets: BTreeMap<String, BTreeSet<String>> = of_kind(docs, "Secret")
        .map(|(_, d)| {
            let keys = d["stringData"].as_hash().unwrap().keys().filter_map(s).collect();
            (s(&d["metadata"]["name"]).unwrap(), keys)
        })
        .collect();

    // Containers of Deployments and Jobs.
    let mut containers = Vec::new();
    for (file, doc) in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind != "Deployment" && kind != "Job" {
            continue;
        }
        let owner = s(&doc["metadata"]["name"]).unwrap();
        let template = &doc["spec"]["template"];
        let pod_labels = labels(&template["metadata"]["labels"]);
        if kind == "Deployment" {
            let selector = labels(&doc["spec"]["selector"]["matchLabels"]);
            if selector.is_empty() || !selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)) {
                p.push(format!(
                    "{file}: Deployment/{owner}: selector {selector:?} does not match the pod's labels"
                ));
            }
        }
        let pod = &template["spec"];
        let volumes: BTreeMap<String, &Yaml> = list(&pod["volumes"])
            .iter()
            .map(|v| (s(&v["name"]).unwrap(), v))
            .collect();
        for volume in volumes.values() {
            if let Some(name) = s(&volume["configMap"]["name"])
                && !config_maps.contains_key(&name)
            {
                p.push(format!(
                    "{file}: {kind}/{owner}: volume uses ConfigMap {name}, which kustomization.yaml does not generate"
                ));
            }
            if let Some(name) = s(&volume["secret"]["secretName"]) {
                match secrets.get(&name) {
                    None => p.push(format!(
                        "{file}: {kind}/{owner}: volume uses Secret {name}, which no example shows"
                    )),
                    Some(keys) => {
                        for item in list(&volume["secret"]["items"]) {
                            let key = s(&item["key"]).unwrap();
                            if !keys.contains(&key) {
                                p.push(format!("{file}: {kind}/{owner}: Secret {name} has no key {key}"));
                            }
                        }
                    }
                }
            }
        }
        let programs = list(&pod["containers"]).len();
        for container in list(&pod["containers"]) {
            let name = s(&container["name"]).unwrap();
            let at = format!("{file}: {kind}/{owner} container {name}");
            let Some((program, args)) = program_of(container) else {
                p.push(format!("{at}: runs no Tidemark program this test knows"));
                continue;
            };
            let mut env = Vec::new();
            for var in list(&container["env"]) {
                let var_name = s(&var["name"]).unwrap();
                let from = &var["valueFrom"];
                if let Some(map) = s(&from["configMapKeyRef"]["name"]) {
                    let key = s(&from["configMapKeyRef"]["key"]).unwrap();
                    if !config_maps.get(&map).is_some_and(|keys| keys.contains(&key)) {
                        p.push(format!("{at}: {var_name} comes from ConfigMap {map} key {key}, which kustomization.yaml does not generate"));
                    }
                }
                if let Some(secret) = s(&from["secretKeyRef"]["name"]) {
                    let key = s(&from["secretKeyRef"]["key"]).unwrap();
                    if !secrets.get(&secret).is_some_and(|keys| keys.contains(&key)) {
                        p.push(format!(
                            "{at}: {var_name} comes from Secret {secret} key {key}, which no example has"
                        ));
                    }
                }
                env.push((var_name, s(&var["value"])));
            }
            let settings = settings(helps, &at, &program, &args, &env, p);
            check_paths(&at, &settings, container, &volumes, &config_maps, p);
            let ports: BTreeMap<String, u16> = list(&container["ports"])
                .iter()
                .map(|port| {
                    let number = port["containerPort"].as_i64().unwrap();
                    (s(&port["name"]).unwrap_or_default(), u16::try_from(number).unwrap())
                })
                .collect();
            // Listen flags on all interfaces are container ports, and the other way round.
            let mut public = BTreeSet::new();
            for (flag, value) in &settings.values {
                let Some((host, port)) = value
                    .as_deref()
                    .filter(|_| flag.ends_with("listen"))
                    .and_then(host_port)
                else {
                    continue;
                };
                if is_wildcard(&host) {
                    public.insert(port);
                    if !ports.values().any(|p| *p == port) {
                        p.push(format!(
                            "{at}: {flag} listens on port {port}, which is no containerPort"
                        ));
                    }
                } else if programs == 1 {
                    p.push(format!(
                        "{at}: {flag}={host}:{port} is unreachable from outside the pod"
                    ));
                }
            }
            for (port_name, port) in &ports {
                if !public.contains(port) {
                    p.push(format!(
                        "{at}: containerPort {port_name} {port} is no --*listen=0.0.0.0:{port} of {program}"
                    ));
                }
            }
            // Probes name a container port.
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let port = &container[probe]["httpGet"]["port"];
                if port.is_badvalue() {
                    continue;
                }
                let known = match port {
                    Yaml::String(n) => ports.contains_key(n),
                    Yaml::Integer(n) => ports.values().any(|p| i64::from(*p) == *n),
                    _ => false,
                };
                if !known {
                    p.push(format!("{at}: {probe} port {port:?} is no containerPort"));
                }
            }
            containers.push(Container {
                at,
                owner: owner.clone(),
                pod_labels: pod_labels.clone(),
                settings,
                ports,
            });
        }
    }

    // A sidecar's upstream is a listen address of another container of its pod.
    for sidecar in containers.iter().filter(|c| c.settings.program == "tidemark-sidecar") {
        let Some((host, port)) = sidecar.settings.get("--upstream").and_then(host_port) else {
            p.push(format!("{}: no --upstream", sidecar.at));
            continue;
        };
        let app = containers.iter().find(|c| {
            c.owner == sidecar.owner
                && c.at != sidecar.at
                && c.settings.values.iter().any(|(f, v)| {
                    f.ends_with("listen") && v.as_deref().and_then(host_port).is_some_and(|(_, p)| p == port)
                })
        });
        if app.is_none() || !matches!(host.as_str(), "127.0.0.1" | "localhost") {
            p.push(format!(
                "{}: --upstream {host}:{port} is no loopback listen address of another container in the pod",
                sidecar.at
            ));
        }
    }

    // Services: selectors match a pod, target ports are container ports.
    let services: Vec<(&String, &Yaml)> = of_kind(docs, "Service").map(|(f, d)| (f, d)).collect();
    for (file, service) in &services {
        let name = s(&service["metadata"]["name"]).unwrap();
        let selector = labels(&service["spec"]["selector"]);
        let pods: Vec<&Container> = containers
            .iter()
            .filter(|c| !selector.is_empty() && selector.iter().all(|(k, v)| c.pod_labels.get(k) == Some(v)))
            .collect();
        if pods.is_empty() {
            p.push(format!("{file}: Service/{name}: selector {selector:?} matches no pod"));
        }
        for port in list(&service["spec"]["ports"]) {
            let target = s(&port["targetPort"]).or_else(|| s(&port["port"])).unwrap();
            if !pods
                .iter()
                .any(|c| c.ports.contains_key(&target) || c.ports.values().any(|p| p.to_string() == target))
            {
                p.push(format!(
                    "{file}: Service/{name}: targetPort {target} is no port of its pods"
                ));
            }
        }
    }

    // `host:port` of a Service in the cluster → the program and flag that serve it.
    let resolve = |address: &str| -> Result<(String, String), String> {
        let (host, port) = host_port(address).ok_or(format!("{address:?} is not host:port"))?;
        let mut parts = host.split('.');
        let service_name = parts.next().unwrap();
        let service_namespace = parts.next();
        if service_namespace != Some(namespace.as_str()) {
            return Err(format!(
                "{address}: name the Service with its namespace ({service_name}.{namespace}...), it is called from other namespaces"
            ));
        }
        let (_, service) = services
            .iter()
            .find(|(_, d)| s(&d["metadata"]["name"]).as_deref() == Some(service_name))
            .ok_or(format!("{address}: no Service {service_name}"))?;
        let service_port = list(&service["spec"]["ports"])
            .iter()
            .find(|sp| sp["port"].as_i64() == Some(i64::from(port)))
            .ok_or(format!("{address}: Service {service_name} has no port {port}"))?;
        let target = s(&service_port["targetPort"]).unwrap();
        let selector = labels(&service["spec"]["selector"]);
        for c in &containers {
            if !selector.iter().all(|(k, v)| c.pod_labels.get(k) == Some(v)) {
                continue;
            }
            let Some(number) = c.ports.get(&target).copied().or_else(|| target.parse().ok()) else {
                continue;
            };
            for (flag, value) in &c.settings.values {
                if flag.ends_with("listen") && value.as_deref().and_then(host_port).is_some_and(|(_, p)| p == number) {
                    return Ok((c.settings.program.clone(), flag.clone()));
                }
            }
        }
        Err(format!(
            "{address}: nothing listens behind Service {service_name} port {port}"
        ))
    };
    let collector_listen = ("tidemark-collector".to_owned(), "--listen".to_owned());
    for c in &containers {
        if let Some(address) = c.settings.get("--collector") {
            match resolve(address) {
                Ok(found) if found == collector_listen => {}
                Ok(found) => p.push(format!(
                    "{}: --collector {address} reaches {found:?}, not the collector's --listen",
                    c.at
                )),
                Err(e) => p.push(format!("{}: --collector {e}", c.at)),
            }
        }
    }

    // The ScaledObject: the collector's KEDA scaler, for a service a sidecar reports under.
    let policies: toml::Table = std::fs::read_to_string(kube_dir().join("scaling.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for (file, scaled) in of_kind(docs, "ScaledObject") {
        let name = s(&scaled["metadata"]["name"]).unwrap();
        let at = format!("{file}: ScaledObject/{name}");
        let target = s(&scaled["spec"]["scaleTargetRef"]["name"]).unwrap();
        let sidecar = containers
            .iter()
            .find(|c| c.owner == target && c.settings.program == "tidemark-sidecar");
        for trigger in list(&scaled["spec"]["triggers"]) {
            let kind = s(&trigger["type"]).unwrap();
            if kind != "external" && kind != "external-push" {
                p.push(format!("{at}: trigger type {kind}, not external or external-push"));
            }
            if !trigger["metricType"].is_badvalue() {
                p.push(format!("{at}: leave metricType unset (AverageValue; docs/keda.md)"));
            }
            let address = s(&trigger["metadata"]["scalerAddress"]).unwrap_or_default();
            match resolve(&address) {
                Ok(found) if found == collector_listen => {}
                Ok(found) => p.push(format!(
                    "{at}: scalerAddress {address} reaches {found:?}, not the collector's --listen"
                )),
                Err(e) => p.push(format!("{at}: scalerAddress {e}")),
            }
            let service = s(&trigger["metadata"]["service"]).unwrap_or_default();
            match sidecar.and_then(|c| c.settings.get("--service")) {
                Some(reported) if reported == service => {}
                other => p.push(format!(
                    "{at}: scales Deployment/{target} for service {service:?}, but its sidecar reports as {other:?}"
                )),
            }
            let policy_key = |table: Option<&toml::Value>| table.and_then(|t| t.get("max_replicas")).cloned();
            let service_policy = policies.get("services").and_then(|t| t.get(&service));
            let max = policy_key(service_policy).or_else(|| policy_key(policies.get("defaults")));
            let max = max.as_ref().and_then(toml::Value::as_integer).unwrap_or(100);
            if scaled["spec"]["maxReplicaCount"].as_i64().unwrap_or(100) < max {
                p.push(format!(
                    "{at}: maxReplicaCount is below the policy's max_replicas {max}"
                ));
            }
        }
    }
    // Billing's plans: the generated ConfigMap holds every plan file, they load,
    // and the default plan is one of them.
    let plan_files: BTreeSet<String> = std::fs::read_dir(kube_dir().join("plans"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    if config_maps.get("billing-plans") != Some(&plan_files) {
        p.push(format!(
            "kustomization.yaml: billing-plans holds {:?}, plans/ has {plan_files:?}",
            config_maps.get("billing-plans")
        ));
    }
    match tidemark_billing::pricing::load_dir(&kube_dir().join("plans")) {
        Ok(plans) => {
            for c in &containers {
                if let Some(default) = c.settings.get("--default-plan")
                    && !plans.iter().any(|plan| plan.name == default)
                {
                    p.push(format!("{}: --default-plan {default} is no plan in plans/", c.at));
                }
            }
        }
        Err(e) => p.push(format!("plans/: {e}")),
    }
    problems
}

fn kubernetes_docs() -> Vec<(String, Yaml)> {
    load_yaml(&kube_dir())
}

#[test]
fn kubernetes_manifests_use_real_flags_and_agree_on_ports() {
    let helps = Helps::load();
    let docs = kubernetes_docs();
    let problems = check_kubernetes(&helps, &docs);
    assert!(problems.is_empty(), "deploy/kubernetes:\n  {}", problems.join("\n  "));
    // What the checks saw, so that an empty manifest set cannot pass.
    let deployments: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("Deployment"))
        .filter_map(|(_, d)| s(&d["metadata"]["name"]))
        .collect();
    assert_eq!(deployments, ["billing", "collector", "shop"].map(String::from).into());
}

// ----- systemd -----

fn systemd_dir() -> PathBuf {
    repo().join("deploy/systemd")
}

/// A unit file: (section, key, value) in order.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
        entries.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
    }
    entries
}

/// An environment file: KEY=VALUE lines.
fn parse_env_file(text: &str) -> Vec<(String, Option<String>)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_owned(), Some(v.to_owned()))
        })
        .collect()
}

/// The example instance a template unit is checked as.
const INSTANCE: &str = "shop";

/// Every unit in `units` (file name → text) with `env_files` (file name →
/// text) checked; the problems found, and each unit's settings.
fn check_systemd(
    helps: &Helps,
    units: &BTreeMap<String, String>,
    env_files: &BTreeMap<String, String>,
) -> (Vec<String>, BTreeMap<String, Settings>) {
    let mut problems = Vec::new();
    let mut all = BTreeMap::new();
    let mut used_env_files = BTreeSet::new();
    for (file, text) in units {
        let entries = parse_unit(text);
        let instance = if file.ends_with("@.service") { INSTANCE } else { "" };
        let expand = |v: &str| v.replace("%i", instance);
        let sections: BTreeSet<&str> = entries.iter().map(|(s, _, _)| s.as_str()).collect();
        if sections != BTreeSet::from(["Unit", "Service", "Install"]) {
            problems.push(format!(
                "{file}: sections {sections:?}, expected Unit, Service and Install"
            ));
        }
        let exec: Vec<&String> = entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == "ExecStart")
            .map(|(_, _, v)| v)
            .collect();
        let [exec] = exec.as_slice() else {
            problems.push(format!("{file}: expected one ExecStart, found {}", exec.len()));
            continue;
        };
        let mut words: Vec<String> = exec.split_whitespace().map(expand).collect();
        let binary = words.remove(0);
        if !binary.starts_with('/') {
            problems.push(format!("{file}: ExecStart {binary} is not an absolute path"));
        }
        let base = binary.rsplit('/').next().unwrap().to_owned();
        let program = if base == "tidemark" {
            format!("tidemark {}", words.remove(0))
        } else {
            base
        };
        let mut env = Vec::new();
        for (section, key, value) in &entries {
            if section != "Service" {
                continue;
            }
            match key.as_str() {
                "Environment" => {
                    let (k, v) = value.split_once('=').unwrap();
                    env.push((k.to_owned(), Some(expand(v))));
                }
                "EnvironmentFile" => {
                    let name = expand(value.trim_start_matches('-'));
                    let name = name.rsplit('/').next().unwrap().to_owned();
                    match env_files.get(&name) {
                        Some(text) => {
                            used_env_files.insert(name.clone());
                            // Commented-out settings must be real ones too.
                            for line in text.lines().filter_map(|l| l.strip_prefix('#')) {
                                let Some((key, _)) = line.trim().split_once('=') else {
                                    continue;
                                };
                                if key.starts_with("TIDEMARK_")
                                    && !key.contains(' ')
                                    && helps.get(&program).is_some_and(|h| h.flag_of_env(key).is_none())
                                {
                                    problems.push(format!("deploy/systemd/{name}: {program} reads no variable {key}"));
                                }
                            }
                            // The file's settings override the unit's.
                            for (k, v) in parse_env_file(text) {
                                env.retain(|(e, _)| *e != k);
                                env.push((k, v));
                            }
                        }
                        None => problems.push(format!(
                            "{file}: EnvironmentFile {value}: no example {name} in deploy/systemd"
                        )),
                    }
                }
                _ => {}
            }
        }
        let at = format!("deploy/systemd/{file}");
        let settings = settings(helps, &at, &program, &words, &env, &mut problems);
        all.insert(file.clone(), settings);
    }
    for name in env_files.keys() {
        if !used_env_files.contains(name) {
            problems.push(format!("deploy/systemd/{name}: no unit reads it"));
        }
    }
    // The sidecar template and its example app agree.
    let sidecar = all.get("tidemark-sidecar@.service");
    let app = all.get(&format!("{INSTANCE}.service"));
    match (sidecar, app) {
        (Some(sidecar), Some(app)) => {
            let upstream = sidecar.get("--upstream").and_then(host_port).map(|(_, p)| p);
            let listen = app.get("--listen").and_then(host_port).map(|(_, p)| p);
            if upstream.is_none() || upstream != listen {
                problems.push(format!(
                    "tidemark-sidecar@.service as @{INSTANCE}: --upstream port {upstream:?} is not {INSTANCE}.service's --listen port {listen:?}"
                ));
            }
            let cgroup = sidecar.get("--app-cgroup").unwrap_or_default();
            if cgroup != format!("/sys/fs/cgroup/system.slice/{INSTANCE}.service") {
                problems.push(format!(
                    "tidemark-sidecar@.service as @{INSTANCE}: --app-cgroup {cgroup:?} is not {INSTANCE}.service's cgroup"
                ));
            }
            if sidecar.get("--service") != Some(INSTANCE) {
                problems.push("tidemark-sidecar@.service: --service is not the instance name %i".to_owned());
            }
        }
        _ => problems.push(format!(
            "deploy/systemd: expected tidemark-sidecar@.service and {INSTANCE}.service"
        )),
    }
    (problems, all)
}

fn systemd_files() -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut units = BTreeMap::new();
    let mut env_files = BTreeMap::new();
    for entry in std::fs::read_dir(systemd_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        if name.ends_with(".service") {
            units.insert(name, text);
        } else if name.ends_with(".env") {
            env_files.insert(name, text);
        }
    }
    (units, env_files)
}

#[test]
fn systemd_units_use_real_flags() {
    let helps = Helps::load();
    let (units, env_files) = systemd_files();
    let (problems, settings) = check_systemd(&helps, &units, &env_files);
    assert!(problems.is_empty(), "deploy/systemd:\n  {}", problems.join("\n  "));
    let programs: BTreeSet<&str> = settings.values().map(|s| s.program.as_str()).collect();
    assert_eq!(
        programs,
        BTreeSet::from([
            "tidemark demo-app",
            "tidemark-billing",
            "tidemark-collector",
            "tidemark-sidecar"
        ])
    );
}

// ----- the checks can fail -----

#[test]
fn a_typo_fails_the_checks() {
    let helps = Helps::load();
    let broken = |from: &str, to: &str| -> Vec<String> {
        let docs: Vec<(String, Yaml)> = kubernetes_docs()
            .into_iter()
            .map(|(file, doc)| {
                let mut text = String::new();
                yaml_rust2::YamlEmitter::new(&mut text).dump(&doc).unwrap();
                let text = text.replace(from, to);
                let doc = YamlLoader::load_from_str(&text).unwrap().remove(0);
                (file, doc)
            })
            .collect();
        check_kubernetes(&helps, &docs)
    };
    let must_find = |problems: Vec<String>, needle: &str| {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "expected a problem naming {needle:?}, got {problems:#?}"
        );
    };
    must_find(
        broken("--admin-listen=0.0.0.0:7401", "--admin-lisen=0.0.0.0:7401"),
        "no flag --admin-lisen",
    );
    must_find(broken("--listen=0.0.0.0:8080", "--listen=0.0.0.0:8081"), "port 8081");
    must_find(
        broken("TIDEMARK_INSTANCE", "TIDEMARK_INSTANCES"),
        "no variable TIDEMARK_INSTANCES",
    );
    must_find(
        broken(
            "collector.tidemark.svc.cluster.local:7400",
            "collector.tidemark.svc.cluster.local:7401",
        ),
        "scalerAddress",
    );
    must_find(
        broken("--upstream=http://127.0.0.1:3000", "--upstream=http://127.0.0.1:3001"),
        "--upstream",
    );
    must_find(broken("service: shop", "service: shopp"), "shopp");
    must_find(
        broken("scaling/scaling.toml", "scaling/scaling.tml"),
        "has no file scaling.tml",
    );
    must_find(
        broken(
            "--api-tokens=/etc/tidemark/billing/",
            "--api-tokens=/etc/tidemark/biling/",
        ),
        "on no volume",
    );
    must_find(
        broken("--default-plan=shop-standard", "--default-plan=shop-premium"),
        "--default-plan shop-premium",
    );

    let (units, env_files) = systemd_files();
    let mut typo = units.clone();
    let collector = typo.get_mut("tidemark-collector.service").unwrap();
    *collector = collector.replace("--admin-listen=", "--admin-listn=");
    must_find(check_systemd(&helps, &typo, &env_files).0, "no flag --admin-listn");
    let mut typo = env_files.clone();
    let sidecar = typo.get_mut("shop.sidecar.env").unwrap();
    *sidecar = sidecar.replace(
        "TIDEMARK_UPSTREAM=http://127.0.0.1:3000",
        "TIDEMARK_UPSTREAM=http://127.0.0.1:3001",
    );
    must_find(check_systemd(&helps, &units, &typo).0, "--upstream port");
    let mut typo = env_files.clone();
    let billing = typo.get_mut("billing.env").unwrap();
    *billing = billing.replace("#TIDEMARK_PLANS_DIR=", "#TIDEMARK_PLAN_DIR=");
    must_find(check_systemd(&helps, &units, &typo).0, "no variable TIDEMARK_PLAN_DIR");
}

// ----- --help -----

/// Every flag of every program has a `TIDEMARK_*` twin (DESIGN: "Names users see").
#[test]
fn every_flag_has_an_env_twin() {
    let helps = Helps::load();
    let mut missing = Vec::new();
    assert!(
        helps.get("tidemark-sidecar").unwrap().flags.len() > 10,
        "--help not understood"
    );
    for (program, help) in &helps.0 {
        for (flag, info) in &help.flags {
            if matches!(flag.as_str(), "--help" | "--version") {
                continue;
            }
            match &info.env {
                Some(env) if *env == format!("TIDEMARK_{}", flag[2..].replace('-', "_").to_uppercase()) => {}
                Some(env) if env.starts_with("TIDEMARK_") => {} // e.g. --kafka-property: TIDEMARK_KAFKA_PROPERTY
                other => missing.push(format!("{program} {flag}: env {other:?}")),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags without a TIDEMARK_* twin:\n  {}",
        missing.join("\n  ")
    );
}

// ----- the scaling config and the attach script -----

#[test]
fn the_scaling_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("--scaling-config={}", kube_dir().join("scaling.toml").display());
    let dev = start_dev(dir.path(), &[&config]);
    dev.address("ingest gRPC");
}

/// A copy of `sleep` under a unique name, so that its process is told apart
/// from every other on the machine by its name.
fn unique_app(dir: &Path) -> (String, std::process::Child) {
    let name = format!("tmapp{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let path = dir.join(&name);
    std::fs::copy("/bin/sleep", &path).unwrap();
    let child = Command::new(&path).arg("60").spawn().unwrap();
    (name, child)
}

fn attach(path_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let path = format!("{}:{}", path_dir.display(), std::env::var("PATH").unwrap());
    Command::new("/bin/sh")
        .arg(kube_dir().join("tidemark-attach.sh"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn attach_script_finds_the_app_and_starts_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake");
    std::fs::create_dir(&fake).unwrap();
    let out = dir.path().join("args");
    std::fs::write(
        fake.join("tidemark-sidecar"),
        format!("#!/bin/sh\necho \"$@\" > {}\n", out.display()),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(fake.join("tidemark-sidecar"))
        .status()
        .unwrap();
    let (name, mut app) = unique_app(dir.path());
    let pid = app.id();

    let output = attach(
        &fake,
        &[("APP_PROCESS", &name)],
        &["--listen=0.0.0.0:8080", "--service=shop"],
    );
    assert!(output.status.success(), "{output:?}");
    let args = std::fs::read_to_string(&out).unwrap();
    let cgroup = format!("--app-cgroup=/proc/{pid}/root/sys/fs/cgroup --listen=0.0.0.0:8080 --service=shop\n");
    let process = format!("--app-pid={pid} --listen=0.0.0.0:8080 --service=shop\n");
    assert!(args == cgroup || args == process, "the sidecar got {args:?}");

    // Without APP_PROCESS, or with a name no process has: say what to set.
    let output = attach(&fake, &[], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("APP_PROCESS is not set"));
    let output = attach(&fake, &[("APP_PROCESS", "no-such-app"), ("APP_WAIT_SECONDS", "1")], &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no process named 'no-such-app'") && stderr.contains("shareProcessNamespace"),
        "{stderr}"
    );

    // The real sidecar takes what the script gives it.
    let bin_dir = bin("tidemark-sidecar").parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let mut sidecar = Command::new("/bin/sh")
        .arg(kube_dir().join("tidemark-attach.sh"))
        .args([
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--upstream=http://127.0.0.1:9",
            "--collector=http://127.0.0.1:9",
            "--service=shop",
            "--report-interval=100ms",
        ])
        .env_clear()
        .env("PATH", path)
        .env("APP_PROCESS", &name)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = sidecar.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let started = line.contains("sidecar started");
            seen.push(line);
            if started {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let _ = app.kill();
    let _ = app.wait();
    let seen = lines.join().unwrap();
    assert!(
        seen.iter().any(|l| l.contains("sidecar started")),
        "the sidecar did not start:\n{}",
        seen.join("\n")
    );
    assert!(
        seen.iter().any(|l| l.contains(&format!("process {pid}"))),
        "the script did not say which process it found:\n{}",
        seen.join("\n")
    );
}

#[test]
fn the_dockerfile_builds_every_binary_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/container/Dockerfile")).unwrap();
    for program in ["tidemark", "tidemark-sidecar", "tidemark-collector", "tidemark-billing"] {
        assert!(
            dockerfile.contains(&format!("-p {program} ")) || dockerfile.contains(&format!("-p {program}\n")),
            "the Dockerfile does not build {program}"
        );
        assert!(
            dockerfile.contains(&format!("/src/target/release/{program} ")),
            "the Dockerfile does not copy {program}"
        );
    }
    assert!(dockerfile.contains("USER 65532:65532"), "the manifests run as 65532");
}
