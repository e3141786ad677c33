//! `spillway routes list|pause|resume|replay-dead`, over the admin API.

use std::process::ExitCode;

use http::Method;
use serde_json::Value;

use super::client::{print_json, AdminClient, AdminOpts, CliError, EXIT_CODES};
use super::table::{cell, render};

/// Inspect routes and pause, resume or replay their deliveries through the admin API.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct RoutesArgs {
    #[command(flatten)]
    pub opts: AdminOpts,
    #[command(subcommand)]
    pub command: RoutesCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum RoutesCommand {
    /// Every route: mode, pause, queue depth, oldest job age, dead letters, circuit.
    #[command(after_help = EXIT_CODES)]
    List,
    /// Stop delivering a deferrable route's jobs (accepting goes on); survives restarts.
    #[command(after_help = EXIT_CODES)]
    Pause { name: String },
    /// Start delivering again (also ends a pause that a Retry-After set).
    #[command(after_help = EXIT_CODES)]
    Resume { name: String },
    /// Make every dead job of the route due again; prints how many.
    #[command(after_help = EXIT_CODES)]
    ReplayDead { name: String },
}

pub fn run(args: RoutesArgs) -> ExitCode {
    super::client::run(execute(args))
}

async fn execute(args: RoutesArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.opts)?;
    let json = args.opts.json;
    let (v, said) = match &args.command {
        RoutesCommand::List => {
            let v = client
                .call(Method::GET, client.url(&["routes"], &[]))
                .await?;
            let text = list_table(&v);
            (v, text)
        }
        RoutesCommand::Pause { name } => {
            let v = client
                .call(Method::POST, client.url(&["routes", name, "pause"], &[]))
                .await?;
            (
                v,
                format!("route {name} paused: deliveries stop, accepting goes on\n"),
            )
        }
        RoutesCommand::Resume { name } => {
            let v = client
                .call(Method::POST, client.url(&["routes", name, "resume"], &[]))
                .await?;
            (v, format!("route {name} resumed\n"))
        }
        RoutesCommand::ReplayDead { name } => {
            let v = client
                .call(
                    Method::POST,
                    client.url(&["routes", name, "replay-dead"], &[]),
                )
                .await?;
            let n = v["replayed"].as_u64().unwrap_or(0);
            let s = format!(
                "{n} dead job{} of route {name} due again\n",
                if n == 1 { "" } else { "s" }
            );
            (v, s)
        }
    };
    if json {
        print_json(&v);
    } else {
        print!("{said}");
    }
    Ok(())
}

fn paused_word(r: &Value) -> String {
    if r["paused"].as_bool() == Some(true) {
        "yes".to_owned()
    } else if let Some(until) = r["paused_until"].as_str() {
        format!("until {until}")
    } else if r["mode"] == "deferrable" {
        "no".to_owned()
    } else {
        "-".to_owned()
    }
}

fn list_table(v: &Value) -> String {
    let routes = v["routes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if routes.is_empty() {
        return "no routes configured\n".to_owned();
    }
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            let d = &r["depth"];
            vec![
                cell(&r["name"]),
                cell(&r["mode"]),
                paused_word(r),
                cell(&d["queued"]),
                cell(&d["in_flight"]),
                cell(&d["retrying"]),
                cell(&r["dead"]),
                r["oldest_queued_age_seconds"]
                    .as_f64()
                    .map_or("-".to_owned(), |s| format!("{s:.1}s")),
                cell(&r["circuit"]),
                cell(&r["upstream"]),
            ]
        })
        .collect();
    render(
        &[
            "NAME",
            "MODE",
            "PAUSED",
            "QUEUED",
            "IN_FLIGHT",
            "RETRYING",
            "DEAD",
            "OLDEST",
            "CIRCUIT",
            "UPSTREAM",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_shows_queue_and_circuit_columns() {
        let v = json!({"routes": [
            {"name": "hooks", "mode": "deferrable", "paused": true, "depth": {"queued": 2, "in_flight": 0, "retrying": 1},
             "dead": 3, "oldest_queued_age_seconds": 1.25, "circuit": null, "upstream": "http://u/"},
            {"name": "tax", "mode": "passthrough", "paused": false, "depth": null, "dead": null,
             "oldest_queued_age_seconds": null, "circuit": "open", "upstream": "https://t/"}
        ]});
        let t = list_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("hooks  deferrable   yes"), "{t}");
        assert!(
            lines[1].contains("1.2s") || lines[1].contains("1.3s"),
            "{t}"
        );
        assert!(lines[2].contains("open"), "{t}");
    }
}
