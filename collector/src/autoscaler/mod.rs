//! The autoscaler core: pure, I/O-free scaling decisions per service.
//!
//! - [`policy`]: what a service scales on and how fast it may move, parsed
//!   from TOML and validated ([`policy::Policy::resolve`]).
//! - [`load`]: per-instance report rings and the exact total load of a
//!   service over the stable and panic windows ([`load::LoadWindows`]).
//! - [`scaler`]: one service's scaler ([`scaler::ServiceScaler`]): reports in,
//!   [`scaler::Decision`]s out, each with the explanation that goes on the wire.
//!
//! Time is passed in (µs since the Unix epoch on the autoscaler's clock), so
//! every decision is a function of the reports, the policy and the previous
//! decisions, and tests can replay any scenario exactly.

pub mod load;
pub mod policy;
pub mod runner;
pub mod scaler;
