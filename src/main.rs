use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// spillway: a sidecar reliability proxy for flaky downstream HTTP APIs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file without starting anything; prints `ok` and the routes.
    Check {
        /// The YAML config file.
        #[arg(short, long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => spillway::cli::check::run(&config),
    }
}
