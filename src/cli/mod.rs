//! Subcommands of the `spillway` binary. `jobs` and `routes` are thin clients of the
//! admin API: they print tables for people, or the API's JSON with `--json`.

pub mod check;
pub mod client;
pub mod jobs;
pub mod repair;
pub mod routes;
mod table;
