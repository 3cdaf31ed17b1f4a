//! Measures what metering costs one request on the sidecar's hot path, and
//! whether it allocates, next to two anchors run in the same process:
//!
//! - `atomic add`: one relaxed `fetch_add`, the floor;
//! - `naive map`: a `Mutex<HashMap<String, u64>>` keyed by an owned tenant
//!   string, the obvious first implementation.
//!
//! Run: `bench/metering/run` (or `cargo run --release -p tidemark-bench-metering`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidemark_sidecar::body::{BilledDuration, RequestEnd};
use tidemark_sidecar::meter::{Clock, Finished, Tenants};
use tidemark_sidecar::telemetry::Telemetry;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ITERATIONS: u64 = 5_000_000;
const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

struct Result {
    name: &'static str,
    threads: usize,
    ns_per_request: f64,
    allocations_per_request: f64,
}

/// Runs `body(i)` ITERATIONS times on each of `threads` threads (after a
/// warm-up) and returns wall time per request and allocations per request.
fn measure(name: &'static str, threads: usize, body: impl Fn(u64) + Sync) -> Result {
    for i in 0..ITERATIONS / 10 {
        body(i);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for i in 0..ITERATIONS {
                    body(i);
                }
            });
        }
    });
    let elapsed: Duration = started.elapsed();
    let requests = ITERATIONS * threads as u64;
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    Result {
        name,
        threads,
        // Per request as one core sees it: wall time × threads / requests.
        ns_per_request: elapsed.as_nanos() as f64 * threads as f64 / requests as f64,
        // Thread spawns allocate a little; they are amortized over millions.
        allocations_per_request: allocated as f64 / requests as f64,
    }
}

fn main() {
    let mut results = Vec::new();
    for threads in [1, 2] {
        let counter = AtomicU64::new(0);
        results.push(measure("atomic add (floor)", threads, |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        }));

        let naive: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
        results.push(measure("naive Mutex<HashMap<String, u64>>", threads, |i| {
            let tenant = TENANTS[(i % 4) as usize].to_owned();
            *naive.lock().unwrap().entry(tenant).or_default() += 1;
        }));

        let tenants = Tenants::new(Clock::new(), 1000);
        results.push(measure("tidemark meter (begin, bytes, finish)", threads, |i| {
            let meter = tenants.begin(Some(TENANTS[(i % 4) as usize]), i);
            meter.add_bytes_in(100);
            meter.add_bytes_out(1000);
            meter.finish(
                i + 1,
                Finished {
                    status: 200,
                    error: false,
                    duration_micros: 1,
                    billed_duration_micros: 1000,
                },
            );
        }));

        let tenants = Tenants::new(Clock::new(), 1000);
        let telemetry: &'static Telemetry = Box::leak(Box::default());
        let clock = tenants.clock();
        let billing = BilledDuration {
            step: Duration::from_millis(1),
            minimum: Duration::ZERO,
        };
        results.push(measure("tidemark request path (+ clock, histogram)", threads, |i| {
            let now = clock.now();
            let meter = tenants.begin(Some(TENANTS[(i % 4) as usize]), now);
            let mut end = RequestEnd::new(meter, clock, now, billing, telemetry, None);
            end.status = 200;
            end.meter().add_bytes_in(100);
            end.meter().add_bytes_out(1000);
            black_box(&end);
        }));
    }
    println!("| what | threads | ns per request | allocations per request |");
    println!("|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {:.1} | {:.4} |",
            r.name, r.threads, r.ns_per_request, r.allocations_per_request
        );
    }
}
