//! The `tidemark` operator CLI. Each subcommand lives in its own module.

pub mod dev;
