//! Subcommands of the `spillway` binary.

pub mod check;
