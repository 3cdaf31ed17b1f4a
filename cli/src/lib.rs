//! The `tidemark` operator CLI. Each subcommand lives in its own module.

pub mod billing_client;
pub mod demo_app;
pub mod dev;
pub mod doctor;
pub mod http1;
pub mod invoice;
pub mod loadgen;
pub mod reconcile;
pub mod simulate;
pub mod trace;
pub mod usage;
