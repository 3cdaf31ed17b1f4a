//! Tidemark's shared domain: names and ids, usage batches and their
//! validation, meters, and time windows. Pure functions only: no I/O.

pub mod batch;
pub mod ids;
pub mod meter;
pub mod window;

pub use tidemark_proto::v1::{LoadSample, ResourceSample, TenantUsage, UsageBatch};
