//! Ingest throughput: how many usage batches one `tidemark-collector` acks
//! per second when many sidecars stream to it at once, next to what Kafka's
//! own producer tool writes to the same broker.
//!
//! `--streams` concurrent `tidemark.v1.Ingest/Report` streams, spread over
//! `--connections` HTTP/2 connections, each send `UsageBatch`es (`--tenants`
//! tenants with two custom meters each, windows ending now) as fast as acks
//! allow, with at most `--window` unacked batches per stream. After
//! `--warmup`, acks are counted for `--duration` together with the CPU time
//! of the collector, the broker and this client from /proc.
//!
//! The baseline, run in the same invocation against the same broker:
//! `org.apache.kafka.tools.ProducerPerformance` (what `kafka-producer-perf-test.sh`
//! runs) with records of the batches' encoded size, `acks=all`,
//! `--throughput -1`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use prost::Message as _;
use tidemark_bench_support::procs::{CpuMeter, Proc, clock_ticks, status_kib, unique_name};
use tidemark_bench_support::stats;
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{LoadSample, ResourceSample, TenantUsage, UsageBatch};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Directory of the release binaries (tidemark-collector).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS")]
    kafka_brokers: String,
    /// Concurrent Report streams (one per simulated sidecar).
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// HTTP/2 connections the streams are spread over (round robin); = --streams is one per stream.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Services the streams belong to (the Kafka key; streams are spread evenly).
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Tenants per batch.
    #[arg(long, default_value_t = 20)]
    tenants: usize,
    /// Unacked batches per stream at most.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Unmeasured time after all streams are open.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    warmup: Duration,
    /// Measured time.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// A collector setup to measure, `LABEL::FLAGS` (flags split on spaces); repeatable.
    /// Default: `default::`, `autoscaler off::--autoscale=false` and
    /// `linger.ms=20::--kafka-property=linger.ms=20`.
    #[arg(long = "variant")]
    variants: Vec<String>,
    /// Classpath of Kafka's tools (`scripts/kafka perf-classpath`); without it no baseline runs.
    #[arg(long)]
    kafka_classpath: Option<String>,
    /// log4j2 config for the Kafka tools (quiet logs).
    #[arg(long)]
    kafka_tools_log4j: Option<PathBuf>,
    /// The broker's pid, to measure its CPU.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Rounds: every setup, then the producer tool, this many times over
    /// (interleaved, so that a slow spell of the machine hits all of them).
    /// The tables show each row's median round and every round's rate.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Records for the producer tool; default: as many as the first variant acked while measured.
    #[arg(long)]
    baseline_records: Option<u64>,
    /// Keep the processes' logs here (default: a temporary directory, kept only on failure).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// The counters every stream adds to.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    tenants: AtomicU64,
    bytes: AtomicU64,
    rejects: AtomicU64,
    streams_failed: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    batches: u64,
    tenants: u64,
    bytes: u64,
}

impl Counters {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            batches: self.batches.load(Ordering::Relaxed),
            tenants: self.tenants.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// One collector setup's numbers.
#[derive(Debug)]
struct VariantResult {
    label: String,
    flags: Vec<String>,
    batches: u64,
    seconds: f64,
    tenants: u64,
    bytes: u64,
    ack: Histogram<u64>,
    collector_cores: f64,
    broker_cores: f64,
    client_cores: f64,
    machine_cores: f64,
    steal_cores: f64,
    rss_kib: u64,
    hwm_kib: u64,
    autoscaler: Autoscaler,
    rejects: u64,
    streams_failed: u64,
    first_reject: Option<String>,
}

/// What the collector's own metrics say happened while measured.
#[derive(Debug, Clone, Copy)]
struct Autoscaler {
    /// `tidemark_collector_batches_accepted_total`.
    accepted: Option<f64>,
    /// Batches the autoscaler fed to its scalers.
    read: Option<f64>,
    /// Batches it skipped (older than the stable window, undecodable).
    skipped: Option<f64>,
    decisions: Option<f64>,
}

/// The collector's Prometheus metrics (`name value` lines without labels).
async fn metrics(admin: std::net::SocketAddr) -> HashMap<String, f64> {
    use http_body_util::BodyExt as _;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let Ok(uri) = format!("http://{admin}/metrics").parse::<hyper::Uri>() else {
        return HashMap::new();
    };
    let body = match tokio::time::timeout(Duration::from_secs(5), client.get(uri)).await {
        Ok(Ok(response)) => match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return HashMap::new(),
        },
        _ => return HashMap::new(),
    };
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// One round: every setup, then the tool.
#[derive(Debug)]
struct Round {
    results: Vec<VariantResult>,
    tool: Option<ToolResult>,
}

/// The producer tool's numbers.
#[derive(Debug)]
struct ToolResult {
    record_size: usize,
    records_per_sec: f64,
    mib_per_sec: f64,
    summary: String,
    tool_cores: f64,
    broker_cores: f64,
    machine_cores: f64,
    steal_cores: f64,
    partitions: u32,
}

pub async fn run(args: Args) -> anyhow::Result<String> {
    let (work, temp) = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("tidemark-bench-ingest.").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let result = measure(&args, &work).await;
    if result.is_err()
        && let Some(t) = temp
    {
        eprintln!("[bench] logs kept in {}", t.keep().display());
    }
    result
}

fn variants(args: &Args) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let given = if args.variants.is_empty() {
        vec![
            "default::".to_owned(),
            "autoscaler off::--autoscale=false".to_owned(),
            "linger.ms=20::--kafka-property=linger.ms=20".to_owned(),
        ]
    } else {
        args.variants.clone()
    };
    given
        .iter()
        .map(|v| {
            let (label, flags) = v
                .split_once("::")
                .with_context(|| format!("--variant {v:?} is not LABEL::FLAGS"))?;
            Ok((label.to_owned(), flags.split_whitespace().map(str::to_owned).collect()))
        })
        .collect()
}

async fn measure(args: &Args, work: &std::path::Path) -> anyhow::Result<String> {
    let hz = clock_ticks();
    let variants = variants(args)?;
    let size = template(args.services, args.tenants, 0).encoded_len();
    let mut rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let mut results = Vec::new();
        for (label, flags) in &variants {
            eprintln!("[bench] round {round}: {label} ({})", flags.join(" "));
            results.push(measure_variant(args, work, hz, label, flags).await?);
            let r = results.last().expect("just pushed");
            eprintln!(
                "[bench] round {round}: {label}: {:.0} batches/s, {:.0} tenant records/s, collector {:.2} cores, others {:.2}, steal {:.2}",
                r.batches as f64 / r.seconds,
                r.tenants as f64 / r.seconds,
                r.collector_cores,
                others(r.machine_cores, &[r.collector_cores, r.broker_cores, r.client_cores]),
                r.steal_cores,
            );
        }
        let tool = match &args.kafka_classpath {
            Some(classpath) => {
                let records = args
                    .baseline_records
                    .unwrap_or_else(|| results.first().map_or(100_000, |r| r.batches.max(10_000)));
                let t = producer_tool(args, classpath, hz, size, records).await?;
                eprintln!(
                    "[bench] round {round}: ProducerPerformance: {:.0} records/s",
                    t.records_per_sec
                );
                Some(t)
            }
            None => None,
        };
        rounds.push(Round { results, tool });
    }
    Ok(report(args, size, &rounds))
}

/// A realistic batch for stream `index`: `--tenants` tenants with every
/// built-in meter set and two custom meters, load and resources.
fn template(services: usize, tenants: usize, index: usize) -> UsageBatch {
    let service = index % services.max(1);
    let replica = index / services.max(1);
    let tenants: Vec<TenantUsage> = (0..tenants)
        .map(|k| {
            let requests = 20 + (k as u64 * 7 + index as u64) % 50;
            let errors = k as u64 % 3;
            TenantUsage {
                tenant: format!("tenant-{:04}", (index * 7 + k * 13) % 5000),
                requests,
                errors,
                duration_micros: requests * 23_417,
                billed_duration_micros: requests * 24_000,
                bytes_in: requests * 812,
                bytes_out: requests * 5_311,
                custom: HashMap::from([
                    ("llm.tokens_in".to_owned(), (requests * 311).to_string()),
                    ("llm.tokens_out".to_owned(), format!("{}.25", requests * 97)),
                ]),
                responses_1xx: 0,
                responses_2xx: requests - errors - 1,
                responses_3xx: 0,
                responses_4xx: 1,
                responses_5xx: errors,
                cpu_micros: requests * 3_100,
                memory_byte_micros: requests * 52_428_800_000,
                in_flight_micros: requests * 23_417,
                rejected: 0,
                custom_rejects: 0,
            }
        })
        .collect();
    let requests = tenants.iter().map(|t| t.requests).sum();
    UsageBatch {
        service: format!("svc-{service:03}"),
        instance: format!("svc-{service:03}-{replica}"),
        session_id: format!("bench-{}-{index}-{}", std::process::id(), now_micros()),
        seq: 0,
        window_start_unix_micros: 0,
        window_end_unix_micros: 0,
        load: Some(LoadSample {
            concurrency: 4.75,
            requests,
            in_flight: 5,
        }),
        tenants,
        resources: Some(ResourceSample {
            cpu_micros: 118_000,
            memory_bytes: 268_435_456,
        }),
        tenants_overflowed: 0,
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

async fn measure_variant(
    args: &Args,
    work: &std::path::Path,
    hz: f64,
    label: &str,
    flags: &[String],
) -> anyhow::Result<VariantResult> {
    let run = unique_name("bench-ingest");
    let mut collector_args = vec![
        "--listen=127.0.0.1:0".to_owned(),
        "--admin-listen=127.0.0.1:0".to_owned(),
        format!("--kafka-brokers={}", args.kafka_brokers),
        format!("--usage-topic={run}.usage"),
        format!("--decisions-topic={run}.decisions"),
        format!("--autoscaler-group={run}.autoscaler"),
    ];
    collector_args.extend(flags.iter().cloned());
    let name: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut collector = Proc::start(
        &format!("collector-{name}"),
        &args.bin_dir.join("tidemark-collector"),
        &collector_args,
        Some(work),
    )?;
    let grpc = collector.address("ingest gRPC")?;
    let admin = collector.address("metrics, healthz, readyz")?;
    let url = format!("http://{grpc}");

    let connections = args.connections.clamp(1, args.streams.max(1));
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = Endpoint::from_shared(url.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to the collector at {url}"))?;
        channels.push(channel);
    }
    let counters = Arc::new(Counters::default());
    let first_reject = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::with_capacity(args.streams);
    for index in 0..args.streams {
        let channel = channels[index % connections].clone();
        let batch = template(args.services, args.tenants, index);
        let counters = Arc::clone(&counters);
        let first_reject = Arc::clone(&first_reject);
        let window = args.window.max(1);
        tasks.push(tokio::spawn(async move {
            stream(channel, batch, window, counters, first_reject).await
        }));
    }
    eprintln!(
        "[bench] {} streams open over {connections} connections; warming up for {:?}",
        args.streams, args.warmup
    );
    tokio::time::sleep(args.warmup).await;
    collector.check_alive()?;

    let client_pid = std::process::id();
    let mut pids = vec![collector.pid(), client_pid];
    pids.extend(args.broker_pid);
    let before = counters.snapshot();
    let metrics_before = metrics(admin).await;
    let meter = CpuMeter::start(hz, &pids);
    counters.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    let after = counters.snapshot();
    let seconds = started.elapsed().as_secs_f64();
    let (cores, machine_cores, steal_cores) = meter.read();
    counters.measuring.store(false, Ordering::Relaxed);
    let rss_kib = status_kib(collector.pid(), "VmRSS").unwrap_or(0);
    let hwm_kib = status_kib(collector.pid(), "VmHWM").unwrap_or(0);
    let metrics_after = metrics(admin).await;
    collector.check_alive()?;
    let delta = |name: &str| match (metrics_before.get(name), metrics_after.get(name)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let autoscaler = Autoscaler {
        accepted: delta("tidemark_collector_batches_accepted_total"),
        read: delta("tidemark_autoscaler_batches_total"),
        skipped: delta("tidemark_autoscaler_batches_skipped_total"),
        decisions: delta("tidemark_autoscaler_decisions_total"),
    };

    counters.stop.store(true, Ordering::Relaxed);
    let mut ack = stats::histogram();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(h)) => ack.add(&h).context("merging histograms")?,
            Ok(Err(e)) => bail!("a stream task failed: {e}"),
            Err(_) => eprintln!("[bench] a stream did not finish within 10 s of the stop"),
        }
    }
    drop(channels);
    collector.stop();
    let first_reject = first_reject.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(VariantResult {
        label: label.to_owned(),
        flags: flags.to_vec(),
        batches: after.batches - before.batches,
        seconds,
        tenants: after.tenants - before.tenants,
        bytes: after.bytes - before.bytes,
        ack,
        collector_cores: cores[0],
        client_cores: cores[1],
        broker_cores: cores.get(2).copied().unwrap_or(f64::NAN),
        machine_cores,
        steal_cores,
        rss_kib,
        hwm_kib,
        autoscaler,
        rejects: counters.rejects.load(Ordering::Relaxed),
        streams_failed: counters.streams_failed.load(Ordering::Relaxed),
        first_reject,
    })
}

/// One Report stream: keeps `window` batches unacked until told to stop;
/// returns the ack latencies it saw while measuring.
async fn stream(
    channel: Channel,
    mut batch: UsageBatch,
    window: usize,
    counters: Arc<Counters>,
    first_reject: Arc<std::sync::Mutex<Option<String>>>,
) -> Histogram<u64> {
    let mut latencies = stats::histogram();
    let (tx, rx) = mpsc::channel::<UsageBatch>(window);
    let mut client = IngestClient::new(channel).max_decoding_message_size(16 << 20);
    let tenants = batch.tenants.len() as u64;
    let mut in_flight: VecDeque<(Instant, u64)> = VecDeque::with_capacity(window);
    let next = |batch: &mut UsageBatch| {
        let end = now_micros();
        batch.window_end_unix_micros = end;
        batch.window_start_unix_micros = end - 250_000;
        let out = batch.clone();
        batch.seq += 1;
        out
    };
    for _ in 0..window {
        let b = next(&mut batch);
        in_flight.push_back((Instant::now(), b.encoded_len() as u64));
        if tx.try_send(b).is_err() {
            break;
        }
    }
    let mut replies = match client.report(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            eprintln!("[bench] cannot open a Report stream: {status}");
            counters.streams_failed.fetch_add(1, Ordering::Relaxed);
            return latencies;
        }
    };
    loop {
        let reply = match replies.message().await {
            Ok(Some(reply)) => reply,
            Ok(None) | Err(_) if counters.stop.load(Ordering::Relaxed) => break,
            Ok(None) => {
                eprintln!("[bench] a Report stream ended");
                counters.streams_failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(status) => {
                eprintln!("[bench] a Report stream failed: {status}");
                counters.streams_failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        let Some((sent, size)) = in_flight.pop_front() else {
            break;
        };
        match reply.result {
            Some(Reply::Ack(_)) => {
                counters.batches.fetch_add(1, Ordering::Relaxed);
                counters.tenants.fetch_add(tenants, Ordering::Relaxed);
                counters.bytes.fetch_add(size, Ordering::Relaxed);
                if counters.measuring.load(Ordering::Relaxed) {
                    stats::record(&mut latencies, sent.elapsed());
                }
            }
            Some(Reply::Reject(reject)) => {
                counters.rejects.fetch_add(1, Ordering::Relaxed);
                let mut first = first_reject.lock().unwrap_or_else(|e| e.into_inner());
                if first.is_none() {
                    *first = Some(format!("code {}: {}", reject.code, reject.reason));
                }
            }
            None => {}
        }
        if counters.stop.load(Ordering::Relaxed) {
            break;
        }
        let b = next(&mut batch);
        in_flight.push_back((Instant::now(), b.encoded_len() as u64));
        if tx.send(b).await.is_err() {
            break;
        }
    }
    latencies
}

fn java(args: &Args, classpath: &str) -> std::process::Command {
    let mut command = std::process::Command::new("java");
    command.args(["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true"]);
    if let Some(log4j) = &args.kafka_tools_log4j {
        command.arg(format!("-Dlog4j2.configurationFile={}", log4j.display()));
    }
    command.args(["-cp", classpath]);
    command
}

/// Runs Kafka's ProducerPerformance against a fresh topic with as many
/// partitions as the collector's usage topic.
async fn producer_tool(
    args: &Args,
    classpath: &str,
    hz: f64,
    record_size: usize,
    records: u64,
) -> anyhow::Result<ToolResult> {
    let topic = format!("{}.perf", unique_name("bench-ingest"));
    let partitions = 8;
    eprintln!("[bench] creating {topic} with {partitions} partitions");
    let created = java(args, classpath)
        .args([
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            &args.kafka_brokers,
            "--create",
            "--topic",
            &topic,
            "--partitions",
            &partitions.to_string(),
            "--replication-factor",
            "1",
        ])
        .output()
        .context("cannot run java")?;
    if !created.status.success() {
        bail!(
            "TopicCommand failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
    }
    let tool_args = [
        "org.apache.kafka.tools.ProducerPerformance".to_owned(),
        "--topic".into(),
        topic.clone(),
        "--num-records".into(),
        records.to_string(),
        "--record-size".into(),
        record_size.to_string(),
        "--throughput".into(),
        "-1".into(),
        "--producer-props".into(),
        format!("bootstrap.servers={}", args.kafka_brokers),
        "acks=all".into(),
    ];
    eprintln!("[bench] java … {}", tool_args.join(" "));
    let mut command = java(args, classpath);
    command.args(&tool_args);
    let program = PathBuf::from(command.get_program());
    let full: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut tool = Proc::start("producer-perf", &program, &full, None)?;
    let mut pids = vec![tool.pid()];
    pids.extend(args.broker_pid);
    let meter = CpuMeter::start(hz, &pids);
    // The tool's own CPU is read until just before it exits.
    let mut last = (vec![0.0; pids.len()], 0.0, 0.0);
    let status = loop {
        if let Some(status) = tool_status(&mut tool)? {
            break status;
        }
        last = meter.read();
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let output = tool.output();
    if !status.success() {
        bail!("ProducerPerformance failed ({status}):\n{}", tool.tail(30));
    }
    let summary = output
        .iter()
        .rev()
        .find(|l| l.contains("records sent") && l.contains("avg latency"))
        .cloned()
        .with_context(|| format!("no summary line from ProducerPerformance:\n{}", tool.tail(30)))?;
    let (records_per_sec, mib_per_sec) = parse_summary(&summary).context("cannot parse the tool's summary")?;
    Ok(ToolResult {
        record_size,
        records_per_sec,
        mib_per_sec,
        summary,
        tool_cores: last.0[0],
        broker_cores: last.0.get(1).copied().unwrap_or(f64::NAN),
        machine_cores: last.1,
        steal_cores: last.2,
        partitions,
    })
}

fn tool_status(tool: &mut Proc) -> anyhow::Result<Option<std::process::ExitStatus>> {
    match tool.check_alive() {
        Ok(()) => Ok(None),
        Err(_) => Ok(Some(tool.wait()?)),
    }
}

/// `… records sent, 12345.6 records/sec (28.41 MB/sec), …` → (records/s, MiB/s).
/// The tool's "MB" is 1024 × 1024 bytes.
fn parse_summary(line: &str) -> Option<(f64, f64)> {
    let rate = line
        .split(" records/sec")
        .next()?
        .rsplit(", ")
        .next()?
        .trim()
        .parse()
        .ok()?;
    let mb = line.split(" MB/sec").next()?.rsplit('(').next()?.trim().parse().ok()?;
    Some((rate, mb))
}

/// Cores busy with work other than the benchmark's own processes (a build
/// or test running beside it shows here; a few hundredths are the kernel and idle daemons).
fn others(machine: f64, ours: &[f64]) -> f64 {
    (machine - ours.iter().filter(|c| c.is_finite()).sum::<f64>()).max(0.0)
}

impl VariantResult {
    fn rate(&self) -> f64 {
        self.batches as f64 / self.seconds
    }
}

/// The element with the median `key` (the lower middle of an even count).
fn median_by<'a, T>(items: &[&'a T], key: impl Fn(&T) -> f64) -> Option<&'a T> {
    let mut sorted = items.to_vec();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

fn report(args: &Args, size: usize, rounds: &[Round]) -> String {
    let mut out = String::new();
    let connections = args.connections.clamp(1, args.streams.max(1));
    let _ = writeln!(
        out,
        "## Ingest throughput\n\n\
         {} concurrent `Ingest/Report` streams over {} HTTP/2 connection{} ({}), {} services; every batch \
         has {} tenants with two custom meters each and is {} bytes encoded; at most {} unacked batches per \
         stream. Each setup runs on a fresh collector and usage topic: {:?} warm-up, then {:?} measured. \
         {} rounds, each every setup and then the producer tool; each row shows its median round, and the \
         rate of every round in order. CPU is user + system time from /proc over the measured interval, \
         in cores (the machine has {}); the client is this benchmark's own process; \"of which others\" is \
         the machine's busy time not spent in these processes (the kernel's share of networking, and \
         anything else running); \"host steal\" is CPU time the hypervisor gave elsewhere while this VM \
         wanted it (`steal` in /proc/stat).\n",
        args.streams,
        connections,
        if connections == 1 { "" } else { "s" },
        if connections == args.streams {
            "one per stream, as sidecars connect".to_owned()
        } else {
            format!("{} streams multiplexed on each", args.streams.div_ceil(connections))
        },
        args.services,
        args.tenants,
        size,
        args.window,
        args.warmup,
        args.duration,
        rounds.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        out,
        "| setup | batches/s | (each round) | tenant-usage records/s | MiB/s | ack p50 / p99 ms | collector CPU \
         (cores) | collector RSS / peak MiB | broker CPU | client CPU | machine busy (cores) | of which others | \
         host steal |"
    );
    let _ = writeln!(out, "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let setups = rounds.first().map_or(0, |r| r.results.len());
    let mut medians: Vec<&VariantResult> = Vec::new();
    for v in 0..setups {
        let all: Vec<&VariantResult> = rounds.iter().filter_map(|r| r.results.get(v)).collect();
        let Some(r) = median_by(&all, VariantResult::rate) else {
            continue;
        };
        medians.push(r);
        let each: Vec<String> = all.iter().map(|r| stats::thousands(r.rate())).collect();
        let flags = if r.flags.is_empty() {
            String::new()
        } else {
            format!(" (`{}`)", r.flags.join(" "))
        };
        let _ = writeln!(
            out,
            "| collector: {}{flags} | {} | {} | {} | {:.1} | {:.1} / {:.1} | {:.2} | {:.0} / {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.label,
            stats::thousands(r.rate()),
            each.join(" / "),
            stats::thousands(r.tenants as f64 / r.seconds),
            r.bytes as f64 / r.seconds / 1_048_576.0,
            stats::ms_at(&r.ack, 0.5),
            stats::ms_at(&r.ack, 0.99),
            r.collector_cores,
            r.rss_kib as f64 / 1024.0,
            r.hwm_kib as f64 / 1024.0,
            r.broker_cores,
            r.client_cores,
            r.machine_cores,
            others(r.machine_cores, &[r.collector_cores, r.broker_cores, r.client_cores]),
            r.steal_cores,
        );
    }
    let tools: Vec<&ToolResult> = rounds.iter().filter_map(|r| r.tool.as_ref()).collect();
    let tool = median_by(&tools, |t| t.records_per_sec);
    if let Some(t) = tool {
        let each: Vec<String> = tools.iter().map(|t| stats::thousands(t.records_per_sec)).collect();
        let _ = writeln!(
            out,
            "| Kafka ProducerPerformance, `acks=all`, {} B records, {} partitions | {} | {} | – | {:.1} | (below) | – | – | {:.2} | {:.2} (the tool) | {:.2} | {:.2} | {:.2} |",
            t.record_size,
            t.partitions,
            stats::thousands(t.records_per_sec),
            each.join(" / "),
            t.mib_per_sec,
            t.broker_cores,
            t.tool_cores,
            t.machine_cores,
            others(t.machine_cores, &[t.tool_cores, t.broker_cores]),
            t.steal_cores,
        );
    }
    let _ = writeln!(out);
    if let (Some(t), Some(first)) = (tool, medians.first()) {
        let per_round: Vec<String> = rounds
            .iter()
            .filter_map(|r| {
                Some(format!(
                    "{:.2}",
                    r.results.first()?.rate() / r.tool.as_ref()?.records_per_sec
                ))
            })
            .collect();
        let _ = writeln!(
            out,
            "Collector ({}) batches/s ÷ the tool's records/s at the same record size, medians: **{:.2}×** \
             (each round: {}; target ≥ 0.5×). Tenant-usage records/s: **{}** (target ≥ 100,000).\n",
            first.label,
            first.rate() / t.records_per_sec,
            per_round.join(", "),
            stats::thousands(first.tenants as f64 / first.seconds),
        );
        let _ = writeln!(
            out,
            "Each round the tool sent as many records as the collector's first setup acked while measured, to \
             a fresh topic. Its summary lines:\n\n```"
        );
        for t in &tools {
            let _ = writeln!(out, "{}", t.summary.trim());
        }
        let _ = writeln!(out, "```\n");
    }
    let _ = writeln!(
        out,
        "The collector's own counters over each measured interval (from its `/metrics`): batches it \
         accepted, and what its autoscaler, a consumer of the same usage topic in the same process, read \
         of them.\n"
    );
    let _ = writeln!(
        out,
        "| setup | round | accepted | autoscaler read | skipped (too old) | decisions published |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|");
    let show = |v: Option<f64>| v.map_or("–".to_owned(), stats::thousands);
    for v in 0..setups {
        for (i, round) in rounds.iter().enumerate() {
            let Some(r) = round.results.get(v) else {
                continue;
            };
            let a = r.autoscaler;
            let read = match (a.read, a.accepted) {
                (Some(read), Some(accepted)) if accepted > 0.0 => {
                    format!("{} ({:.1} %)", stats::thousands(read), 100.0 * read / accepted)
                }
                (read, _) => show(read),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.label,
                i + 1,
                show(a.accepted),
                read,
                show(a.skipped),
                show(a.decisions)
            );
        }
    }
    let _ = writeln!(out);
    let mut problems = BTreeMap::new();
    for r in rounds.iter().flat_map(|r| &r.results) {
        if r.rejects > 0 || r.streams_failed > 0 {
            let p = problems.entry(r.label.clone()).or_insert((0, 0, None));
            p.0 += r.rejects;
            p.1 += r.streams_failed;
            if p.2.is_none() {
                p.2.clone_from(&r.first_reject);
            }
        }
    }
    if problems.is_empty() {
        let _ = writeln!(out, "Every batch sent was acked: no rejects, no failed streams.\n");
    } else {
        for (label, (rejects, failed, first)) in problems {
            let _ = writeln!(
                out,
                "**{label}**: {rejects} rejects (first: {}), {failed} streams failed\n",
                first.as_deref().unwrap_or("–")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tools_summary() {
        let line = "500000 records sent, 41256.7 records/sec (99.87 MB/sec), 150.21 ms avg latency, \
                    612.00 ms max latency, 140 ms 50th, 300 ms 95th, 400 ms 99th, 600 ms 99.9th.";
        assert_eq!(parse_summary(line), Some((41256.7, 99.87)));
        assert_eq!(parse_summary("nothing here"), None);
    }

    #[test]
    fn batches_are_valid_and_have_distinct_tenants() {
        for index in [0, 1, 99, 100, 999] {
            let mut batch = template(100, 20, index);
            batch.window_end_unix_micros = now_micros();
            batch.window_start_unix_micros = batch.window_end_unix_micros - 250_000;
            assert_eq!(tidemark_core::batch::validate(&batch), Ok(()), "{index}");
            assert_eq!(batch.tenants.len(), 20);
        }
        assert_eq!(template(100, 20, 7).service, "svc-007");
        assert_eq!(template(100, 20, 107).instance, "svc-007-1");
    }
}
