//! The autoscaler at work: a consumer-group member on the usage topic that
//! feeds every batch to its service's [`ServiceScaler`], decides at once, and
//! appends each new decision to the decisions topic.
//!
//! - **When it decides.** On every batch that arrives, for that batch's
//!   service, and on a short tick for every service this member owns, so
//!   that silence (instances gone, load fallen to zero) is noticed too. A
//!   service with hundreds of instances sends thousands of batches a second:
//!   within [`MIN_DECISION_GAP`] of its last decision a batch only marks its
//!   service, which is then decided on the next [`QUICK_TICK`]. A load step
//!   is acted on at most that much later, and a decision costs one pass over
//!   the service's windows however many batches arrive.
//! - **What it publishes.** A decision whenever the replica count or the mode
//!   changes, and the first decision of a service it has not seen decided.
//! - **Who owns a service.** The member whose assignment holds the
//!   partition the service's batches land in (the usage topic is keyed by
//!   service). On the tick a member decides only for services in partitions
//!   it holds now, so after a rebalance the old owner falls silent instead
//!   of scaling down a service whose batches it no longer sees. A new owner
//!   resumes from the replica count on the decision board.
//! - **Old batches.** A batch the log stored longer ago than the service's
//!   stable window cannot change a decision; after a restart those are
//!   skipped rather than replayed.
//! - **Policy reloads.** The scaling config file is re-read when its
//!   modification time changes; a file that fails to load is reported and
//!   the running policies stay.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tidemark_core::window::now_micros;
use tidemark_log::topics::decode_usage;
use tidemark_log::{Consumer, Log, LogError, Record};
use tidemark_proto::v1::{ScalingDecision, UsageBatch};
use tidemark_runtime::shutdown::Shutdown;

use super::load::Observation;
use super::policy::micros;
use super::scaler::{Decision, ServiceScaler};
use crate::board::DecisionBoard;
use crate::decisions;
use crate::scaling_config::ScalingConfig;

/// How often every owned service is decided even without new batches.
pub const TICK: Duration = Duration::from_millis(500);
/// Shortest time between two decisions of one service on batch arrival.
pub const MIN_DECISION_GAP: Duration = Duration::from_millis(50);
/// How often services marked by batches that came within the gap are decided.
pub const QUICK_TICK: Duration = MIN_DECISION_GAP;
/// How often consumed offsets are committed to the group.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum AutoscalerError {
    #[error("usage log: {0}")]
    Log(#[from] LogError),
}

/// Where the autoscaler reads and writes.
#[derive(Debug, Clone)]
pub struct AutoscalerSettings {
    pub usage_topic: String,
    pub decisions_topic: String,
    pub group: String,
    /// The scaling config file; `None` scales every service by the defaults.
    pub config_path: Option<PathBuf>,
}

/// The autoscaler's metrics, registered once.
#[derive(Debug, Clone, Default)]
pub struct AutoscalerTelemetry {
    pub batches: Counter,
    pub batches_skipped: Counter,
    pub decisions: Counter,
    pub config_reload_errors: Counter,
    pub desired_replicas: Family<ServiceLabel, Gauge>,
    pub instances_reporting: Family<ServiceLabel, Gauge>,
    pub panic_mode: Family<ServiceLabel, Gauge>,
}

/// Labels of the per-service gauges. Services are the operator's own, few
/// and named by validated names, so the label set stays bounded.
pub type ServiceLabel = Vec<(&'static str, String)>;

impl AutoscalerTelemetry {
    pub fn register(registry: &mut Registry) -> AutoscalerTelemetry {
        let t = AutoscalerTelemetry::default();
        let r = registry.sub_registry_with_prefix("tidemark_autoscaler");
        r.register("batches", "Usage batches fed to the autoscaler", t.batches.clone());
        r.register(
            "batches_skipped",
            "Usage batches skipped: undecodable, or older than their service's stable window",
            t.batches_skipped.clone(),
        );
        r.register("decisions", "Scaling decisions published", t.decisions.clone());
        r.register(
            "config_reload_errors",
            "Reloads of the scaling config that failed (the running policies stay)",
            t.config_reload_errors.clone(),
        );
        r.register(
            "desired_replicas",
            "Replicas the latest decision asks for, per service",
            t.desired_replicas.clone(),
        );
        r.register(
            "instances_reporting",
            "Instances whose reports are current, per service",
            t.instances_reporting.clone(),
        );
        r.register(
            "panic_mode",
            "1 while the service's autoscaler is in panic mode",
            t.panic_mode.clone(),
        );
        t
    }
}

/// One service's scaler and what it last published.
#[derive(Debug)]
struct Service {
    scaler: ServiceScaler,
    partition: i32,
    /// When it was last decided, µs since the epoch.
    decided_at: i64,
    /// Batches arrived since the last decision.
    dirty: bool,
    published: Option<(u32, String)>,
    desired: Gauge,
    reporting: Gauge,
    panic: Gauge,
}

#[derive(Debug)]
pub struct Autoscaler {
    log: Log,
    consumer: Consumer,
    settings: AutoscalerSettings,
    config: ScalingConfig,
    config_mtime: Option<SystemTime>,
    board: Arc<DecisionBoard>,
    /// Every decision as computed, published or not: the current load and
    /// explanation, for views in this process.
    live: Arc<DecisionBoard>,
    services: HashMap<String, Service>,
    next_offsets: BTreeMap<i32, i64>,
    telemetry: AutoscalerTelemetry,
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Autoscaler {
    /// Joins the autoscaler group. `config` is the scaling config as loaded
    /// from `settings.config_path`; `board` supplies the replica counts to
    /// resume from.
    pub async fn start(
        log: Log,
        settings: AutoscalerSettings,
        config: ScalingConfig,
        board: Arc<DecisionBoard>,
        live: Arc<DecisionBoard>,
        telemetry: AutoscalerTelemetry,
    ) -> Result<Autoscaler, AutoscalerError> {
        let config_mtime = settings.config_path.as_ref().and_then(modified);
        let consumer = log.consumer(&settings.usage_topic, &settings.group).await?;
        Ok(Autoscaler {
            log,
            consumer,
            settings,
            config,
            config_mtime,
            board,
            live,
            services: HashMap::new(),
            next_offsets: BTreeMap::new(),
            telemetry,
        })
    }

    /// Runs until `shutdown` fires, then commits what it consumed.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), AutoscalerError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quick = tokio::time::interval(QUICK_TICK);
        quick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commit = tokio::time::interval(COMMIT_INTERVAL);
        commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                record = self.consumer.recv() => self.on_record(record?).await?,
                _ = tick.tick() => {
                    self.reload_if_changed();
                    self.decide_owned(false).await?;
                }
                _ = quick.tick() => self.decide_owned(true).await?,
                _ = commit.tick() => self.commit().await?,
                () = shutdown.wait() => break,
            }
        }
        self.commit().await
    }

    async fn on_record(&mut self, record: Record) -> Result<(), AutoscalerError> {
        self.next_offsets.insert(record.partition, record.offset + 1);
        let batch = match decode_usage(&record.payload) {
            Ok(batch) => batch,
            Err(e) => {
                self.telemetry.batches_skipped.inc();
                tracing::warn!(partition = record.partition, offset = record.offset, error = %e, "skipping an undecodable usage record");
                return Ok(());
            }
        };
        let now = now_micros();
        let stored_at = record.timestamp_millis.saturating_mul(1000);
        let stable = micros(self.config.policy_for(&batch.service).stable_window);
        if now.saturating_sub(stored_at) > stable {
            self.telemetry.batches_skipped.inc();
            return Ok(());
        }
        self.telemetry.batches.inc();
        let service = self.service(&batch.service, record.partition, now);
        service.scaler.observe(&observation(&batch, stored_at));
        if now.saturating_sub(service.decided_at) < micros(MIN_DECISION_GAP) {
            service.dirty = true;
            return Ok(());
        }
        self.decide(&batch.service, now).await
    }

    async fn decide(&mut self, name: &str, now: i64) -> Result<(), AutoscalerError> {
        let Some(service) = self.services.get_mut(name) else {
            return Ok(());
        };
        service.decided_at = now;
        service.dirty = false;
        let decision = service.scaler.decide(now);
        self.publish(name, decision, now).await
    }

    /// The service's state, created on its first batch, resuming from the
    /// board's replica count if another member decided it before.
    fn service(&mut self, name: &str, partition: i32, now: i64) -> &mut Service {
        let telemetry = &self.telemetry;
        let policy = self.config.policy_for(name);
        let board = &self.board;
        let service = self.services.entry(name.to_owned()).or_insert_with(|| {
            let resumed = board.get(name);
            let scaler = match &resumed {
                Some(d) => ServiceScaler::resume(policy.clone(), now, d.desired_replicas),
                None => ServiceScaler::new(policy.clone(), now),
            };
            let label = vec![("service", name.to_owned())];
            Service {
                scaler,
                partition,
                decided_at: i64::MIN,
                dirty: false,
                published: resumed.map(|d| (d.desired_replicas, explanation_mode(&d))),
                desired: telemetry.desired_replicas.get_or_create(&label).clone(),
                reporting: telemetry.instances_reporting.get_or_create(&label).clone(),
                panic: telemetry.panic_mode.get_or_create(&label).clone(),
            }
        });
        service.partition = partition;
        service
    }

    /// Decides every service whose partition this member holds now, or
    /// with `only_dirty` those of them that batches marked.
    async fn decide_owned(&mut self, only_dirty: bool) -> Result<(), AutoscalerError> {
        if only_dirty && !self.services.values().any(|s| s.dirty) {
            return Ok(());
        }
        let owned = self.consumer.assigned_partitions()?;
        let now = now_micros();
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| owned.contains(&s.partition) && (s.dirty || !only_dirty))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            self.decide(&name, now).await?;
        }
        Ok(())
    }

    /// Appends `decision` to the decisions topic if it says something new.
    async fn publish(&mut self, name: &str, decision: Decision, now: i64) -> Result<(), AutoscalerError> {
        let Some(service) = self.services.get_mut(name) else {
            return Ok(());
        };
        let mode = decision.explanation.mode.as_str().to_owned();
        service
            .reporting
            .set(i64::from(decision.explanation.instances_reporting));
        let current = (decision.desired, mode);
        let mut proto: ScalingDecision = decision.to_proto(String::new(), name.to_owned(), now);
        self.live.publish(proto.clone());
        if service.published.as_ref() == Some(&current) {
            return Ok(());
        }
        proto.decision_id = uuid::Uuid::new_v4().to_string();
        decisions::append(&self.log, &self.settings.decisions_topic, &proto).await?;
        service.desired.set(i64::from(current.0));
        service.panic.set(i64::from(current.1 == "panic"));
        tracing::info!(
            service = name,
            replicas = proto.desired_replicas,
            previous = proto.previous_replicas,
            summary = proto.explanation.as_ref().map_or("", |e| e.summary.as_str()),
            "scaling decision"
        );
        service.published = Some(current);
        self.telemetry.decisions.inc();
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), AutoscalerError> {
        if self.next_offsets.is_empty() {
            return Ok(());
        }
        let offsets: Vec<(i32, i64)> = std::mem::take(&mut self.next_offsets).into_iter().collect();
        self.consumer.commit(&offsets).await?;
        Ok(())
    }

    fn reload_if_changed(&mut self) {
        let Some(path) = &self.settings.config_path else {
            return;
        };
        let mtime = modified(path);
        if mtime == self.config_mtime {
            return;
        }
        self.config_mtime = mtime;
        match ScalingConfig::load(path) {
            Ok(config) => {
                for (name, service) in &mut self.services {
                    service.scaler.set_policy(config.policy_for(name).clone());
                }
                self.config = config;
                tracing::info!(path = %path.display(), "scaling config reloaded");
            }
            Err(e) => {
                self.telemetry.config_reload_errors.inc();
                tracing::error!(error = %e, "scaling config not reloaded; the running policies stay");
            }
        }
    }
}

fn explanation_mode(decision: &ScalingDecision) -> String {
    decision
        .explanation
        .as_ref()
        .map_or_else(|| "stable".to_owned(), |e| e.mode.clone())
}

/// What the scaler needs of a batch, timed by when the log stored it: one
/// clock for every sidecar, so skew between machines cannot distort windows.
fn observation(batch: &UsageBatch, stored_at: i64) -> Observation<'_> {
    let load = batch.load.unwrap_or_default();
    Observation {
        instance: &batch.instance,
        at_micros: stored_at,
        window_micros: (batch.window_end_unix_micros - batch.window_start_unix_micros).max(1),
        concurrency: load.concurrency,
        requests: load.requests,
        cpu_micros: batch.resources.map_or(0, |r| r.cpu_micros),
    }
}
