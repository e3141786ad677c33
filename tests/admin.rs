//! The admin API against the real binary: auth, jobs (list, show with redaction, retry,
//! delete), routes (depth, circuit, pause across restart, replay-dead) and config.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;
use support::{eventually, send, Action, Answer, FlakyUpstream, Spillway};

const TOKEN_VAR: &str = "SPILLWAY_TEST_ADMIN_TOKEN";
const TOKEN: &str = "adm1n-t0ken-9f3e";

/// A deferrable route `hooks` to `up`, a passthrough route `tax` with a breaker to `down`.
fn config(up: std::net::SocketAddr, down: std::net::SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0, token_env: {TOKEN_VAR} }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 2s
redact_headers: [X-Api-Key]
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{up}
    deferrable: true
    timeout: 2s
    retry:
      max_attempts: 5
      retry_on: [503]
      backoff: {{ initial: 50ms, max: 200ms, jitter: none }}
  - name: tax
    match: {{ host: tax.test }}
    upstream: http://{down}
    retry: {{ max_attempts: 1 }}
    circuit_breaker: {{ consecutive_failures: 2, open_for: 1h }}
"
    )
}

fn start(yaml: &str) -> Spillway {
    Spillway::start_with_env(yaml, &[(TOKEN_VAR, TOKEN)])
}

/// An upstream that refuses (400, dead at once) until `healthy` is set, then accepts.
async fn recovering_upstream() -> (FlakyUpstream, Arc<AtomicBool>) {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let up = FlakyUpstream::start(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Action::status(200)
        } else {
            Action::Respond {
                status: 400,
                headers: vec![
                    ("set-cookie", "upstream-session=c0okie-from-upstream".into()),
                    ("x-api-key", "upstream-k3y-value".into()),
                    ("x-upstream-note", "visible-note".into()),
                ],
                body: Bytes::from_static(b"{\"error\":\"bad payload\"}"),
            }
        }
    })
    .await;
    (up, healthy)
}

async fn always(status: u16) -> FlakyUpstream {
    FlakyUpstream::start(move |_, _| Action::status(status)).await
}

async fn call_as(sw: &Spillway, method: &str, path: &str, token: Option<&str>) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", sw.admin.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(sw.admin, req.body(Full::new(Bytes::new())).unwrap()).await
}

async fn call(sw: &Spillway, method: &str, path: &str) -> Answer {
    call_as(sw, method, path, Some(TOKEN)).await
}

async fn get_json(sw: &Spillway, path: &str) -> Value {
    let a = call(sw, "GET", path).await;
    assert_eq!(
        a.status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

/// Sends one deferrable request; returns its job id.
async fn enqueue(sw: &Spillway, body: &str, headers: &[(&str, &str)]) -> String {
    let mut req = Request::post("/v1/events").header("host", "hooks.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let a = send(
        sw.proxy,
        req.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
    )
    .await;
    assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
    a.header("spillway-job-id").unwrap().to_owned()
}

async fn wait_state(sw: &Spillway, id: &str, state: &str) {
    eventually(&format!("job {id} {state}"), || async {
        call(sw, "GET", &format!("/jobs/{id}")).await.json()["state"] == state
    })
    .await;
}

async fn route(sw: &Spillway, name: &str) -> Value {
    let v = get_json(sw, "/routes").await;
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no route {name} in {v}"))
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        a.json()["error"],
        code,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(a.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(a.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn health_endpoints_are_open_and_everything_else_needs_the_token() {
    let (up, down) = (always(200).await, always(200).await);
    let sw = start(&config(up.addr, down.addr));
    assert_eq!(call_as(&sw, "GET", "/healthz", None).await.status, 200);
    // Ready a moment after the listeners are reported.
    eventually("readyz without a token", || async {
        call_as(&sw, "GET", "/readyz", None).await.status == 200
    })
    .await;
    let id = "0192f3a4-5b6c-7d8e-9f01-23456789abcd";
    let protected = [
        ("GET", "/jobs".to_owned()),
        ("GET", format!("/jobs/{id}")),
        ("POST", format!("/jobs/{id}/retry")),
        ("DELETE", format!("/jobs/{id}")),
        ("GET", "/routes".to_owned()),
        ("POST", "/routes/hooks/pause".to_owned()),
        ("POST", "/routes/hooks/resume".to_owned()),
        ("POST", "/routes/hooks/replay-dead".to_owned()),
        ("GET", "/config".to_owned()),
        ("GET", "/metrics".to_owned()),
        ("GET", "/no-such-endpoint".to_owned()),
    ];
    for (method, path) in &protected {
        let a = call_as(&sw, method, path, None).await;
        assert_error(&a, 401, "unauthorized");
        let challenge = a.header("www-authenticate").unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert!(a.json()["message"].as_str().unwrap().contains(TOKEN_VAR));

        let a = call_as(&sw, method, path, Some("not-the-token")).await;
        assert_error(&a, 401, "unauthorized");
        assert!(a
            .header("www-authenticate")
            .unwrap()
            .contains("invalid_token"));
    }
    // A refused pause changed nothing.
    assert_eq!(route(&sw, "hooks").await["paused"], false);
    // With the token: through to the handlers.
    assert_eq!(call(&sw, "GET", "/jobs").await.status, 200);
    assert_eq!(call(&sw, "GET", "/routes").await.status, 200);
    assert_eq!(call(&sw, "GET", "/config").await.status, 200);
    assert_error(
        &call(&sw, "GET", "/no-such-endpoint").await,
        404,
        "not_found",
    );
    assert_error(&call(&sw, "PUT", "/jobs").await, 405, "method_not_allowed");
}

#[tokio::test]
async fn without_a_token_the_admin_api_on_loopback_is_open() {
    let (up, down) = (always(200).await, always(200).await);
    let yaml = config(up.addr, down.addr).replace(&format!(", token_env: {TOKEN_VAR}"), "");
    let sw = Spillway::start(&yaml);
    assert_eq!(call_as(&sw, "GET", "/jobs", None).await.status, 200);
    assert_eq!(call_as(&sw, "GET", "/routes", None).await.status, 200);
    let cfg = call_as(&sw, "GET", "/config", None).await.json();
    assert_eq!(cfg["admin"]["token_set"], false);
}

#[tokio::test]
async fn job_detail_redacts_secrets_and_logs_never_carry_them() {
    let (up, _healthy) = recovering_upstream().await;
    let down = always(200).await;
    let sw = start(&config(up.addr, down.addr));
    let id = enqueue(
        &sw,
        r#"{"order":42}"#,
        &[
            ("authorization", "Bearer client-s3cret-bearer"),
            ("cookie", "session=client-c00kie-value"),
            ("x-api-key", "client-k3y-value"),
            ("x-visible", "plain-value"),
            ("content-type", "application/json"),
        ],
    )
    .await;
    wait_state(&sw, &id, "dead").await;
    let a = call(&sw, "GET", &format!("/jobs/{id}")).await;
    assert_eq!(a.status, 200);
    let raw = String::from_utf8_lossy(&a.body).into_owned();
    let job = a.json();

    let header = |list: &Value, name: &str| -> String {
        list.as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|h| h["value"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no header {name} in {list}"))
    };
    for name in ["authorization", "cookie", "x-api-key"] {
        assert_eq!(header(&job["headers"], name), "[redacted]", "{name}");
    }
    assert_eq!(header(&job["headers"], "x-visible"), "plain-value");
    let last = &job["last"];
    assert_eq!(last["status"], 400);
    for name in ["set-cookie", "x-api-key"] {
        assert_eq!(header(&last["headers"], name), "[redacted]", "{name}");
    }
    assert_eq!(header(&last["headers"], "x-upstream-note"), "visible-note");
    for secret in [
        "client-s3cret-bearer",
        "client-c00kie-value",
        "client-k3y-value",
        "c0okie-from-upstream",
        "upstream-k3y-value",
    ] {
        assert!(!raw.contains(secret), "{secret} leaked in {raw}");
        assert!(!sw.logs().contains(secret), "{secret} leaked in the log");
    }

    // The rest of the record.
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["route"], "hooks");
    assert_eq!(job["method"], "POST");
    assert!(job["uri"].as_str().unwrap().ends_with("/v1/events"));
    assert_eq!(job["attempts"], 1);
    assert!(
        job["dead_reason"].as_str().unwrap().contains("400"),
        "{job}"
    );
    assert!(!job["idempotency_key"].as_str().unwrap().is_empty());
    assert!(job["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(job["created_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(job["updated_at_ms"].as_u64() >= job["created_at_ms"].as_u64());
    assert!(
        job["next_attempt_at"].is_null(),
        "a dead job has no next attempt"
    );
    assert_eq!(job["body"]["encoding"], "utf-8");
    assert_eq!(job["body"]["text"], r#"{"order":42}"#);
    assert_eq!(job["body"]["truncated"], false);
    assert_eq!(last["body"]["text"], r#"{"error":"bad payload"}"#);

    // A body that is not UTF-8 is shown by size and hash only.
    let mut req = Request::post("/bin").header("host", "hooks.test");
    req = req.header("content-type", "application/octet-stream");
    let bin = send(
        sw.proxy,
        req.body(Full::new(Bytes::from_static(&[0xff, 0x00, 0xfe, 0x01])))
            .unwrap(),
    )
    .await;
    let bin_id = bin.header("spillway-job-id").unwrap().to_owned();
    let bin = get_json(&sw, &format!("/jobs/{bin_id}")).await;
    assert_eq!(bin["body"]["encoding"], "binary");
    assert_eq!(bin["body"]["size"], 4);
    assert!(bin["body"]["text"].is_null());
    use sha2::Digest;
    let expected = hex::encode(sha2::Sha256::digest([0xff, 0x00, 0xfe, 0x01]));
    assert_eq!(bin["body"]["sha256"], expected.as_str());
}

#[tokio::test]
async fn jobs_list_paginates_newest_first_with_a_cursor() {
    let (up, down) = (always(200).await, always(200).await);
    let sw = start(&config(up.addr, down.addr));
    // Paused, so the states stay put while the pages are read.
    assert_eq!(call(&sw, "POST", "/routes/hooks/pause").await.status, 200);
    let mut sent = Vec::new();
    for n in 0..7 {
        sent.push(enqueue(&sw, &format!("{{\"n\":{n}}}"), &[]).await);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/jobs?route=hooks&limit=3&cursor={c}"),
            None => "/jobs?route=hooks&limit=3".to_owned(),
        };
        let page = get_json(&sw, &path).await;
        pages += 1;
        assert!(pages <= 3, "too many pages");
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 3);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut newest_first = sent.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // Filters and the cap.
    let queued = get_json(&sw, "/jobs?state=queued&limit=1000").await;
    assert_eq!(queued["jobs"].as_array().unwrap().len(), 7);
    assert_eq!(
        get_json(&sw, "/jobs?state=dead").await["jobs"],
        Value::Array(vec![])
    );
    assert_eq!(
        get_json(&sw, "/jobs?route=tax").await["jobs"],
        Value::Array(vec![])
    );
    assert_eq!(get_json(&sw, "/jobs?limit=5000").await["limit"], 1000);
    assert_eq!(get_json(&sw, "/jobs").await["limit"], 50);
    for bad in [
        "/jobs?limit=0",
        "/jobs?limit=ten",
        "/jobs?state=sleeping",
        "/jobs?cursor=not-an-id",
        "/jobs?colour=blue",
    ] {
        assert_error(&call(&sw, "GET", bad).await, 400, "bad_request");
    }
}

#[tokio::test]
async fn unknown_and_malformed_job_ids_are_404_and_400() {
    let (up, down) = (always(200).await, always(200).await);
    let sw = start(&config(up.addr, down.addr));
    let unknown = "0192f3a4-5b6c-7d8e-9f01-23456789abcd";
    assert_error(
        &call(&sw, "GET", &format!("/jobs/{unknown}")).await,
        404,
        "job_not_found",
    );
    assert_error(
        &call(&sw, "DELETE", &format!("/jobs/{unknown}")).await,
        404,
        "job_not_found",
    );
    assert_error(
        &call(&sw, "POST", &format!("/jobs/{unknown}/retry")).await,
        404,
        "job_not_found",
    );
    for method in ["GET", "DELETE"] {
        assert_error(&call(&sw, method, "/jobs/12345").await, 400, "bad_job_id");
    }
    assert_error(
        &call(&sw, "POST", "/jobs/nope/retry").await,
        400,
        "bad_job_id",
    );
}

#[tokio::test]
async fn retry_makes_a_dead_job_due_now_with_a_fresh_budget_of_attempts() {
    let (up, healthy) = recovering_upstream().await;
    let down = always(200).await;
    let sw = start(&config(up.addr, down.addr));
    let id = enqueue(&sw, "{}", &[]).await;
    wait_state(&sw, &id, "dead").await;
    healthy.store(true, Ordering::SeqCst);

    let a = call(&sw, "POST", &format!("/jobs/{id}/retry")).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["id"], id.as_str());
    // A fresh budget: a job dead of max_attempts must not die again at its first lease.
    assert_eq!(a.json()["attempts"], 0);
    wait_state(&sw, &id, "delivered").await;
    assert_eq!(up.count(), 2);
    let job = get_json(&sw, &format!("/jobs/{id}")).await;
    assert_eq!(job["attempts"], 1);
    assert!(job["dead_reason"].is_null());

    // Only dead or retrying jobs can be retried.
    let a = call(&sw, "POST", &format!("/jobs/{id}/retry")).await;
    assert_error(&a, 409, "not_retryable");
    assert!(a.json()["message"].as_str().unwrap().contains("delivered"));
}

#[tokio::test]
async fn delete_removes_a_job() {
    let (up, _healthy) = recovering_upstream().await;
    let down = always(200).await;
    let sw = start(&config(up.addr, down.addr));
    let id = enqueue(&sw, "{}", &[]).await;
    wait_state(&sw, &id, "dead").await;
    assert_eq!(route(&sw, "hooks").await["dead"], 1);

    let a = call(&sw, "DELETE", &format!("/jobs/{id}")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["deleted"], true);
    assert_error(
        &call(&sw, "GET", &format!("/jobs/{id}")).await,
        404,
        "job_not_found",
    );
    assert_error(
        &call(&sw, "DELETE", &format!("/jobs/{id}")).await,
        404,
        "job_not_found",
    );
    assert_eq!(route(&sw, "hooks").await["dead"], 0);
    assert_eq!(get_json(&sw, "/jobs").await["jobs"], Value::Array(vec![]));
}

#[tokio::test]
async fn replay_dead_delivers_every_dead_job_once_the_upstream_recovers() {
    let (up, healthy) = recovering_upstream().await;
    let down = always(200).await;
    let sw = start(&config(up.addr, down.addr));
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(enqueue(&sw, &format!("{{\"n\":{n}}}"), &[]).await);
    }
    for id in &ids {
        wait_state(&sw, id, "dead").await;
    }
    assert_eq!(route(&sw, "hooks").await["dead"], 3);

    healthy.store(true, Ordering::SeqCst);
    let a = call(&sw, "POST", "/routes/hooks/replay-dead").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["replayed"], 3);
    for id in &ids {
        wait_state(&sw, id, "delivered").await;
    }
    assert_eq!(up.count(), 6);
    let r = route(&sw, "hooks").await;
    assert_eq!(r["dead"], 0);
    assert_eq!(r["depth"]["total"], 0);
    // Nothing left to replay.
    assert_eq!(
        get_json_post(&sw, "/routes/hooks/replay-dead").await["replayed"],
        0
    );

    assert_error(
        &call(&sw, "POST", "/routes/nope/replay-dead").await,
        404,
        "route_not_found",
    );
    assert_error(
        &call(&sw, "POST", "/routes/tax/replay-dead").await,
        409,
        "not_deferrable",
    );
}

async fn get_json_post(sw: &Spillway, path: &str) -> Value {
    let a = call(sw, "POST", path).await;
    assert_eq!(
        a.status,
        200,
        "POST {path}: {}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

#[tokio::test]
async fn a_pause_survives_a_restart_and_nothing_is_delivered_until_resume() {
    let up = always(200).await;
    let down = always(200).await;
    let mut sw = start(&config(up.addr, down.addr));
    let a = get_json_post(&sw, "/routes/hooks/pause").await;
    assert_eq!(a["paused"], true);
    let before = enqueue(&sw, "{\"n\":1}", &[]).await;

    sw.kill9();
    sw.restart();
    let r = route(&sw, "hooks").await;
    assert_eq!(r["paused"], true, "{r}");
    // Accepting goes on while paused.
    let after = enqueue(&sw, "{\"n\":2}", &[]).await;
    eventually("both jobs queued", || async {
        route(&sw, "hooks").await["depth"]["queued"] == 2
    })
    .await;
    // A bounded look for a delivery that must not happen.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(up.count(), 0, "a paused route delivered");
    let r = route(&sw, "hooks").await;
    assert!(
        r["oldest_queued_age_seconds"].as_f64().unwrap() > 0.0,
        "{r}"
    );

    let a = get_json_post(&sw, "/routes/hooks/resume").await;
    assert_eq!(a["paused"], false);
    wait_state(&sw, &before, "delivered").await;
    wait_state(&sw, &after, "delivered").await;
    assert_eq!(route(&sw, "hooks").await["paused"], false);

    assert_error(
        &call(&sw, "POST", "/routes/nope/pause").await,
        404,
        "route_not_found",
    );
    assert_error(
        &call(&sw, "POST", "/routes/tax/resume").await,
        409,
        "not_deferrable",
    );
}

#[tokio::test]
async fn routes_show_mode_depth_dead_count_and_circuit_state() {
    let (up, _healthy) = recovering_upstream().await;
    let down = always(500).await;
    let sw = start(&config(up.addr, down.addr));
    let tax = route(&sw, "tax").await;
    assert_eq!(tax["mode"], "passthrough");
    assert_eq!(tax["circuit"], "closed");
    assert_eq!(tax["upstream"], format!("http://{}/", down.addr));
    assert!(tax["depth"].is_null());
    for _ in 0..2 {
        let req = Request::get("/q")
            .header("host", "tax.test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(sw.proxy, req).await.status, 500);
    }
    assert_eq!(route(&sw, "tax").await["circuit"], "open");

    let id = enqueue(&sw, "{}", &[]).await;
    wait_state(&sw, &id, "dead").await;
    let hooks = route(&sw, "hooks").await;
    assert_eq!(hooks["mode"], "deferrable");
    assert!(hooks["circuit"].is_null());
    assert_eq!(hooks["paused"], false);
    assert!(hooks["paused_until"].is_null());
    assert_eq!(hooks["dead"], 1);
    assert_eq!(
        hooks["depth"],
        serde_json::json!({"queued": 0, "in_flight": 0, "retrying": 0, "total": 0})
    );
    assert!(hooks["oldest_queued_age_seconds"].is_null());
}

#[tokio::test]
async fn a_retry_after_pause_shows_until_when() {
    let up = FlakyUpstream::start(|_, _| Action::Respond {
        status: 503,
        headers: vec![("retry-after", "3600".into())],
        body: Bytes::new(),
    })
    .await;
    let down = always(200).await;
    let yaml = config(up.addr, down.addr).replace("max: 200ms", "max: 2h");
    let sw = start(&yaml);
    enqueue(&sw, "{}", &[]).await;
    eventually("the route paused by Retry-After", || async {
        route(&sw, "hooks").await["paused_until_ms"].is_u64()
    })
    .await;
    let r = route(&sw, "hooks").await;
    assert_eq!(
        r["paused"], false,
        "a Retry-After pause is not an operator pause"
    );
    assert!(r["paused_until"].as_str().unwrap().ends_with('Z'));
    // Resume ends it at once.
    get_json_post(&sw, "/routes/hooks/resume").await;
    assert!(route(&sw, "hooks").await["paused_until"].is_null());
}

#[tokio::test]
async fn config_is_shown_without_the_token_value() {
    let (up, down) = (always(200).await, always(200).await);
    let sw = start(&config(up.addr, down.addr));
    let a = call(&sw, "GET", "/config").await;
    assert_eq!(a.status, 200);
    let raw = String::from_utf8_lossy(&a.body).into_owned();
    assert!(!raw.contains(TOKEN), "the token leaked: {raw}");
    let c = a.json();
    assert_eq!(c["admin"]["token_env"], TOKEN_VAR);
    assert_eq!(c["admin"]["token_set"], true);
    assert_eq!(c["redact_headers"], serde_json::json!(["x-api-key"]));
    assert_eq!(c["routes"][0]["name"], "hooks");
    assert_eq!(c["routes"][0]["deferrable"], true);
    assert_eq!(c["routes"][0]["retry"]["max_attempts"], 5);
    assert_eq!(
        c["routes"][0]["retry"]["retry_on"],
        serde_json::json!([503])
    );
    assert_eq!(c["routes"][1]["circuit_breaker"]["consecutive_failures"], 2);
    assert_eq!(c["shutdown_grace"], "2s");
}

#[tokio::test]
async fn without_a_deferrable_route_job_endpoints_answer_no_queue() {
    let down = always(200).await;
    let yaml = format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0, token_env: {TOKEN_VAR} }}
routes:
  - name: tax
    match: {{ host: tax.test }}
    upstream: http://{}
",
        down.addr
    );
    let sw = start(&yaml);
    let id = "0192f3a4-5b6c-7d8e-9f01-23456789abcd";
    assert_error(&call(&sw, "GET", "/jobs").await, 404, "no_queue");
    assert_error(
        &call(&sw, "GET", &format!("/jobs/{id}")).await,
        404,
        "no_queue",
    );
    assert_error(
        &call(&sw, "POST", &format!("/jobs/{id}/retry")).await,
        404,
        "no_queue",
    );
    assert_error(
        &call(&sw, "DELETE", &format!("/jobs/{id}")).await,
        404,
        "no_queue",
    );
    assert_error(
        &call(&sw, "POST", "/routes/tax/pause").await,
        409,
        "not_deferrable",
    );
    let routes = get_json(&sw, "/routes").await;
    assert_eq!(routes["routes"][0]["mode"], "passthrough");
    assert!(
        routes["routes"][0]["circuit"].is_null(),
        "no breaker configured"
    );
}
