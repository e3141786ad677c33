//! `spillway jobs list|show|retry|delete`, over the admin API.

use std::process::ExitCode;

use http::Method;
use serde_json::Value;

use super::client::{print_json, AdminClient, AdminOpts, CliError, EXIT_CODES};
use super::table::{cell, render};

/// Inspect and act on deferred jobs through the admin API.
#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES)]
pub struct JobsArgs {
    #[command(flatten)]
    pub opts: AdminOpts,
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// List jobs, newest first, one page at a time.
    #[command(after_help = EXIT_CODES)]
    List {
        /// Only jobs of this route.
        #[arg(long)]
        route: Option<String>,
        /// Only jobs in this state.
        #[arg(long, value_parser = ["queued", "in_flight", "retrying", "delivered", "dead"])]
        state: Option<String>,
        /// Jobs per page (the API caps it at 1000; default 50).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Start after this job id: the `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one job: state, attempts, timestamps, last outcome, headers (secrets
    /// redacted) and body.
    #[command(after_help = EXIT_CODES)]
    Show { id: String },
    /// Make a dead or retrying job due now (its attempts are kept).
    #[command(after_help = EXIT_CODES)]
    Retry { id: String },
    /// Delete a job in any state.
    #[command(after_help = EXIT_CODES)]
    Delete { id: String },
}

pub fn run(args: JobsArgs) -> ExitCode {
    super::client::run(execute(args))
}

async fn execute(args: JobsArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args.opts)?;
    let json = args.opts.json;
    match args.command {
        JobsCommand::List {
            route,
            state,
            limit,
            cursor,
        } => {
            let mut query = Vec::new();
            if let Some(r) = route {
                query.push(("route", r));
            }
            if let Some(s) = state {
                query.push(("state", s));
            }
            if let Some(l) = limit {
                query.push(("limit", l.to_string()));
            }
            if let Some(c) = cursor {
                query.push(("cursor", c));
            }
            let v = client
                .call(Method::GET, client.url(&["jobs"], &query))
                .await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", list_table(&v));
            }
        }
        JobsCommand::Show { id } => {
            let v = client
                .call(Method::GET, client.url(&["jobs", &id], &[]))
                .await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", show_text(&v));
            }
        }
        JobsCommand::Retry { id } => {
            let v = client
                .call(Method::POST, client.url(&["jobs", &id, "retry"], &[]))
                .await?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "job {id} is due again ({}, attempts so far: {})",
                    cell(&v["state"]),
                    cell(&v["attempts"])
                );
            }
        }
        JobsCommand::Delete { id } => {
            let v = client
                .call(Method::DELETE, client.url(&["jobs", &id], &[]))
                .await?;
            if json {
                print_json(&v);
            } else {
                println!("job {id} deleted");
            }
        }
    }
    Ok(())
}

/// What the last attempt ended in, in a few words.
fn last_word(job: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(s) = job["last_status"].as_u64() {
        parts.push(format!("status {s}"));
    }
    if let Some(e) = job["last_error"].as_str() {
        parts.push(e.to_owned());
    }
    if let Some(r) = job["dead_reason"].as_str() {
        parts.push(format!("dead: {r}"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

fn list_table(v: &Value) -> String {
    let jobs = v["jobs"].as_array().map(Vec::as_slice).unwrap_or_default();
    if jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                cell(&j["id"]),
                cell(&j["route"]),
                cell(&j["state"]),
                cell(&j["attempts"]),
                cell(&j["created_at"]),
                cell(&j["next_attempt_at"]),
                last_word(j),
            ]
        })
        .collect();
    let mut out = render(
        &[
            "ID",
            "ROUTE",
            "STATE",
            "ATTEMPTS",
            "CREATED",
            "NEXT ATTEMPT",
            "LAST",
        ],
        &rows,
    );
    if let Some(c) = v["next_cursor"].as_str() {
        out.push_str(&format!("more jobs: add --cursor {c}\n"));
    }
    out
}

fn headers_text(out: &mut String, headers: &Value) {
    for h in headers.as_array().map(Vec::as_slice).unwrap_or_default() {
        out.push_str(&format!("  {}: {}\n", cell(&h["name"]), cell(&h["value"])));
    }
}

fn body_text(out: &mut String, body: &Value) {
    let size = body["size"].as_u64().unwrap_or(0);
    let cut = if body["truncated"].as_bool() == Some(true) {
        ", shown truncated"
    } else {
        ""
    };
    match body["text"].as_str() {
        Some(text) if !text.is_empty() => {
            out.push_str(&format!("{size} bytes, utf-8{cut}:\n{text}\n"));
        }
        Some(_) => out.push_str("empty\n"),
        None => out.push_str(&format!(
            "{size} bytes, binary, sha256 {}{cut}\n",
            cell(&body["sha256"])
        )),
    }
}

fn show_text(v: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, val: String| out.push_str(&format!("{k:<18}{val}\n"));
    line(&mut out, "id:", cell(&v["id"]));
    line(&mut out, "route:", cell(&v["route"]));
    line(&mut out, "state:", cell(&v["state"]));
    line(&mut out, "attempts:", cell(&v["attempts"]));
    line(
        &mut out,
        "request:",
        format!("{} {}", cell(&v["method"]), cell(&v["uri"])),
    );
    line(&mut out, "idempotency key:", cell(&v["idempotency_key"]));
    line(&mut out, "created:", cell(&v["created_at"]));
    line(&mut out, "updated:", cell(&v["updated_at"]));
    line(&mut out, "next attempt:", cell(&v["next_attempt_at"]));
    line(&mut out, "last outcome:", last_word(v));
    out.push_str("headers:\n");
    headers_text(&mut out, &v["headers"]);
    out.push_str("body: ");
    body_text(&mut out, &v["body"]);
    if v["last"].is_object() {
        let last = &v["last"];
        out.push_str(&format!(
            "last attempt at {}: {}\n",
            cell(&last["at"]),
            match (last["status"].as_u64(), last["error"].as_str()) {
                (Some(s), _) => format!("status {s}"),
                (None, Some(e)) => e.to_owned(),
                (None, None) => "-".to_owned(),
            }
        ));
        if last["status"].is_u64() {
            out.push_str("last response headers:\n");
            headers_text(&mut out, &last["headers"]);
            out.push_str("last response body: ");
            body_text(&mut out, &last["body"]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_shows_a_row_per_job_and_the_next_cursor() {
        let v = json!({"jobs": [{"id": "a", "route": "r", "state": "dead", "attempts": 1,
            "created_at": "t", "next_attempt_at": null, "last_status": 400,
            "last_error": null, "dead_reason": "status 400"}], "next_cursor": "a"});
        let t = list_table(&v);
        assert!(t.starts_with("ID"), "{t}");
        assert!(t.contains("status 400; dead: status 400"), "{t}");
        assert!(t.ends_with("more jobs: add --cursor a\n"), "{t}");
        assert_eq!(list_table(&json!({"jobs": []})), "no jobs\n");
    }
}
