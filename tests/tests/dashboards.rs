//! The Grafana dashboards in `dashboards/` against the real exporters.
//!
//! - Every dashboard is Grafana dashboard JSON on a `${datasource}`
//!   Prometheus variable, every panel has queries.
//! - Every metric name a dashboard query uses is one that a real sidecar,
//!   collector (with its autoscaler) or billing worker exports, with a
//!   `# TYPE` line for its family.
//! - A real Prometheus (Debian's package; `scripts/setup` installs it)
//!   scrapes those three processes, and every query of every panel, with the
//!   dashboard variables set to "All", answers with data.
//!
//! The processes run on the real Kafka broker (`scripts/kafka`); the test
//! fails, never skips, when Kafka or Prometheus is missing.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;
use tidemark_e2e::{Proc, free_port, get, kafka_brokers, send_requests, start_upstream, unique_topic};

/// The dashboards the issue asks for, by file stem.
const DASHBOARDS: [&str; 4] = ["overview", "sidecar", "autoscaler", "billing"];

/// What the test puts for Grafana's built-in interval variables.
const BUILTINS: [(&str, &str); 3] = [("__rate_interval", "30s"), ("__range", "5m"), ("__interval", "5s")];

/// The admin endpoints' listener, as the binaries log it.
const ADMIN: &str = "metrics, healthz, readyz";

// ---------------------------------------------------------------- dashboards

#[derive(Debug)]
struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Every `*.json` in `dashboards/`, parsed.
fn load_dashboards() -> Vec<Dashboard> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            }
        })
        .collect()
}

/// A dashboard's panels, grouped under the row above them (collapsed rows
/// hold theirs inside). Panels before any row form a group named "".
fn panel_groups(dashboard: &Value) -> Vec<(String, Vec<&Value>)> {
    let mut groups: Vec<(String, Vec<&Value>)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            let inside = panel["panels"]
                .as_array()
                .map(|p| p.iter().collect())
                .unwrap_or_default();
            groups.push((title, inside));
        } else {
            if groups.is_empty() {
                groups.push((String::new(), Vec::new()));
            }
            groups.last_mut().unwrap().1.push(panel);
        }
    }
    groups
}

fn panel_title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or("(untitled)")
}

/// The PromQL of a panel's queries.
fn exprs(panel: &Value) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
        .unwrap_or_default()
}

/// The templating variables of type `query`: name, the query, and the
/// value "All" stands for.
fn query_variables(dashboard: &Value) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .or(v["definition"].as_str())
                .unwrap_or_default();
            (
                v["name"].as_str().unwrap().to_owned(),
                query.to_owned(),
                v["allValue"].as_str().unwrap_or(".+").to_owned(),
            )
        })
        .collect()
}

/// Every PromQL text of a dashboard: panel queries and variable queries.
fn all_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = panel_groups(dashboard)
        .iter()
        .flat_map(|(_, panels)| panels.iter().flat_map(|p| exprs(p)))
        .map(str::to_owned)
        .collect();
    queries.extend(query_variables(dashboard).into_iter().map(|(_, q, _)| q));
    queries
}

/// The Tidemark metric names in a PromQL expression: identifiers (outside
/// string literals) of the form `tidemark_[a-z0-9_]+`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // A string literal (a label value or regex): skip it whole.
                let mut escaped = false;
                for (_, d) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut end = start + c.len_utf8();
                while let Some(&(i, d)) = chars.peek() {
                    if !(d.is_ascii_alphanumeric() || d == '_' || d == ':') {
                        break;
                    }
                    end = i + d.len_utf8();
                    chars.next();
                }
                let ident = &expr[start..end];
                let rest = ident.strip_prefix("tidemark_").unwrap_or_default();
                if !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    names.insert(ident.to_owned());
                }
            }
            _ => {}
        }
    }
    names
}

/// `expr` with the dashboard's variables set to "All" and Grafana's
/// built-in intervals set to fixed values.
fn substitute(expr: &str, variables: &[(String, String, String)]) -> String {
    let mut values: Vec<(String, String)> = BUILTINS
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    values.extend(variables.iter().map(|(n, _, all)| (n.clone(), all.clone())));
    // Longest names first, so `$a` never eats the start of `$ab`.
    values.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut out = expr.to_owned();
    for (name, value) in &values {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !out.contains('$'),
        "a variable the test cannot set is left in {out:?} (from {expr:?})"
    );
    out
}

#[test]
fn metric_names_are_identifiers_outside_strings() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(tidemark_sidecar_request_duration_seconds_bucket{instance=~"tidemark_x"}[$__rate_interval]))) / on() tidemark_a:b + tidemark_ok_2"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        ["tidemark_ok_2", "tidemark_sidecar_request_duration_seconds_bucket"]
    );
    assert!(metric_names(r#"label_values({__name__=~"tidemark_.+"}, job)"#).is_empty());
    assert!(metric_names("sum(rate(tidemark_[5m]))").is_empty());
    let vars = [("service".to_owned(), String::new(), ".+".to_owned())];
    assert_eq!(
        substitute(r#"x{service=~"$service"}[$__rate_interval] ${service}"#, &vars),
        r#"x{service=~".+"}[30s] .+"#
    );
}

#[test]
fn dashboards_are_grafana_dashboards_on_a_prometheus_datasource_variable() {
    let dashboards = load_dashboards();
    let files: BTreeSet<&str> = dashboards.iter().map(|d| d.file.as_str()).collect();
    for stem in DASHBOARDS {
        assert!(
            files.contains(format!("{stem}.json").as_str()),
            "dashboards/{stem}.json is missing"
        );
    }
    let readme = std::fs::read_to_string(dashboards_dir().join("README.md")).unwrap();
    let mut uids = BTreeSet::new();
    for Dashboard { file, json: d } in &dashboards {
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: no title");
        assert!(
            readme.contains(file.as_str()),
            "dashboards/README.md does not describe {file}"
        );
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{file}: uid {uid:?}");
        assert!(uids.insert(uid.to_owned()), "{file}: uid {uid} used twice");
        let schema = d["schemaVersion"].as_u64().unwrap_or(0);
        assert!((36..=41).contains(&schema), "{file}: schemaVersion {schema}");
        let variables = d["templating"]["list"].as_array().unwrap();
        let datasource = variables.iter().find(|v| v["name"] == "datasource");
        assert!(
            datasource.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
            "{file}: no `datasource` variable of type datasource over Prometheus"
        );
        for v in variables.iter().filter(|v| v["type"] == "query") {
            assert_eq!(
                v["datasource"]["uid"], "${datasource}",
                "{file}: variable {}",
                v["name"]
            );
        }

        let groups = panel_groups(d);
        assert!(groups.len() >= 2, "{file}: panels are not grouped in rows");
        let top = d["panels"].as_array().unwrap();
        let nested = top.iter().filter_map(|p| p["panels"].as_array()).flatten();
        let all_panels: Vec<&Value> = top.iter().chain(nested).collect();
        let mut ids = BTreeSet::new();
        for panel in &all_panels {
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: a panel has no id"));
            assert!(ids.insert(id), "{file}: panel id {id} used twice");
            let pos = &panel["gridPos"];
            let (x, w, h) = (pos["x"].as_u64(), pos["w"].as_u64(), pos["h"].as_u64());
            assert!(
                matches!((x, w, h), (Some(x), Some(w), Some(h)) if x + w <= 24 && h > 0 && pos["y"].is_u64()),
                "{file}: panel {id} has gridPos {pos}"
            );
        }
        for (group, panels) in &groups {
            assert!(!panels.is_empty(), "{file}: row {group:?} is empty");
            for panel in panels {
                let title = panel_title(panel);
                assert_eq!(panel["datasource"]["type"], "prometheus", "{file}: {title}");
                assert_eq!(panel["datasource"]["uid"], "${datasource}", "{file}: {title}");
                let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
                assert!(!targets.is_empty(), "{file}: panel {title:?} has no queries");
                let mut refs = BTreeSet::new();
                for t in targets {
                    assert_eq!(t["datasource"]["uid"], "${datasource}", "{file}: {title}");
                    assert!(
                        t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                        "{file}: {title}"
                    );
                    assert!(
                        refs.insert(t["refId"].as_str().unwrap()),
                        "{file}: {title}: refId twice"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- exporters

/// A real sidecar (in front of the test upstream), a real collector with its
/// autoscaler and a real billing worker, on one fresh Kafka topic.
#[derive(Debug)]
struct Stack {
    _dir: tempfile::TempDir,
    sidecar: Proc,
    collector: Proc,
    billing: Proc,
    proxy: SocketAddr,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let brokers = format!("--kafka-brokers={}", kafka_brokers());
        let topic = unique_topic();
        let usage_topic = format!("--usage-topic={topic}");
        let collector = Proc::start(
            "tidemark-collector",
            &[
                "--listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                &brokers,
                &usage_topic,
                &format!("--decisions-topic={}", unique_topic()),
                &format!("--autoscaler-group=autoscaler-{topic}"),
            ],
        );
        let grpc = collector.address("ingest gRPC");
        let billing = Proc::start(
            "tidemark-billing",
            &[
                "--api-listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                "--commit-interval=100ms",
                &format!("--database-url=sqlite:{}", dir.path().join("billing.db").display()),
                &brokers,
                &usage_topic,
                &format!("--group=billing-{topic}"),
                // Revenue per tenant needs a plan to price the tenants with.
                "--default-plan=aws-lambda-x86",
                "--lag-interval=1s",
                "--revenue-interval=1s",
            ],
        );
        let upstream = start_upstream().await;
        let sidecar = Proc::start(
            "tidemark-sidecar",
            &[
                "--listen=127.0.0.1:0",
                "--admin-listen=127.0.0.1:0",
                &format!("--upstream=http://{upstream}"),
                &format!("--collector=http://{grpc}"),
                "--service=shop",
                "--instance=shop-1",
                "--report-interval=250ms",
            ],
        );
        let proxy = sidecar.address("proxy");
        Stack {
            _dir: dir,
            sidecar,
            collector,
            billing,
            proxy,
        }
    }

    /// Scrape jobs: name and admin address.
    fn exporters(&self) -> [(&'static str, SocketAddr); 3] {
        [
            ("tidemark-sidecar", self.sidecar.address(ADMIN)),
            ("tidemark-collector", self.collector.address(ADMIN)),
            ("tidemark-billing", self.billing.address(ADMIN)),
        ]
    }

    /// Keeps a request per 100 ms going through the sidecar until the flag
    /// is set (two minutes at most).
    fn keep_traffic(&self) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let proxy = self.proxy;
        let task = tokio::spawn(async move {
            for _ in 0..1200 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                send_requests(proxy, "acme", 1).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        (stop, task)
    }
}

/// What one `/metrics` answer holds: families by name with their type, and
/// the names of the samples.
#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str, into: &mut Exposition) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    into.families.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let name = line.split(['{', ' ']).next().unwrap();
                into.samples.insert(name.to_owned());
            }
        }
    }

    /// The family (name, type) a sample name belongs to.
    fn family_of(&self, sample: &str) -> Option<(&str, &str)> {
        if let Some((name, kind)) = self.families.get_key_value(sample)
            && matches!(kind.as_str(), "gauge" | "unknown" | "untyped")
        {
            return Some((name, kind));
        }
        let suffixes: [(&str, &[&str]); 4] = [
            ("_total", &["counter"]),
            ("_bucket", &["histogram"]),
            ("_sum", &["histogram", "summary"]),
            ("_count", &["histogram", "summary"]),
        ];
        suffixes.iter().find_map(|(suffix, kinds)| {
            let (name, kind) = self.families.get_key_value(sample.strip_suffix(suffix)?)?;
            kinds.contains(&kind.as_str()).then_some((name.as_str(), kind.as_str()))
        })
    }
}

async fn scrape(exporters: &[(&str, SocketAddr)]) -> (Exposition, String) {
    let mut exposition = Exposition::default();
    let mut texts = String::new();
    for (job, addr) in exporters {
        let (status, body) = get(&format!("http://{addr}/metrics"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{job} /metrics: {body}");
        Exposition::parse(&body, &mut exposition);
        texts.push_str(&format!("----- {job} ({addr}) -----\n{body}\n"));
    }
    (exposition, texts)
}

/// Every Tidemark metric name any dashboard uses, with where it is used.
fn dashboard_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for dashboard in load_dashboards() {
        for query in all_queries(&dashboard.json) {
            for name in metric_names(&query) {
                names.entry(name).or_default().insert(dashboard.file.clone());
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_in_the_dashboards_is_exported() {
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 20, "suspiciously few metric names found: {wanted:?}");
    let stack = Stack::start().await;
    let exporters = stack.exporters();
    send_requests(stack.proxy, "acme", 20).await;

    // Labelled series (per service) appear once the autoscaler has decided:
    // scrape until every name is there or a minute has passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (exposition, texts) = scrape(&exporters).await;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(name, _)| !exposition.samples.contains(*name) || exposition.family_of(name).is_none())
            .map(|(name, files)| format!("{name} (in {files:?})"))
            .collect();
        if missing.is_empty() {
            let used: BTreeSet<&str> = wanted
                .keys()
                .filter_map(|n| exposition.family_of(n))
                .map(|f| f.0)
                .collect();
            let unused: Vec<&String> = exposition
                .families
                .keys()
                .filter(|f| !used.contains(f.as_str()))
                .collect();
            eprintln!(
                "{} dashboard metric names, all exported; families on no dashboard: {unused:?}",
                wanted.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboards use metrics no exporter has (with a # TYPE line):\n  {}\n{texts}",
            missing.join("\n  ")
        );
        send_requests(stack.proxy, "acme", 2).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------- Prometheus

/// Debian's Prometheus binary, or a failure that says how to install it.
fn prometheus_binary() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/prometheus");
    if debian.is_file() {
        return debian;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "prometheus is missing (neither /usr/bin/prometheus nor on PATH): this test runs a real Prometheus; \
                 install Debian's package with `apt-get install --no-install-recommends prometheus`, or run \
                 scripts/setup, which does"
            )
        })
}

/// A Prometheus server scraping `exporters` every second; killed on drop.
#[derive(Debug)]
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(exporters: &[(&str, SocketAddr)]) -> Prometheus {
        let binary = prometheus_binary();
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in exporters {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with Prometheus's log if it has exited.
    fn check_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("prometheus exited ({status}):\n{}", self.log());
        }
    }

    /// GETs an API path; `None` while Prometheus does not answer yet (or
    /// answers 503 while it starts).
    async fn api(&mut self, path_and_query: &str) -> Option<(StatusCode, Value)> {
        self.check_running();
        let url = format!("http://{}{path_and_query}", self.addr);
        let response = tokio::time::timeout(Duration::from_secs(10), async {
            let request = hyper::Request::get(url.as_str())
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = tidemark_e2e::http_client().request(request).await.ok()?;
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .ok()?
                .to_bytes();
            Some((status, body))
        })
        .await
        .ok()??;
        let (status, body) = response;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return None; // still starting
        }
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{url}: {status}, not JSON ({e}): {}", String::from_utf8_lossy(&body)));
        Some((status, json))
    }

    /// Waits until every scrape target is up.
    async fn wait_targets_up(&mut self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut last = None;
            if let Some((StatusCode::OK, json)) = self.api("/api/v1/targets?state=active").await {
                let targets = json["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
                if targets.len() == count && targets.iter().all(|t| t["health"] == "up") {
                    return;
                }
                last = Some(json);
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus's targets never all came up; last /api/v1/targets: {last:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs an instant query; fails on anything but success, returns the
    /// result vector.
    async fn query(&mut self, promql: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, json) = self
            .api(&path)
            .await
            .unwrap_or_else(|| panic!("Prometheus did not answer {promql:?}"));
        assert!(
            status == StatusCode::OK && json["status"] == "success",
            "query {promql:?} failed: {status} {json}"
        );
        json["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- prometheus log -----\n{}\n-----", self.log());
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One query of one panel, ready to run.
#[derive(Debug)]
struct PanelQuery {
    place: String,
    promql: String,
}

/// Every query of every panel of every dashboard, by dashboard and row.
fn panel_queries() -> BTreeMap<(String, String), Vec<PanelQuery>> {
    let mut groups = BTreeMap::new();
    for Dashboard { file, json } in load_dashboards() {
        let variables = query_variables(&json);
        for (row, panels) in panel_groups(&json) {
            let queries: &mut Vec<PanelQuery> = groups.entry((file.clone(), row.clone())).or_default();
            for panel in panels {
                for expr in exprs(panel) {
                    queries.push(PanelQuery {
                        place: format!("{file} / {row} / {}", panel_title(panel)),
                        promql: substitute(expr, &variables),
                    });
                }
            }
        }
        for (name, query, all) in &variables {
            // A variable must list something, or "All" shows nothing.
            let series = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(s, _)| s.trim().to_owned());
            if let Some(series) = series {
                let label = query.rsplit_once(',').unwrap().1.trim_end_matches(')').trim();
                groups
                    .entry((file.clone(), "(variables)".into()))
                    .or_default()
                    .push(PanelQuery {
                        place: format!("{file} / variable {name}"),
                        promql: format!("count by ({label}) ({series})"),
                    });
            }
            assert!(!all.is_empty(), "{file}: variable {name} has no allValue");
        }
    }
    groups
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_answers_every_dashboard_panel_with_data() {
    let binary = prometheus_binary();
    let groups = panel_queries();
    for stem in DASHBOARDS {
        let file = format!("{stem}.json");
        assert!(
            groups.keys().filter(|(f, _)| *f == file).count() >= 2,
            "{file}: fewer than two panel groups"
        );
    }
    let stack = Stack::start().await;
    let exporters = stack.exporters();
    let (stop, traffic) = stack.keep_traffic();
    let mut prometheus = Prometheus::start(&exporters);
    prometheus.wait_targets_up(exporters.len()).await;
    eprintln!("{} scrapes {exporters:?}", binary.display());

    // Rates need two scrapes and the autoscaler's gauges a decision: query
    // until every panel query has data, or a minute has passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut empty = Vec::new();
        let mut answered = 0;
        for queries in groups.values() {
            for q in queries {
                if prometheus.query(&q.promql).await.is_empty() {
                    empty.push(format!("{}: {}", q.place, q.promql));
                } else {
                    answered += 1;
                }
            }
        }
        if empty.is_empty() {
            eprintln!(
                "{answered} panel queries in {} panel groups all answered with data",
                groups.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no data for these dashboard queries:\n  {}",
            empty.join("\n  ")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
}
