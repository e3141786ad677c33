//! The admin API client behind `spillway jobs` and `spillway routes`: one request per
//! command, a clear one-line message and a documented exit code for each failure.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use crate::client::HttpClient;
use crate::config::FailureClass;

/// Printed under `--help` of every admin subcommand.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  the admin API answered with an error (unknown job or route, conflict, storage down)
  2  invalid arguments or --admin URL
  3  the admin API is unreachable (not running, wrong --admin, no answer in time)
  4  the admin API refused the token (missing or wrong)";

/// How long one admin call may take before the command gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer the CLI reads (a page of 1000 jobs is far below it).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Flags every admin subcommand takes.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminOpts {
    /// Base URL of the admin API (the address of `admin.listen`).
    #[arg(
        long,
        global = true,
        env = "SPILLWAY_ADMIN",
        default_value = "http://127.0.0.1:15081",
        value_name = "URL"
    )]
    pub admin: String,
    /// Environment variable that holds the admin bearer token.
    #[arg(
        long,
        global = true,
        default_value = "SPILLWAY_ADMIN_TOKEN",
        value_name = "VAR"
    )]
    pub token_env: String,
    /// Print the admin API's JSON answer (for scripts) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Why a command failed; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin API at {url}: {reason}. Is spillway running? Point --admin (or SPILLWAY_ADMIN) at its admin.listen address")]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } => 3,
            CliError::Unauthorized(_) => 4,
        }
    }
}

/// Runs one command on a small runtime and turns its result into an exit code; the
/// error goes to stderr as one line.
pub fn run<F>(command: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), CliError>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spillway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub struct AdminClient {
    base: url::Url,
    token: Option<String>,
    token_env: String,
    http: HttpClient,
}

impl AdminClient {
    pub fn new(opts: &AdminOpts) -> Result<AdminClient, CliError> {
        let bad = |why: &str| {
            CliError::Usage(format!(
                "--admin {:?} is not usable: {why}; expected a URL such as http://127.0.0.1:15081",
                opts.admin
            ))
        };
        // A bare host:port is what admin.listen says; accept it as http.
        let text = if opts.admin.contains("://") {
            opts.admin.clone()
        } else {
            format!("http://{}", opts.admin)
        };
        let base = url::Url::parse(&text).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(bad("it must be an http or https URL with a host"));
        }
        let token = std::env::var(&opts.token_env)
            .ok()
            .filter(|t| !t.is_empty());
        let http = HttpClient::new()
            .map_err(|e| CliError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        Ok(AdminClient {
            base,
            token,
            token_env: opts.token_env.clone(),
            http,
        })
    }

    /// The URL of `segments` under the base, each segment percent-encoded, with `query`.
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> url::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        url
    }

    /// One call; a JSON answer on 2xx, else the API's own error message.
    pub async fn call(&self, method: Method, url: url::Url) -> Result<Value, CliError> {
        let shown = self.base.as_str().trim_end_matches('/').to_owned();
        let mut req = Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json");
        if let Some(host) = url.host_str() {
            let host = match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            };
            req = req.header(header::HOST, host);
        }
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Bytes::new())
            .map_err(|e| CliError::Usage(format!("cannot build the request: {e}")))?;
        let unreachable = |reason: String| CliError::Unreachable {
            url: shown.clone(),
            reason,
        };
        let rsp = match tokio::time::timeout(CALL_TIMEOUT, self.http.send(req)).await {
            Err(_) => return Err(unreachable(format!("no answer within {CALL_TIMEOUT:?}"))),
            Ok(Err(e)) if e.class == FailureClass::ConnectFailure => {
                return Err(unreachable(connect_reason(&e.message)))
            }
            Ok(Err(e)) => return Err(unreachable(e.message)),
            Ok(Ok(rsp)) => rsp,
        };
        let status = rsp.status();
        let body = tokio::time::timeout(
            CALL_TIMEOUT,
            Limited::new(rsp.into_body(), MAX_ANSWER).collect(),
        )
        .await
        .map_err(|_| unreachable(format!("the answer did not arrive within {CALL_TIMEOUT:?}")))?
        .map_err(|e| unreachable(format!("the answer broke off: {e}")))?
        .to_bytes();
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status.is_success() {
            return json.ok_or_else(|| CliError::Api {
                status: status.as_u16(),
                code: "bad_answer".into(),
                message: format!("{shown} answered with something that is not JSON; is --admin the admin listener (not the proxy)?"),
            });
        }
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        if status == http::StatusCode::UNAUTHORIZED {
            let var = &self.token_env;
            return Err(CliError::Unauthorized(if self.token.is_none() {
                format!("the admin API at {shown} needs a token, and {var} is not set; set {var} to the admin token (the value of the variable admin.token_env names), or name another variable with --token-env")
            } else {
                format!("the admin API at {shown} refused the token in {var} (401); it does not match the server's admin token")
            }));
        }
        Err(CliError::Api {
            status: status.as_u16(),
            code: field("error").unwrap_or_else(|| "http_error".into()),
            message: field("message").unwrap_or_else(|| {
                format!("{shown} answered {status} without an error message; is --admin the admin listener?")
            }),
        })
    }
}

/// The useful tail of a connect error ("Connection refused", "Name or service not known").
fn connect_reason(message: &str) -> String {
    let tail = message.rsplit(": ").next().unwrap_or(message);
    let tail = tail.split(" (os error").next().unwrap_or(tail).trim();
    if tail.is_empty() {
        message.to_owned()
    } else {
        tail.to_lowercase()
    }
}

/// Prints `v` as indented JSON.
pub fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("{v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(admin: &str) -> AdminOpts {
        AdminOpts {
            admin: admin.into(),
            token_env: "SPILLWAY_TEST_NO_SUCH_VAR".into(),
            json: false,
        }
    }

    #[test]
    fn urls_are_joined_and_encoded() {
        let c = AdminClient::new(&opts("127.0.0.1:15081")).unwrap();
        assert_eq!(
            c.url(&["routes", "a b/c", "pause"], &[]).as_str(),
            "http://127.0.0.1:15081/routes/a%20b%2Fc/pause"
        );
        let c = AdminClient::new(&opts("http://h:1/prefix/")).unwrap();
        assert_eq!(
            c.url(&["jobs"], &[("route", "x&y".into())]).as_str(),
            "http://h:1/prefix/jobs?route=x%26y"
        );
    }

    #[test]
    fn bad_admin_urls_are_usage_errors() {
        for bad in ["ftp://h", "http://", "::"] {
            let e = AdminClient::new(&opts(bad)).err().unwrap();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn connect_reasons_are_short() {
        assert_eq!(
            connect_reason(
                "client error (Connect): tcp connect error: Connection refused (os error 111)"
            ),
            "connection refused"
        );
    }
}
