//! `spillway jobs …` and `spillway routes …`: the real binary as a client of a real
//! spillway's admin API; tables, `--json`, and the messages and exit codes of failures.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use support::{eventually, send, Action, FlakyUpstream, Spillway};

const TOKEN_VAR: &str = "SPILLWAY_TEST_CLI_TOKEN";
const TOKEN: &str = "cl1-t0ken-77aa";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `spillway ARGS` with a clean admin environment plus `env`, under the deadline of
/// `support::exits` (on a blocking thread: the flaky upstream shares this runtime).
async fn spillway(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"));
    cmd.args(args)
        .env_remove("SPILLWAY_ADMIN")
        .env_remove("SPILLWAY_ADMIN_TOKEN")
        .envs(env.iter().copied());
    let out = match tokio::task::spawn_blocking(move || support::exits(&mut cmd)).await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs an admin subcommand against `sw` with the right token.
async fn cli(sw: &Spillway, args: &[&str]) -> Out {
    let admin = format!("http://{}", sw.admin);
    let mut all = args.to_vec();
    all.extend(["--admin", &admin, "--token-env", TOKEN_VAR]);
    spillway(&all, &[(TOKEN_VAR, TOKEN)]).await
}

async fn ok(sw: &Spillway, args: &[&str]) -> Out {
    let out = cli(sw, args).await;
    assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
    out
}

fn config(up: std::net::SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0, token_env: {TOKEN_VAR} }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 2s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{up}
    deferrable: true
    timeout: 2s
  - name: tax
    match: {{ host: tax.test }}
    upstream: http://{up}
    circuit_breaker: {{ consecutive_failures: 3, open_for: 1h }}
"
    )
}

/// Refuses with 400 (dead at once) until `healthy` is set.
async fn recovering_upstream() -> (FlakyUpstream, Arc<AtomicBool>) {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let up = FlakyUpstream::start(move |_, _| {
        Action::status(if h.load(Ordering::SeqCst) { 200 } else { 400 })
    })
    .await;
    (up, healthy)
}

async fn enqueue(sw: &Spillway, body: &str) -> String {
    let req = Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("authorization", "Bearer app-s3cret")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let a = send(sw.proxy, req).await;
    assert_eq!(a.status, 202);
    a.header("spillway-job-id").unwrap().to_owned()
}

async fn state(sw: &Spillway, id: &str) -> String {
    cli(sw, &["jobs", "show", id, "--json"]).await.json()["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn wait_state(sw: &Spillway, id: &str, want: &str) {
    eventually(&format!("job {id} {want}"), || async {
        state(sw, id).await == want
    })
    .await;
}

#[tokio::test]
async fn jobs_list_show_retry_and_delete() {
    let (up, healthy) = recovering_upstream().await;
    let sw = Spillway::start_with_env(&config(up.addr), &[(TOKEN_VAR, TOKEN)]);
    let first = enqueue(&sw, r#"{"n":1}"#).await;
    let second = enqueue(&sw, r#"{"n":2}"#).await;
    wait_state(&sw, &first, "dead").await;
    wait_state(&sw, &second, "dead").await;

    // A table, newest first.
    let out = ok(&sw, &["jobs", "list"]).await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("ID"), "{}", out.stdout);
    assert!(lines[1].starts_with(&second), "{}", out.stdout);
    assert!(lines[2].starts_with(&first), "{}", out.stdout);
    assert!(
        lines[1].contains("dead") && lines[1].contains("status 400"),
        "{}",
        out.stdout
    );

    // Paging and filters, as JSON.
    let page = ok(&sw, &["jobs", "list", "--limit", "1", "--json"])
        .await
        .json();
    assert_eq!(page["jobs"][0]["id"], second.as_str());
    assert_eq!(page["next_cursor"], second.as_str());
    let out = ok(&sw, &["jobs", "list", "--limit", "1", "--cursor", &second]).await;
    assert!(out.stdout.contains(&first), "{}", out.stdout);
    assert!(!out.stdout.contains("more jobs"), "{}", out.stdout);
    let page = ok(
        &sw,
        &[
            "jobs",
            "list",
            "--route",
            "hooks",
            "--state",
            "delivered",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(page["jobs"], Value::Array(vec![]));
    assert_eq!(
        ok(&sw, &["jobs", "list", "--state", "delivered"])
            .await
            .stdout,
        "no jobs\n"
    );

    // One job, with its secret masked.
    let out = ok(&sw, &["jobs", "show", &first]).await;
    assert!(
        out.stdout.contains("state:            dead"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("authorization: [redacted]"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains(r#"{"n":1}"#), "{}", out.stdout);
    assert!(!out.stdout.contains("app-s3cret"), "{}", out.stdout);

    // Retry once the upstream is back.
    healthy.store(true, Ordering::SeqCst);
    let out = ok(&sw, &["jobs", "retry", &first]).await;
    assert!(out.stdout.contains("due again"), "{}", out.stdout);
    wait_state(&sw, &first, "delivered").await;
    let out = cli(&sw, &["jobs", "retry", &first]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("only dead or retrying jobs can be retried"),
        "{}",
        out.stderr
    );

    // Delete, then it is gone.
    let out = ok(&sw, &["jobs", "delete", &second, "--json"]).await;
    assert_eq!(out.json()["deleted"], true);
    let out = cli(&sw, &["jobs", "show", &second]).await;
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.starts_with("spillway: no job"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn routes_list_pause_resume_and_replay_dead() {
    let (up, healthy) = recovering_upstream().await;
    let sw = Spillway::start_with_env(&config(up.addr), &[(TOKEN_VAR, TOKEN)]);

    let out = ok(&sw, &["routes", "list"]).await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{}", out.stdout);
    assert!(
        lines[1].starts_with("hooks") && lines[1].contains("deferrable"),
        "{}",
        out.stdout
    );
    assert!(
        lines[2].starts_with("tax") && lines[2].contains("closed"),
        "{}",
        out.stdout
    );

    let out = ok(&sw, &["routes", "pause", "hooks"]).await;
    assert!(out.stdout.contains("paused"), "{}", out.stdout);
    let routes = ok(&sw, &["routes", "list", "--json"]).await.json();
    assert_eq!(routes["routes"][0]["paused"], true);
    let id = enqueue(&sw, "{}").await;
    assert_eq!(state(&sw, &id).await, "queued");
    ok(&sw, &["routes", "resume", "hooks"]).await;
    wait_state(&sw, &id, "dead").await;

    healthy.store(true, Ordering::SeqCst);
    let out = ok(&sw, &["routes", "replay-dead", "hooks"]).await;
    assert_eq!(out.stdout, "1 dead job of route hooks due again\n");
    wait_state(&sw, &id, "delivered").await;
    let out = ok(&sw, &["routes", "replay-dead", "hooks", "--json"]).await;
    assert_eq!(out.json()["replayed"], 0);

    let out = cli(&sw, &["routes", "pause", "nope"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("no route named \"nope\""),
        "{}",
        out.stderr
    );
    let out = cli(&sw, &["routes", "replay-dead", "tax"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("passthrough"), "{}", out.stderr);
}

#[tokio::test]
async fn an_unreachable_admin_api_is_named_with_a_hint_and_exit_3() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["jobs", "list", "--admin", &url],
        vec!["routes", "list", "--admin", &url],
    ] {
        let out = spillway(&args, &[]).await;
        assert_eq!(out.code, 3, "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.contains(&url), "{}", out.stderr);
        assert!(out.stderr.contains("connection refused"), "{}", out.stderr);
        assert!(out.stderr.contains("--admin"), "{}", out.stderr);
    }
    // SPILLWAY_ADMIN works like --admin.
    let out = spillway(&["routes", "list"], &[("SPILLWAY_ADMIN", &url)]).await;
    assert_eq!(out.code, 3);
    assert!(out.stderr.contains(&url), "{}", out.stderr);
    // A URL that is not one is a usage error.
    let out = spillway(&["jobs", "list", "--admin", "ftp://x"], &[]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
}

#[tokio::test]
async fn a_missing_or_wrong_token_names_the_variable_and_exits_4() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start_with_env(&config(up.addr), &[(TOKEN_VAR, TOKEN)]);
    let admin = format!("http://{}", sw.admin);

    let out = spillway(&["routes", "list", "--admin", &admin], &[]).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.contains("SPILLWAY_ADMIN_TOKEN is not set"),
        "{}",
        out.stderr
    );

    let out = spillway(
        &["routes", "list", "--admin", &admin],
        &[("SPILLWAY_ADMIN_TOKEN", "wrong")],
    )
    .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("refused the token in SPILLWAY_ADMIN_TOKEN"),
        "{}",
        out.stderr
    );

    // The default variable, and another one named with --token-env.
    let out = spillway(
        &["routes", "list", "--admin", &admin],
        &[("SPILLWAY_ADMIN_TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = spillway(
        &[
            "routes",
            "list",
            "--admin",
            &admin,
            "--token-env",
            "MY_TOKEN",
        ],
        &[("MY_TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[tokio::test]
async fn help_documents_the_exit_codes() {
    for args in [["jobs", "--help"], ["routes", "--help"]] {
        let out = spillway(&args, &[]).await;
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("Exit codes:"), "{}", out.stdout);
        assert!(
            out.stdout.contains("3  the admin API is unreachable"),
            "{}",
            out.stdout
        );
    }
}
