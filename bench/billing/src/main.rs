//! Billing benchmark (run it through `bench/billing/run`, see README.md):
//!
//! 1. throughput: a fresh topic pre-filled with usage batches, then the
//!    release `tidemark-billing` reading it from the start into SQLite and
//!    into Postgres, timed by its `batches_counted` metric; Kafka's own
//!    `ConsumerPerformance` reads the same topic as the baseline;
//! 2. lag: batches produced at a steady rate while billing runs; per batch,
//!    the time from its send to the first poll (every 50 ms) of the store's
//!    committed offsets that covers it;
//! 3. query: a store filled through `Store::commit` (not through Kafka) with
//!    90 days of windows, then `GET /v1/usage?window=hour` for one tenant
//!    over the 90 days, one request at a time;
//! 4. revenue: a store filled in SQL with a month of usage, then billing's
//!    open-period revenue refresh over it, step by step, while a probe
//!    queries the store (`revenue.rs`).
//!
//! Prints a markdown report on stdout and progress on stderr.

mod revenue;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidemark_bench_support::procs::{CpuMeter, Proc, clock_ticks, unique_name};
use tidemark_bench_support::stats::{histogram, median, ms_at, record, thousands};
use tidemark_billing::store::{CommitClock, Store};
use tidemark_core::{TenantUsage, UsageBatch};
use tidemark_log::kafka::KafkaConfig;
use tidemark_log::topics::{USAGE_TOPIC_SPEC, encode_usage};
use tidemark_log::{Log, LogConfig};

const MICROS_PER_MINUTE: i64 = 60_000_000;
const DAY_MICROS: i64 = 24 * 60 * MICROS_PER_MINUTE;

#[derive(Debug, Parser)]
#[command(name = "tidemark-bench-billing")]
struct Args {
    /// Directory holding the release `tidemark-billing`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    #[arg(long)]
    kafka_brokers: String,
    /// Classpath of Kafka's tools (`scripts/kafka perf-classpath`); without it no baseline runs.
    #[arg(long)]
    kafka_classpath: Option<String>,
    /// log4j2 config for the Kafka tools.
    #[arg(long)]
    kafka_tools_log4j: Option<PathBuf>,
    /// Admin URL of a Postgres server where fresh databases may be created
    /// (`scripts/postgres env`); without it only SQLite runs.
    #[arg(long)]
    postgres_url: Option<String>,
    /// Where SQLite files and process logs go.
    #[arg(long)]
    work_dir: PathBuf,

    /// Usage batches pre-filled for the throughput runs.
    #[arg(long, default_value_t = 100_000)]
    batches: u64,
    /// Tenant entries (records) per batch.
    #[arg(long, default_value_t = 20)]
    tenants: usize,
    /// Services (each one sidecar session, and the log key) batches come from.
    #[arg(long, default_value_t = 32)]
    services: usize,
    /// Billing processes run one after another over the pre-filled topic, per
    /// store (each with a fresh database and group): how a commit's batches
    /// spread over partitions, so over services and rows, differs from run to run.
    #[arg(long, default_value_t = 3)]
    throughput_runs: usize,
    /// Give up waiting for billing to count the pre-filled topic after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "180s")]
    throughput_timeout: Duration,

    /// Steady rate of the lag run, batches per second.
    #[arg(long, default_value_t = 2_500)]
    lag_rate: u64,
    /// How long the lag run is measured (after `--lag-warmup`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    lag_duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    lag_warmup: Duration,

    /// Records (tenant entries) committed for the query run.
    #[arg(long, default_value_t = 10_000_000)]
    query_records: u64,
    /// Stop filling the query store after this long (what was reached is reported).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "600s")]
    fill_budget: Duration,
    /// Tenants in the query store (every batch carries `--tenants` of them).
    #[arg(long, default_value_t = 20)]
    query_tenant_pool: usize,
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Also fill and query a Postgres store (slower to fill than SQLite).
    #[arg(long)]
    query_postgres: bool,

    /// Revenue run: tenants with a row at every minute of the month.
    #[arg(long, default_value_t = 20)]
    revenue_heavy_tenants: usize,
    /// Revenue run: tenants with a row at one minute an hour.
    #[arg(long, default_value_t = 1000)]
    revenue_light_tenants: usize,

    /// An extra flag for every billing process, as `--billing-arg=--parallel-commits=3`
    /// (repeatable); the runs use billing's defaults otherwise.
    #[arg(long, allow_hyphen_values = true)]
    billing_arg: Vec<String>,

    /// Phases to skip: throughput, lag, query, revenue.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "Postgres",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(run(args))?;
    print!("{report}");
    Ok(())
}

fn backends(args: &Args) -> Vec<Backend> {
    let mut b = vec![Backend::Sqlite];
    if args.postgres_url.is_some() {
        b.push(Backend::Postgres);
    }
    b
}

async fn run(args: Args) -> anyhow::Result<String> {
    std::fs::create_dir_all(&args.work_dir)?;
    // Kafka is opened for the first phase that uses it.
    let log = tokio::sync::OnceCell::new();
    let kafka = || {
        Log::open(LogConfig::Kafka(KafkaConfig {
            brokers: args.kafka_brokers.clone(),
            properties: vec![],
        }))
    };
    if let Some(admin) = &args.postgres_url {
        drop_earlier_databases(admin).await?;
    }
    let mut out = String::new();
    if !args.billing_arg.is_empty() {
        let _ = writeln!(
            out,
            "Every billing process ran with `{}`.\n",
            args.billing_arg.join(" ")
        );
    }
    if !args.skip.iter().any(|s| s == "throughput") {
        out += &throughput(&args, log.get_or_try_init(kafka).await?).await?;
    }
    if !args.skip.iter().any(|s| s == "lag") {
        out += &lag(&args, log.get_or_try_init(kafka).await?).await?;
    }
    if !args.skip.iter().any(|s| s == "query") {
        out += &query(&args).await?;
    }
    if !args.skip.iter().any(|s| s == "revenue") {
        out += &revenue::revenue(&args).await?;
    }
    Ok(out)
}

/// One batch: `tenants` entries of realistic usage (requests, duration,
/// bytes in and out: four meters, so four rollup rows per entry and minute).
fn batch(
    service: usize,
    session: &str,
    seq: u64,
    window_start: i64,
    window_micros: i64,
    tenants: usize,
    pool: usize,
) -> UsageBatch {
    let first = (seq as usize).wrapping_mul(7) % pool;
    let tenants = (0..tenants)
        .map(|j| {
            let requests = 50 + (seq + j as u64) % 50;
            TenantUsage {
                tenant: format!("tenant-{:04}", (first + j) % pool),
                requests,
                duration_micros: requests * 1_800,
                billed_duration_micros: 0,
                bytes_in: requests * 300,
                bytes_out: requests * 2_000,
                responses_2xx: requests,
                ..TenantUsage::default()
            }
        })
        .collect();
    UsageBatch {
        service: format!("svc-{service:02}"),
        instance: format!("svc-{service:02}-0"),
        session_id: session.to_owned(),
        seq,
        window_start_unix_micros: window_start,
        window_end_unix_micros: window_start + window_micros,
        tenants,
        ..UsageBatch::default()
    }
}

fn sessions(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

// ------------------------------------------------------------------ throughput

async fn throughput(args: &Args, log: &Log) -> anyhow::Result<String> {
    let topic = unique_name("tidemark.usage.bench-billing");
    log.ensure_topic(&topic, USAGE_TOPIC_SPEC).await?;
    let sessions = sessions(args.services);
    let now = tidemark_core::window::now_micros();
    // Windows of one second in the last minute, so none is late when counted.
    let base = now - 60_000_000;
    eprintln!("[bench] filling {topic} with {} batches", args.batches);
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut payload_bytes = 0u64;
    for i in 0..args.batches {
        let s = (i % args.services as u64) as usize;
        let seq = i / args.services as u64;
        let b = batch(
            s,
            &sessions[s],
            seq,
            base + (seq % 60) as i64 * 1_000_000,
            1_000_000,
            args.tenants,
            200,
        );
        let (key, payload) = encode_usage(&b);
        payload_bytes += payload.len() as u64;
        let log = log.clone();
        let topic = topic.clone();
        tasks.spawn(async move { log.append(&topic, &key, payload).await });
        while tasks.len() >= 20_000 {
            if let Some(r) = tasks.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let fill_secs = began.elapsed().as_secs_f64();
    let records = args.batches * args.tenants as u64;
    let avg_payload = payload_bytes / args.batches.max(1);
    eprintln!("[bench] filled in {fill_secs:.1} s");

    let mut out = String::new();
    let _ = writeln!(out, "## Throughput: pre-filled topic into committed rollups\n");
    let _ = writeln!(
        out,
        "Topic `{topic}`: 8 partitions, {} batches × {} tenants = {} records (protobuf, {avg_payload} B per batch \
         on average), from {} services (one session each, key = service), 4 meters per tenant entry, 200 tenants, \
         1 s windows in the minute before the fill. Filled by `tidemark_log::Log` (acks=all, idempotent) in \
         {fill_secs:.1} s ({} batches/s). Billing starts after the fill and reads the topic from the start; the \
         time runs from the billing process start to `tidemark_billing_batches_counted_total` = {} (polled every \
         100 ms); \"steady\" is from its first commit to its last. Default `--commit-interval 1s`; a commit is \
         forced every 10,000 batches; on Postgres a commit is split into 2 transactions written at once \
         (`--parallel-commits 2`), so the commits column counts transactions.\n",
        thousands(args.batches as f64),
        args.tenants,
        thousands(records as f64),
        args.services,
        thousands(args.batches as f64 / fill_secs),
        thousands(args.batches as f64),
    );
    let _ = writeln!(
        out,
        "| reader | batches/s (whole) | records/s (whole) | records/s (steady, first to last commit) | time | commits | \
         CPU: reader / broker / machine (cores) |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|---|");
    if let Some(row) = consumer_perf(args, &topic, args.batches).await? {
        let _ = writeln!(out, "{row}");
    }
    let mut notes = String::new();
    for backend in backends(args) {
        let mut steady = Vec::new();
        for run in 1..=args.throughput_runs.max(1) {
            let url = database_url(args, backend, "tp").await?;
            let (row, note, records_per_s) = billing_throughput(args, backend, run, &url, &topic, args.batches).await?;
            let _ = writeln!(out, "{row}");
            notes += &note;
            steady.extend(records_per_s);
        }
        steady.sort_by(f64::total_cmp);
        if let (Some(low), Some(high)) = (steady.first(), steady.last()) {
            notes += &format!(
                "- {}: median of {} runs, steady: **{} records/s** (from {} to {}).\n",
                backend.name(),
                steady.len(),
                thousands(median(&steady)),
                thousands(*low),
                thousands(*high),
            );
        }
    }
    let _ = writeln!(out, "\n{notes}");
    Ok(out)
}

/// Drops the databases earlier runs left on the benchmark's Postgres
/// server (each run keeps its own until the next, to look into).
async fn drop_earlier_databases(admin: &str) -> anyhow::Result<()> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .with_context(|| format!("cannot reach Postgres at {admin}"))?;
    let names = sqlx::query("SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_billing\\_%'")
        .fetch_all(&mut conn)
        .await?;
    for row in names {
        let name: String = row.try_get(0)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

/// A fresh database for `backend`: a new SQLite file, or a new Postgres database.
async fn database_url(args: &Args, backend: Backend, what: &str) -> anyhow::Result<String> {
    let name = format!("bench_billing_{what}_{}", uuid::Uuid::new_v4().simple());
    match backend {
        Backend::Sqlite => Ok(format!("sqlite:{}", args.work_dir.join(format!("{name}.db")).display())),
        Backend::Postgres => {
            use sqlx::Connection;
            let admin = args.postgres_url.as_deref().context("no --postgres-url")?;
            let mut conn = sqlx::PgConnection::connect(admin)
                .await
                .with_context(|| format!("cannot reach Postgres at {admin}"))?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await?;
            let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
            Ok(format!("{base}/{name}"))
        }
    }
}

fn start_billing(args: &Args, name: &str, url: &str, topic: &str, group: &str) -> anyhow::Result<Proc> {
    let bin = args.bin_dir.join("tidemark-billing");
    let argv: Vec<String> = [
        "--kafka-brokers",
        &args.kafka_brokers,
        "--usage-topic",
        topic,
        "--group",
        group,
        "--database-url",
        url,
        "--api-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(args.billing_arg.iter().cloned())
    .collect();
    Proc::start(name, &bin, &argv, Some(&args.work_dir))
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(client: &HttpClient, url: &str) -> anyhow::Result<(u16, Bytes)> {
    let response = client.get(url.parse()?).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn counted(client: &HttpClient, admin: SocketAddr) -> anyhow::Result<u64> {
    let (_, body) = get(client, &format!("http://{admin}/metrics")).await?;
    let text = String::from_utf8_lossy(&body);
    Ok(metric(&text, "tidemark_billing_batches_counted_total").unwrap_or(0))
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

fn broker_pid() -> Option<u32> {
    let dir = std::env::var("TIDEMARK_KAFKA_DIR").ok()?;
    std::fs::read_to_string(Path::new(&dir).join("kafka.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One billing process reading the whole pre-filled topic: its table row,
/// a note, and its steady records/s.
async fn billing_throughput(
    args: &Args,
    backend: Backend,
    run: usize,
    url: &str,
    topic: &str,
    batches: u64,
) -> anyhow::Result<(String, String, Option<f64>)> {
    let group = unique_name("bench-billing");
    let started = Instant::now();
    let mut proc = start_billing(
        args,
        &format!("billing-throughput-{}-{run}", backend.name()),
        url,
        topic,
        &group,
    )?;
    let admin = proc.address("metrics, healthz, readyz")?;
    let mut pids = vec![proc.pid()];
    pids.extend(broker_pid());
    let cpu = CpuMeter::start(clock_ticks(), &pids);
    let client = http_client();
    let mut first: Option<(Instant, u64)> = None;
    let mut last_change = (Instant::now(), 0u64);
    let mut done = None;
    while started.elapsed() < args.throughput_timeout {
        proc.check_alive()?;
        let n = counted(&client, admin).await.unwrap_or(0);
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n != last_change.1 {
            last_change = (now, n);
        }
        if n >= batches {
            done = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Cores the hypervisor stole count as busy in this report's machine column.
    let (per, busy, steal) = cpu.read();
    let machine = busy + steal;
    let metrics = get(&client, &format!("http://{admin}/metrics")).await.map(|(_, b)| b);
    let commits = metrics
        .as_ref()
        .ok()
        .and_then(|b| metric(&String::from_utf8_lossy(b), "tidemark_billing_ledger_commits_total"));
    proc.stop();
    let end = done.unwrap_or(last_change.0);
    let n = last_change.1;
    let whole = end.duration_since(started).as_secs_f64();
    let steady = first.map(|(t, n0)| (n.saturating_sub(n0)) as f64 / end.duration_since(t).as_secs_f64().max(1e-9));
    let tenants = args.tenants as f64;
    let row = format!(
        "| tidemark-billing → {}, run {run} | {} | {} | {} | {whole:.1} s{} | {} | {:.2} / {:.2} / {:.2} |",
        backend.name(),
        thousands(n as f64 / whole),
        thousands(n as f64 * tenants / whole),
        steady.map_or("–".into(), |s| thousands(s * tenants)),
        if done.is_none() {
            format!(
                " (timed out at {} of {} batches)",
                thousands(n as f64),
                thousands(batches as f64)
            )
        } else {
            String::new()
        },
        commits.map_or("–".into(), |c| thousands(c as f64)),
        per.first().copied().unwrap_or(f64::NAN),
        per.get(1).copied().unwrap_or(f64::NAN),
        machine,
    );
    let note = format!(
        "- {}, run {run}: first commit {:.1} s after the process started (store open, group join, first fetch).\n",
        backend.name(),
        first.map_or(f64::NAN, |(t, _)| t.duration_since(started).as_secs_f64())
    );
    Ok((row, note, steady.map(|s| s * tenants)))
}

/// Kafka's ConsumerPerformance reading the whole topic: records/s as the tool reports it.
async fn consumer_perf(args: &Args, topic: &str, batches: u64) -> anyhow::Result<Option<String>> {
    let Some(classpath) = &args.kafka_classpath else {
        return Ok(None);
    };
    let mut command = std::process::Command::new("java");
    command.args(["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true"]);
    if let Some(log4j) = &args.kafka_tools_log4j {
        command.arg(format!("-Dlog4j2.configurationFile={}", log4j.display()));
    }
    let group = unique_name("bench-billing-perf");
    command.args(["-cp", classpath, "org.apache.kafka.tools.ConsumerPerformance"]);
    command.args([
        "--bootstrap-server",
        &args.kafka_brokers,
        "--topic",
        topic,
        "--messages",
        &batches.to_string(),
        "--group",
        &group,
        "--timeout",
        "60000",
    ]);
    eprintln!("[bench] running ConsumerPerformance on {topic}");
    let began = Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    let wall = began.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "ConsumerPerformance failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms,
    // fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.split(',').count() >= 10)
        .with_context(|| format!("no summary line from ConsumerPerformance:\n{stdout}"))?;
    let f: Vec<&str> = line.split(',').map(str::trim).collect();
    let n: f64 = f[4].parse().unwrap_or(f64::NAN);
    let per_sec: f64 = f[5].parse().unwrap_or(f64::NAN);
    let fetch_per_sec: f64 = f[9].parse().unwrap_or(f64::NAN);
    let tenants = args.tenants as f64;
    Ok(Some(format!(
        "| Kafka ConsumerPerformance (baseline: reads and discards, {} of {} batches) | {} | {} | {} (fetch time only, \
         after its {} ms rebalance) | {wall:.1} s (JVM included) | – | – |",
        thousands(n),
        thousands(batches as f64),
        thousands(per_sec),
        thousands(per_sec * tenants),
        thousands(fetch_per_sec * tenants),
        f[6],
    )))
}

// ------------------------------------------------------------------ lag

async fn lag(args: &Args, log: &Log) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Lag at a steady {} records/s\n",
        thousands((args.lag_rate as usize * args.tenants) as f64)
    );
    let _ = writeln!(
        out,
        "{} batches/s × {} tenants, produced by `tidemark_log::Log` for {} s of warmup then {} s measured, \
         while billing runs. Lag per batch = the first poll of the store's `log_offset` (every 50 ms, from this \
         process) that covers the batch's offset − the moment its send began (so it includes the produce \
         acknowledgement, up to one commit interval of 1 s, the commit, and up to 50 ms of polling).\n",
        thousands(args.lag_rate as f64),
        args.tenants,
        args.lag_warmup.as_secs(),
        args.lag_duration.as_secs(),
    );
    let _ = writeln!(
        out,
        "| store | batches measured | committed | achieved rate, records/s | lag p50 | p99 | max | billing CPU (cores) |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|");
    for backend in backends(args) {
        let _ = writeln!(out, "{}", lag_one(args, log, backend).await?);
    }
    out.push('\n');
    Ok(out)
}

/// When the poller read the store's committed offsets, and what they were.
type Poll = (Instant, HashMap<i32, i64>);

async fn lag_one(args: &Args, log: &Log, backend: Backend) -> anyhow::Result<String> {
    let topic = unique_name("tidemark.usage.bench-billing-lag");
    log.ensure_topic(&topic, USAGE_TOPIC_SPEC).await?;
    let url = database_url(args, backend, "lag").await?;
    let group = unique_name("bench-billing-lag");
    let mut proc = start_billing(args, &format!("billing-lag-{}", backend.name()), &url, &topic, &group)?;
    proc.address("metrics, healthz, readyz")?;
    let store = Store::open(&url).await?;
    let cpu = CpuMeter::start(clock_ticks(), &[proc.pid()]);

    // Poller: (time, next offsets) every 50 ms until told to stop.
    let polls: Arc<Mutex<Vec<Poll>>> = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let poller = {
        let polls = Arc::clone(&polls);
        let stop = Arc::clone(&stop);
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Ok(o) = store.offsets(&topic).await {
                            polls.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), o));
                        }
                    }
                    () = stop.notified() => return,
                }
            }
        })
    };

    let sessions = sessions(args.services);
    let sent: Arc<Mutex<Vec<(i32, i64, Instant)>>> = Arc::default();
    let total = args.lag_warmup + args.lag_duration;
    let began = Instant::now();
    let measured_from = began + args.lag_warmup;
    let mut n = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    loop {
        tick.tick().await;
        let elapsed = began.elapsed();
        if elapsed >= total {
            break;
        }
        let due = (elapsed.as_secs_f64() * args.lag_rate as f64) as u64;
        while n < due {
            let s = (n % args.services as u64) as usize;
            let seq = n / args.services as u64;
            let now = tidemark_core::window::now_micros();
            let b = batch(s, &sessions[s], seq, now - 1_000_000, 1_000_000, args.tenants, 200);
            let (key, payload) = encode_usage(&b);
            let log = log.clone();
            let topic = topic.clone();
            let sent = Arc::clone(&sent);
            tasks.spawn(async move {
                let at = Instant::now();
                let pos = log.append(&topic, &key, payload).await?;
                sent.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((pos.partition, pos.offset, at));
                Ok::<_, anyhow::Error>(())
            });
            n += 1;
        }
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let produce_secs = began.elapsed().as_secs_f64();
    // Wait for billing to commit everything (up to 30 s).
    let wait_until = Instant::now() + Duration::from_secs(30);
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|e| e.into_inner()));
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for &(p, o, _) in &sent {
        let e = ends.entry(p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    loop {
        let caught_up = polls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .is_some_and(|(_, o)| ends.iter().all(|(p, e)| o.get(p).copied().unwrap_or(0) >= *e));
        if caught_up || Instant::now() > wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (per, _, _) = cpu.read();
    stop.notify_one();
    poller.await?;
    proc.stop();
    let polls = std::mem::take(&mut *polls.lock().unwrap_or_else(|e| e.into_inner()));

    let mut h = histogram();
    let mut measured = 0u64;
    let mut committed = 0u64;
    for &(p, o, at) in &sent {
        if at < measured_from {
            continue;
        }
        measured += 1;
        // Offsets only grow: the first poll covering (p, o).
        let i = polls.partition_point(|(_, offs)| offs.get(&p).copied().unwrap_or(0) <= o);
        if let Some((t, _)) = polls.get(i) {
            committed += 1;
            record(&mut h, t.saturating_duration_since(at));
        }
    }
    let rate = n as f64 * args.tenants as f64 / produce_secs;
    Ok(format!(
        "| {} | {} | {}{} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} |",
        backend.name(),
        thousands(measured as f64),
        thousands(committed as f64),
        if committed < measured {
            " (**not all within 30 s after**)"
        } else {
            ""
        },
        thousands(rate),
        ms_at(&h, 0.5),
        ms_at(&h, 0.99),
        h.max() as f64 / 1000.0,
        per.first().copied().unwrap_or(f64::NAN),
    ))
}

// ------------------------------------------------------------------ query

async fn query(args: &Args) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(out, "## Usage query: one tenant, 90 days, by hour\n");
    let mut backends = vec![Backend::Sqlite];
    if args.query_postgres && args.postgres_url.is_some() {
        backends.push(Backend::Postgres);
    }
    let mut rows = Vec::new();
    let mut notes = String::new();
    for backend in backends {
        let (row, note) = query_one(args, backend).await?;
        rows.push(row);
        notes += &note;
    }
    out += &notes;
    let _ = writeln!(
        out,
        "\n| store | records committed | rollup rows (minute) | the tenant's minute / hourly rows | response | p50 | p99 | max |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let _ = writeln!(out, "{r}");
    }
    out.push('\n');
    Ok(out)
}

async fn query_one(args: &Args, backend: Backend) -> anyhow::Result<(String, String)> {
    let url = database_url(args, backend, "query").await?;
    let store = Store::open(&url).await?;
    let pool = args.query_tenant_pool.max(args.tenants);
    let batches_wanted = args.query_records.div_ceil(args.tenants as u64);
    // 90 days ending at the last whole hour.
    let to = tidemark_core::window::now_micros() / (60 * MICROS_PER_MINUTE) * (60 * MICROS_PER_MINUTE);
    let from = to - 90 * DAY_MICROS;
    let span = to - from;
    let services = 4usize;
    let sessions = sessions(services);
    let clock = CommitClock {
        now_micros: tidemark_core::window::now_micros(),
        gap_grace_micros: i64::MAX,
        late_after_micros: i64::MAX,
    };
    eprintln!(
        "[bench] filling the {} query store: {batches_wanted} batches through Store::commit",
        backend.name()
    );
    let began = Instant::now();
    let mut committed_batches = 0u64;
    let mut offset = 0i64;
    const PER_COMMIT: u64 = 10_000;
    while committed_batches < batches_wanted && began.elapsed() < args.fill_budget {
        let chunk: Vec<UsageBatch> = (committed_batches..(committed_batches + PER_COMMIT).min(batches_wanted))
            .map(|i| {
                let s = (i % services as u64) as usize;
                let seq = i / services as u64;
                // Spread evenly over the 90 days, oldest first.
                let start = from + (i128::from(span) * i128::from(i) / i128::from(batches_wanted)) as i64;
                batch(s, &sessions[s], seq, start, 10_000_000, args.tenants, pool)
            })
            .collect();
        offset += chunk.len() as i64;
        store.commit("bench-fill", &chunk, &[(0, offset)], clock).await?;
        committed_batches += chunk.len() as u64;
        if committed_batches.is_multiple_of(100_000) {
            eprintln!(
                "[bench]   {committed_batches} batches in {:.0} s",
                began.elapsed().as_secs_f64()
            );
        }
    }
    let fill_secs = began.elapsed().as_secs_f64();
    let records = committed_batches * args.tenants as u64;
    let tenant = "tenant-0000";
    let (all_rows, tenant_rows, tenant_hours) = row_counts(&url, tenant).await.unwrap_or((-1, -1, -1));
    drop(store);
    let note = format!(
        "- {}: {} batches × {} tenants = {} records committed through `Store::commit` (10,000 batches per \
         transaction, as the ledger's forced commit; **not through Kafka**) in {fill_secs:.0} s ({} records/s){}; \
         {pool} tenants, {services} services, 10 s windows spread evenly over the 90 days up to {}, four meters per \
         entry; `{tenant}` queried.\n",
        backend.name(),
        thousands(committed_batches as f64),
        args.tenants,
        thousands(records as f64),
        thousands(records as f64 / fill_secs),
        if committed_batches < batches_wanted {
            format!(
                " (**stopped by the {} s fill budget**, short of {})",
                args.fill_budget.as_secs(),
                thousands(args.query_records as f64)
            )
        } else {
            String::new()
        },
        rfc3339(to),
    );

    // The API of a real billing process over that store.
    let mut proc = start_billing(
        args,
        &format!("billing-query-{}", backend.name()),
        &url,
        &unique_name("tidemark.usage.bench-billing-query"),
        &unique_name("bench-billing-query"),
    )?;
    let api = proc.address("billing HTTP API")?;
    let client = http_client();
    let uri = format!(
        "http://{api}/v1/usage?tenant={tenant}&window=hour&from={}&to={}",
        rfc3339(from),
        rfc3339(to)
    );
    let mut size = 0usize;
    for _ in 0..5 {
        let (status, body) = get(&client, &uri).await?;
        if status != 200 {
            bail!("GET {uri}: {status}: {}", String::from_utf8_lossy(&body));
        }
        size = body.len();
    }
    let mut h = histogram();
    for _ in 0..args.queries {
        let t = Instant::now();
        let (status, body) = get(&client, &uri).await?;
        record(&mut h, t.elapsed());
        if status != 200 {
            bail!("GET {uri}: {status}");
        }
        size = body.len();
    }
    proc.stop();
    let row = format!(
        "| {} | {} | {} | {} / {} | {} KiB | {:.1} ms | {:.1} ms | {:.1} ms |",
        backend.name(),
        thousands(records as f64),
        thousands(all_rows as f64),
        thousands(tenant_rows as f64),
        thousands(tenant_hours as f64),
        size / 1024,
        ms_at(&h, 0.5),
        ms_at(&h, 0.99),
        h.max() as f64 / 1000.0,
    );
    let note = format!(
        "{note}  `GET {}` {} times after 5 unmeasured, one at a time over one keep-alive connection.\n",
        uri.split_once(&format!("{api}")).map_or(uri.as_str(), |(_, r)| r),
        args.queries
    );
    Ok((row, note))
}

/// Minute rows in all, and the tenant's minute and hourly rows.
async fn row_counts(url: &str, tenant: &str) -> anyhow::Result<(i64, i64, i64)> {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await?;
    let all: i64 = sqlx::query("SELECT COUNT(*) FROM usage_rollup")
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    let one: i64 = sqlx::query("SELECT COUNT(*) FROM usage_rollup WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    let hours: i64 = sqlx::query("SELECT COUNT(*) FROM usage_rollup_hour WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    Ok((all, one, hours))
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map_or_else(|| micros.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}
