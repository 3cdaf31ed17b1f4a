//! What the benchmarks in `bench/` share: the processes they run and what
//! /proc says those cost (`procs`), and percentiles and number formatting
//! for their markdown reports (`stats`).

pub mod procs;
pub mod stats;
