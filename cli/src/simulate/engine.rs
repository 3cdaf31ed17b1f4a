//! The discrete-event engine: a trace's requests against a pool of
//! instances whose size a [`Scaler`] decides, on a simulated clock of whole
//! microseconds. Nothing here reads the wall clock or a random source, so a
//! run is a pure function of its inputs.
//!
//! # The model
//!
//! - **Instances** are asked for by the scaler, become ready `startup` later,
//!   and each serves at most `capacity` requests at once. A request's service
//!   time does not depend on how many others share the instance (an LLM
//!   server batching its requests, or any server below its knee).
//! - **Routing**: an arriving request goes to the ready instance with the
//!   fewest requests in flight (ties: the oldest instance) if that one is
//!   below `capacity`; otherwise it waits in one FIFO queue (Knative's
//!   activator, or the sidecars' queues taken together). A slot that frees up,
//!   or an instance that becomes ready, takes requests from the head of the queue.
//! - **Scale down** first cancels instances still starting (newest first), then
//!   stops idle ready instances (newest first), then drains the least busy:
//!   a draining instance takes no new request and stops when its last one ends.
//!   This is the order in which a Kubernetes ReplicaSet picks pods to delete.
//! - **Reports**: each ready instance reports every `report_interval`, on its
//!   own phase (from the moment it became ready), what a sidecar reports:
//!   the time-weighted concurrency over the window, the requests that
//!   finished in it and the CPU time used. The reported concurrency is the
//!   demand the instance sees: its requests in flight *plus its share of the
//!   queue* (the queue's length divided by the ready instances, integrated
//!   over the window), since a real request waits in some instance's sidecar
//!   queue (or in Knative's activator, whose concurrency the KPA also counts)
//!   and is counted there. Without it no policy could see demand beyond
//!   `capacity` per instance. A draining instance keeps reporting, flagged
//!   `draining` (its sidecar runs until the last request ends), and an
//!   instance that stops sends its last, partial window at once, as the
//!   sidecar does on SIGTERM. The baselines skip draining reports: Knative
//!   scrapes only the pods in the endpoints and the HPA ignores pods being deleted.
//! - **CPU**: an instance running `capacity` requests uses one core; CPU time
//!   is proportional to the requests in flight (`cpu_micros = in-flight area / capacity`).
//!
//! # What is measured
//!
//! - instance-seconds: for each instance, from the moment it was asked for
//!   until it stopped (start-up and draining included), summed;
//! - overload-seconds: the time during which (requests in flight on ready
//!   instances + queued) / ready instances exceeded `target_per_instance`
//!   (any demand with no ready instance is overload);
//! - queueing delay of each request, from arrival to the start of its
//!   service (p50, p99, max; nearest rank);
//! - requests served; scale events (each change of the replica count the
//!   scaler asked for); the most instances that existed at once.
//!
//! The run ends when the last request has been served (instances still up
//! are counted until then).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::trace::Request;

/// Fixed parameters of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Requests one instance serves at once, at most.
    pub capacity: u32,
    /// Demand per ready instance above which the service counts as overloaded.
    pub target_per_instance: f64,
    /// From asking for an instance to its being ready, µs.
    pub startup_micros: i64,
    /// How often each ready instance reports, µs.
    pub report_interval_micros: i64,
    /// Instances ready at time 0.
    pub initial_instances: u32,
    /// After the last arrival, how long requests may stay unserved before
    /// the run gives up on them, µs.
    pub stall_limit_micros: i64,
}

/// What one ready instance reports for one window: a sidecar's report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub instance: u32,
    /// End of the window, µs.
    pub at_micros: i64,
    pub window_micros: i64,
    /// Time-weighted demand over the window: in flight plus the instance's share of the queue.
    pub concurrency: f64,
    /// Requests that finished in the window.
    pub requests: u64,
    /// CPU time used in the window (in-flight area / capacity).
    pub cpu_micros: u64,
    /// The instance is draining (or stopping: its last report).
    pub draining: bool,
}

/// What a scaler may look at besides the reports: what an orchestrator's
/// API shows.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub now_micros: i64,
    /// Ready instances taking requests, by id (ascending).
    pub ready: &'a [u32],
    /// Instances asked for and not ready yet.
    pub starting: u32,
    /// Instances draining (out of the count the scaler controls).
    pub draining: u32,
    /// Requests waiting in the queue now.
    pub queued: usize,
    /// Area under the queue length (request·µs) accumulated while no instance
    /// was ready: what an activator in front of zero instances sees.
    pub unreported_queue_area: f64,
}

impl View<'_> {
    /// The replica count the scaler controls: ready plus starting.
    pub fn replicas(&self) -> u32 {
        self.ready.len() as u32 + self.starting
    }
}

/// A policy that decides how many instances there should be. Each hook may
/// return the new desired count (ready + starting); `None` leaves it.
pub trait Scaler {
    /// Name in the results.
    fn name(&self) -> String;
    /// Interval of [`Scaler::on_tick`], µs, from time 0; `None`: no ticks.
    fn tick_micros(&self) -> Option<i64> {
        None
    }
    /// An instance reported.
    fn on_report(&mut self, _report: &Report, _view: &View<'_>) -> Option<u32> {
        None
    }
    /// The periodic tick.
    fn on_tick(&mut self, _view: &View<'_>) -> Option<u32> {
        None
    }
    /// A request arrived (after it was routed or queued).
    fn on_arrival(&mut self, _view: &View<'_>) -> Option<u32> {
        None
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub policy: String,
    pub instance_seconds: f64,
    pub overload_seconds: f64,
    pub queue_p50_seconds: f64,
    pub queue_p99_seconds: f64,
    pub queue_max_seconds: f64,
    pub served: u64,
    /// Requests still unserved when the run gave up (see `Config::stall_limit_micros`).
    pub unserved: u64,
    pub scale_events: u64,
    pub max_instances: u32,
    /// When the run ended, seconds from the start of the trace.
    pub end_seconds: f64,
    /// Each change of the replica count asked for: (µs, count), starting with the initial count at 0.
    pub timeline: Vec<(i64, u32)>,
}

impl Outcome {
    /// The replica count asked for at `at_micros`.
    pub fn replicas_at(&self, at_micros: i64) -> u32 {
        self.timeline
            .iter()
            .take_while(|(t, _)| *t <= at_micros)
            .last()
            .map_or(0, |(_, n)| *n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Draining,
    Stopped,
}

#[derive(Debug, Clone)]
struct Instance {
    state: State,
    asked_at: i64,
    stopped_at: i64,
    in_flight: u32,
    /// ∫ in_flight dt up to `last_change`, request·µs.
    area: i64,
    last_change: i64,
    window_start: i64,
    window_area: i64,
    window_share: f64,
    window_done: u64,
    /// The queue share accrued in the open window before the instance left the ready set.
    left_share: f64,
}

impl Instance {
    fn touch(&mut self, now: i64) {
        self.area += i64::from(self.in_flight) * (now - self.last_change);
        self.last_change = now;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Request (index) finished on instance.
    Done(u32, usize),
    Ready(u32),
    Report(u32),
    Tick,
}

/// One run: the state of the simulated service.
struct Sim<'t> {
    cfg: Config,
    requests: &'t [Request],
    now: i64,
    seq: u64,
    events: BinaryHeap<Reverse<(i64, u64, Event)>>,
    instances: Vec<Instance>,
    ready: Vec<u32>,
    starting: u32,
    draining: u32,
    queue: VecDeque<usize>,
    /// ∫ queue / ready dt: each ready instance's share of the queue, request·µs.
    share: f64,
    unreported_queue: f64,
    in_flight_ready: u64,
    overload_micros: i64,
    delays: Vec<i64>,
    served: u64,
    scale_events: u64,
    desired: u32,
    max_instances: u32,
    timeline: Vec<(i64, u32)>,
    /// Last reports of instances that stopped, for the scaler.
    outbox: Vec<Report>,
}

/// Replays `requests` (sorted by arrival) against `scaler`.
pub fn run(cfg: Config, requests: &[Request], scaler: &mut dyn Scaler) -> Outcome {
    let mut sim = Sim {
        cfg,
        requests,
        now: 0,
        seq: 0,
        events: BinaryHeap::new(),
        instances: Vec::new(),
        ready: Vec::new(),
        starting: 0,
        draining: 0,
        queue: VecDeque::new(),
        share: 0.0,
        unreported_queue: 0.0,
        in_flight_ready: 0,
        overload_micros: 0,
        delays: Vec::with_capacity(requests.len()),
        served: 0,
        scale_events: 0,
        desired: cfg.initial_instances,
        max_instances: 0,
        timeline: vec![(0, cfg.initial_instances)],
        outbox: Vec::new(),
    };
    for _ in 0..cfg.initial_instances {
        let id = sim.add_instance();
        sim.make_ready(id);
    }
    sim.max_instances = cfg.initial_instances;
    let tick = scaler.tick_micros().filter(|t| *t > 0);
    if let Some(t) = tick {
        sim.push(t, Event::Tick);
    }
    let last_arrival = requests.last().map_or(0, |r| r.arrival_micros);
    let give_up = last_arrival.saturating_add(cfg.stall_limit_micros);
    let mut next_arrival = 0;
    loop {
        let all_done = next_arrival == requests.len() && sim.served == requests.len() as u64;
        if all_done {
            break;
        }
        let heap_at = sim.events.peek().map(|Reverse((at, _, _))| *at);
        let arrival_at = requests.get(next_arrival).map(|r| r.arrival_micros);
        // Events at the same time as an arrival go first: a slot freed at t serves a request arriving at t.
        let take_arrival = match (heap_at, arrival_at) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(h), Some(a)) => a < h,
        };
        if take_arrival {
            let Some(at) = arrival_at else { break };
            sim.advance(at);
            sim.arrive(next_arrival);
            next_arrival += 1;
            let view = sim.view();
            if let Some(d) = scaler.on_arrival(&view) {
                sim.scale_to(d);
            }
            sim.deliver_last_reports(scaler);
            continue;
        }
        let Some(Reverse((at, _, event))) = sim.events.pop() else {
            break; // nothing will ever happen again: requests stay unserved
        };
        if at > give_up {
            break;
        }
        sim.advance(at);
        match event {
            Event::Done(id, _) => sim.finish(id),
            Event::Ready(id) => {
                if sim.instances[id as usize].state == State::Starting {
                    sim.starting -= 1;
                    sim.make_ready(id);
                }
            }
            Event::Report(id) => {
                if let Some(report) = sim.report(id) {
                    let view = sim.view();
                    if let Some(d) = scaler.on_report(&report, &view) {
                        sim.scale_to(d);
                    }
                }
            }
            Event::Tick => {
                if let Some(t) = tick {
                    sim.push(at + t, Event::Tick);
                }
                let view = sim.view();
                if let Some(d) = scaler.on_tick(&view) {
                    sim.scale_to(d);
                }
            }
        }
        sim.deliver_last_reports(scaler);
    }
    sim.outcome(scaler.name())
}

impl Sim<'_> {
    /// Hands the last reports of instances that stopped at this instant to the scaler.
    fn deliver_last_reports(&mut self, scaler: &mut dyn Scaler) {
        while let Some(report) = self.outbox.pop() {
            let view = self.view();
            if let Some(d) = scaler.on_report(&report, &view) {
                self.scale_to(d);
            }
        }
    }

    fn push(&mut self, at: i64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, event)));
    }

    fn view(&self) -> View<'_> {
        View {
            now_micros: self.now,
            ready: &self.ready,
            starting: self.starting,
            draining: self.draining,
            queued: self.queue.len(),
            unreported_queue_area: self.unreported_queue,
        }
    }

    /// Moves the clock to `at`, integrating what depends on time.
    fn advance(&mut self, at: i64) {
        let dt = at - self.now;
        if dt > 0 {
            let queued = self.queue.len() as f64;
            let ready = self.ready.len();
            if ready > 0 {
                self.share += queued * dt as f64 / ready as f64;
            } else {
                self.unreported_queue += queued * dt as f64;
            }
            let demand = self.in_flight_ready as f64 + queued;
            let overloaded = if ready == 0 {
                demand > 0.0
            } else {
                demand / ready as f64 > self.cfg.target_per_instance
            };
            if overloaded {
                self.overload_micros += dt;
            }
            self.now = at;
        }
    }

    fn add_instance(&mut self) -> u32 {
        let id = self.instances.len() as u32;
        self.instances.push(Instance {
            state: State::Starting,
            asked_at: self.now,
            stopped_at: self.now,
            in_flight: 0,
            area: 0,
            last_change: self.now,
            window_start: self.now,
            window_area: 0,
            window_share: 0.0,
            window_done: 0,
            left_share: 0.0,
        });
        id
    }

    fn make_ready(&mut self, id: u32) {
        let now = self.now;
        let share = self.share;
        let inst = &mut self.instances[id as usize];
        inst.state = State::Ready;
        inst.last_change = now;
        inst.window_start = now;
        inst.window_area = inst.area;
        inst.window_share = share;
        let at = self.ready.partition_point(|&r| r < id);
        self.ready.insert(at, id);
        self.push(now + self.cfg.report_interval_micros, Event::Report(id));
        self.pull_queue(id);
    }

    fn arrive(&mut self, index: usize) {
        let best = self
            .ready
            .iter()
            .copied()
            .min_by_key(|&id| (self.instances[id as usize].in_flight, id));
        match best {
            Some(id) if self.instances[id as usize].in_flight < self.cfg.capacity => self.serve(id, index),
            _ => self.queue.push_back(index),
        }
    }

    fn serve(&mut self, id: u32, index: usize) {
        let now = self.now;
        let inst = &mut self.instances[id as usize];
        inst.touch(now);
        inst.in_flight += 1;
        self.in_flight_ready += 1;
        let request = self.requests[index];
        self.delays.push(now - request.arrival_micros);
        self.push(now + request.service_micros, Event::Done(id, index));
    }

    fn pull_queue(&mut self, id: u32) {
        while self.instances[id as usize].in_flight < self.cfg.capacity {
            let Some(index) = self.queue.pop_front() else { break };
            self.serve(id, index);
        }
    }

    fn finish(&mut self, id: u32) {
        let now = self.now;
        let inst = &mut self.instances[id as usize];
        inst.touch(now);
        inst.in_flight -= 1;
        inst.window_done += 1;
        self.served += 1;
        match inst.state {
            State::Ready => {
                self.in_flight_ready -= 1;
                self.pull_queue(id);
            }
            State::Draining if inst.in_flight == 0 => {
                self.draining -= 1;
                self.stop(id);
            }
            _ => {}
        }
    }

    /// Closes the instance's window and reports it; schedules the next report
    /// unless the instance is stopping.
    fn report(&mut self, id: u32) -> Option<Report> {
        let now = self.now;
        let share = self.share;
        let capacity = f64::from(self.cfg.capacity.max(1));
        let inst = &mut self.instances[id as usize];
        let queue_share = match inst.state {
            State::Ready => share - inst.window_share,
            State::Draining => std::mem::take(&mut inst.left_share),
            State::Starting | State::Stopped => return None,
        };
        inst.touch(now);
        let window = now - inst.window_start;
        let area = inst.area - inst.window_area;
        let report = Report {
            instance: id,
            at_micros: now,
            window_micros: window,
            concurrency: if window > 0 {
                (area as f64 + queue_share) / window as f64
            } else {
                0.0
            },
            requests: inst.window_done,
            cpu_micros: (area as f64 / capacity).round() as u64,
            draining: inst.state == State::Draining,
        };
        inst.window_start = now;
        inst.window_area = inst.area;
        inst.window_share = share;
        inst.window_done = 0;
        self.push(now + self.cfg.report_interval_micros, Event::Report(id));
        Some(report)
    }

    /// Makes ready + starting equal `desired`.
    fn scale_to(&mut self, desired: u32) {
        if desired != self.desired {
            self.scale_events += 1;
            self.desired = desired;
            self.timeline.push((self.now, desired));
        }
        let current = self.ready.len() as u32 + self.starting;
        if desired > current {
            for _ in current..desired {
                let id = self.add_instance();
                self.starting += 1;
                self.push(self.now + self.cfg.startup_micros, Event::Ready(id));
            }
        } else if desired < current {
            let mut excess = current - desired;
            // Starting instances, newest first.
            for inst in self.instances.iter_mut().rev() {
                if excess == 0 {
                    break;
                }
                if inst.state == State::Starting {
                    inst.state = State::Stopped;
                    inst.stopped_at = self.now;
                    self.starting -= 1;
                    excess -= 1;
                }
            }
            // Then ready instances: idle ones first (newest first), then the least busy.
            let mut victims: Vec<u32> = self.ready.clone();
            victims.sort_by_key(|&id| (self.instances[id as usize].in_flight, Reverse(id)));
            for id in victims.into_iter().take(excess as usize) {
                self.retire(id);
            }
        }
        let existing = self.ready.len() as u32 + self.starting + self.draining;
        self.max_instances = self.max_instances.max(existing);
    }

    fn retire(&mut self, id: u32) {
        let now = self.now;
        let share = self.share;
        if let Ok(at) = self.ready.binary_search(&id) {
            self.ready.remove(at);
        }
        let inst = &mut self.instances[id as usize];
        inst.touch(now);
        inst.left_share = share - inst.window_share;
        inst.state = State::Draining;
        self.in_flight_ready -= u64::from(inst.in_flight);
        if inst.in_flight == 0 {
            self.stop(id);
        } else {
            self.draining += 1;
        }
    }

    /// Stops a draining instance: its last, partial window goes to the outbox.
    fn stop(&mut self, id: u32) {
        let now = self.now;
        if self.instances[id as usize].window_start < now
            && let Some(mut last) = self.report(id)
        {
            last.draining = true;
            self.outbox.push(last);
        }
        let inst = &mut self.instances[id as usize];
        inst.state = State::Stopped;
        inst.stopped_at = now;
    }

    fn outcome(mut self, policy: String) -> Outcome {
        let end = self.now;
        let mut instance_micros: i64 = 0;
        for inst in &mut self.instances {
            if inst.state != State::Stopped {
                inst.stopped_at = end;
            }
            instance_micros += inst.stopped_at - inst.asked_at;
        }
        self.delays.sort_unstable();
        let pick = |q: f64| -> f64 {
            if self.delays.is_empty() {
                return 0.0;
            }
            // Nearest rank: the smallest delay with at least q of all at or below it.
            let rank = (q * self.delays.len() as f64).ceil().max(1.0) as usize;
            self.delays[rank.min(self.delays.len()) - 1] as f64 / 1e6
        };
        Outcome {
            policy,
            instance_seconds: instance_micros as f64 / 1e6,
            overload_seconds: self.overload_micros as f64 / 1e6,
            queue_p50_seconds: pick(0.50),
            queue_p99_seconds: pick(0.99),
            queue_max_seconds: pick(1.0),
            served: self.served,
            unserved: self.requests.len() as u64 - self.served,
            scale_events: self.scale_events,
            max_instances: self.max_instances,
            end_seconds: end as f64 / 1e6,
            timeline: self.timeline,
        }
    }
}
