use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc malloc spent a tenth of the accept path's CPU in frees of buffers allocated on another
// thread (bodies built on tokio workers, dropped by the queue writer); mimalloc handles that well.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// spillway: a sidecar reliability proxy for flaky downstream HTTP APIs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and admin listeners.
    Run {
        /// The YAML config file.
        #[arg(short, long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file without starting anything; prints `ok` and the routes.
    Check {
        /// The YAML config file.
        #[arg(short, long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
    },
    /// Inspect and act on deferred jobs through the admin API.
    Jobs(spillway::cli::jobs::JobsArgs),
    /// Inspect routes; pause, resume or replay them through the admin API.
    Routes(spillway::cli::routes::RoutesArgs),
}

/// Exit codes: `run`/`check`: 0 clean exit, 1 bad config, 2 startup failure; `jobs` and
/// `routes` list theirs under `--help`.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => spillway::cli::check::run(&config),
        Command::Run { config } => run(&config),
        Command::Jobs(args) => spillway::cli::jobs::run(args),
        Command::Routes(args) => spillway::cli::routes::run(args),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match spillway::config::load(path) {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("{errs}");
            return ExitCode::from(1);
        }
    };
    let telemetry = spillway::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async move {
        let app = match spillway::app::App::build(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "startup failed");
                eprintln!("spillway: {e}");
                return ExitCode::from(2);
            }
        };
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        app.shutdown().await;
        ExitCode::SUCCESS
    });
    // Outside the runtime: the exporter's flush is a blocking call.
    drop(runtime);
    telemetry.shutdown();
    code
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops spillway");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
