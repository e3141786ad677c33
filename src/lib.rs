//! spillway: a sidecar reliability proxy for flaky downstream HTTP APIs.
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::todo,
    clippy::dbg_macro
)]

pub mod admin;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod metrics;
pub mod proxy;
pub mod queue;
pub mod reload;
pub mod telemetry;

#[doc(hidden)]
pub mod fuzzing;
