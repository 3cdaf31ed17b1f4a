//! Benchmarks of the collector, each against a baseline run beside it:
//!
//! - `decision-latency`: from a step in load on a sidecar to the
//!   WatchDecisions client holding the scale-up, through Kafka and through
//!   `tidemark dev`'s embedded log;
//! - `ingest`: acked usage batches per second over 1,000 concurrent
//!   `Ingest/Report` streams, next to Kafka's own `ProducerPerformance` tool.
//!
//! Run them through `bench/collector/run-decision-latency` and
//! `bench/collector/run-ingest` (see README.md here): they build, start a
//! Kafka broker and write `last-run-<name>.md`. The binary prints a markdown
//! report on stdout and its progress on stderr.

mod decision;
mod ingest;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tidemark-bench-collector")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time from a load step on a sidecar to the scale-up on WatchDecisions.
    DecisionLatency(decision::Args),
    /// Ingest throughput over many concurrent Report streams, and Kafka's producer tool.
    Ingest(ingest::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = match cli.command {
        Command::DecisionLatency(args) => runtime.block_on(decision::run(args))?,
        Command::Ingest(args) => runtime.block_on(ingest::run(args))?,
    };
    print!("{report}");
    Ok(())
}
