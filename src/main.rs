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
    ///
    /// The config reloads on SIGHUP and when the file changes; keys that need a restart
    /// (listeners, storage) say so in the log and keep their running value.
    Run {
        /// The YAML config file.
        #[arg(short, long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
        /// Reload on SIGHUP only, not when the file changes (for tools that write the
        /// file in several steps).
        #[arg(long)]
        no_watch: bool,
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
    /// Recover a damaged job store: copy every readable job, dead letter, idempotency
    /// key and route pause into a fresh file; the damaged one is kept beside it.
    ///
    /// Stop spillway first. Prints what was saved and skipped. Exit code 0 repaired (or
    /// nothing to repair), 1 bad config, 2 not repaired (the file is left as it is).
    Repair(spillway::cli::repair::RepairArgs),
    /// See what spillway does, with no setup: a flaky upstream, a burst of calls, a live view.
    ///
    /// Starts a flaky upstream (503s, slow answers, dropped connections, 429 with
    /// Retry-After) in this process and sends it a burst of calls directly. Then starts a
    /// spillway on free loopback ports (storage in a temporary directory, removed at the
    /// end) and sends the same burst through a deferrable route, and a quarter as many
    /// calls through a passthrough route, while a live view shows jobs being accepted,
    /// retried and delivered. The summary checks every accepted job against the store
    /// and the upstream. Exit code 0 when no accepted job was lost or left unfinished,
    /// 1 otherwise, 2 when the demo could not start. Logs: SPILLWAY_LOG (default error).
    Demo {
        /// Calls in the burst: sent straight to the upstream first, then through
        /// spillway's deferrable route.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        requests: u64,
        /// Calls in flight at once; the deferrable route delivers with this concurrency
        /// too (at most 64).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
        concurrency: u64,
        /// Seed for the upstream's dice, to repeat a run (the order in which concurrent
        /// calls arrive still varies); a random seed, printed, when absent.
        #[arg(long)]
        seed: Option<u64>,
        /// Stop after this long, whatever is left, e.g. "60s" or "2m"; jobs still
        /// retrying then make the exit code 1.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Print a plain progress line per second instead of the live view; the default
        /// when stdout is not a terminal.
        #[arg(long)]
        no_tty: bool,
        /// Keep the demo's queue in NATS JetStream at this URL (storage backend nats, a
        /// stream of the demo's own, removed at the end) instead of a redb file.
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
    },
}

/// Exit codes: `run`/`check`: 0 clean exit, 1 bad config, 2 startup failure; `demo`: 0 nothing
/// lost, 1 a job lost or unfinished, 2 could not start; `jobs` and `routes` list theirs under
/// `--help`.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => spillway::cli::check::run(&config),
        Command::Run { config, no_watch } => run(&config, !no_watch),
        Command::Jobs(args) => spillway::cli::jobs::run(args),
        Command::Routes(args) => spillway::cli::routes::run(args),
        Command::Repair(args) => spillway::cli::repair::run(args),
        Command::Demo {
            requests,
            concurrency,
            seed,
            timeout,
            no_tty,
            nats,
        } => {
            spillway::demo::init_logs();
            spillway::demo::run(spillway::demo::Options {
                requests: usize::try_from(requests).unwrap_or(usize::MAX),
                concurrency: usize::try_from(concurrency).unwrap_or(usize::MAX),
                seed,
                timeout,
                tty: !no_tty && spillway::demo::stdout_is_terminal(),
                nats,
            })
        }
    }
}

fn run(path: &std::path::Path, watch_file: bool) -> ExitCode {
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
                if let spillway::app::AppError::Store(se) = &e {
                    if let Some(hint) = spillway::cli::repair::hint(se) {
                        eprintln!("spillway: {hint}");
                    }
                }
                return ExitCode::from(2);
            }
        };
        // Before the listening lines: SIGHUP would kill a process without its handler.
        app.runtime().watch(watch_file);
        app.report_listeners();
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
