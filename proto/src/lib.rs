//! Tidemark's wire contract, generated from the files under `proto/`.
//!
//! - [`v1`]: package `tidemark.v1`: usage batches, the ingest stream, scaling
//!   decisions and the billing queries.
//! - [`externalscaler`]: KEDA's external scaler service, wire-compatible with
//!   KEDA so that it can call the collector unchanged.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

pub mod v1 {
    tonic::include_proto!("tidemark.v1");
}

pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}
