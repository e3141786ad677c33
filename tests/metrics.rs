//! `GET /metrics` on the admin listener: the numbers move as requests and jobs move, and
//! the output passes `promtool check metrics`. Real binary, real flaky upstream.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{eventually, get, send, Action, FlakyUpstream, Spillway};

fn deferred_config(upstream: std::net::SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 2s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{upstream}
    deferrable: true
    timeout: 5s
    retry:
      max_attempts: 5
      retry_on: [503]
      backoff: {{ initial: 100ms, max: 100ms, jitter: none }}
"
    )
}

fn passthrough_config(upstream: std::net::SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
routes:
  - name: api
    match: {{ host: api.test }}
    upstream: http://{upstream}
    timeout: 5s
    retry:
      max_attempts: 2
      retry_on: [503]
      backoff: {{ initial: 10ms, max: 10ms, jitter: none }}
    circuit_breaker: {{ consecutive_failures: 2, open_for: 60s }}
"
    )
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/v1/events")
        .header("host", "hooks.test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// One scrape, in the Prometheus text format.
async fn scrape(sw: &Spillway) -> String {
    let a = send(sw.admin, get("/metrics", "admin")).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    String::from_utf8(a.body.to_vec()).unwrap()
}

/// POSTs to the admin API (no token configured); returns the status.
async fn admin_post(sw: &Spillway, path: &str) -> u16 {
    let req = Request::post(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(sw.admin, req).await.status
}

/// Scrapes until `cond` holds for a scrape, and returns that scrape.
async fn scrape_until(sw: &Spillway, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let last = parking_lot::Mutex::new(String::new());
    let (last_ref, cond) = (&last, &cond);
    eventually(what, || async move {
        let text = scrape(sw).await;
        let ok = cond(&text);
        *last_ref.lock() = text;
        ok
    })
    .await;
    last.into_inner()
}

/// The value of the sample `name` whose labels include every pair in `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| v.parse::<f64>().ok())?
        })
        .next()
}

fn is(text: &str, name: &str, labels: &[(&str, &str)], want: f64) -> bool {
    value(text, name, labels) == Some(want)
}

/// One expected sample: family, labels, value.
type Sample<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Asserts every expected sample against one scrape, naming the one that fails.
fn expect(text: &str, rows: &[Sample<'_>]) {
    for (name, labels, want) in rows {
        assert!(
            is(text, name, labels, *want),
            "{name}{labels:?} = {want} expected; got {:?} in\n{text}",
            value(text, name, labels)
        );
    }
}

/// Lints a scrape with promtool, as Prometheus' own tooling reads it.
fn promtool_check(text: &str) {
    let found = Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool is not on PATH: install it (Debian: `apt-get install prometheus`, as .ci/run does) to run this test"
    );
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn queue_metrics_follow_jobs_from_accept_to_delivery_and_dead_letter() {
    // "poison" is refused for good; "ok" fails once, then is delivered.
    let failed_once = Arc::new(AtomicBool::new(false));
    let up = FlakyUpstream::start(move |_, r| {
        if r.body == "poison" {
            Action::status(400)
        } else if !failed_once.swap(true, Ordering::SeqCst) {
            Action::status(503)
        } else {
            Action::status(200)
        }
    })
    .await;
    let sw = Spillway::start(&deferred_config(up.addr));
    let hooks = [("route", "hooks")];

    let text = scrape(&sw).await;
    expect(
        &text,
        &[(
            "spillway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        )],
    );
    assert!(value(
        &text,
        "spillway_config_last_reload_success_timestamp_seconds",
        &[]
    )
    .is_some_and(|t| t > 1.0e9));
    assert!(is(&text, "spillway_queue_depth", &hooks, 0.0));
    expect(
        &text,
        &[("spillway_queue_oldest_job_age_seconds", &hooks, 0.0)],
    );
    assert!(value(&text, "spillway_queue_oldest_job_timestamp_seconds", &hooks).is_none());

    // Paused, the route accepts but delivers nothing: the jobs wait as `queued`.
    assert_eq!(admin_post(&sw, "/routes/hooks/pause").await, 200);
    assert_eq!(send(sw.proxy, post("ok")).await.status, 202);
    assert_eq!(send(sw.proxy, post("poison")).await.status, 202);
    let text = scrape_until(&sw, "two jobs queued, the oldest aging", |text| {
        is(
            text,
            "spillway_queue_depth",
            &[("route", "hooks"), ("state", "queued")],
            2.0,
        ) && value(text, "spillway_queue_oldest_job_age_seconds", &hooks).is_some_and(|a| a > 0.0)
    })
    .await;
    assert!(is(&text, "spillway_enqueued_total", &hooks, 2.0));
    assert!(value(&text, "spillway_queue_oldest_job_timestamp_seconds", &hooks).is_some());
    expect(
        &text,
        &[
            (
                "spillway_requests_total",
                &[("route", "hooks"), ("mode", "deferred"), ("code", "2xx")],
                2.0,
            ),
            (
                "spillway_request_duration_seconds_count",
                &[("route", "hooks"), ("mode", "deferred")],
                2.0,
            ),
        ],
    );
    assert!(value(&text, "spillway_delivery_attempts_total", &hooks).is_none());
    assert_eq!(up.count(), 0);

    assert_eq!(admin_post(&sw, "/routes/hooks/resume").await, 200);
    let text = scrape_until(&sw, "one delivered, one dead, nothing queued", |text| {
        is(text, "spillway_delivered_total", &hooks, 1.0)
            && is(text, "spillway_dead_letter_depth", &hooks, 1.0)
            && ["queued", "in_flight", "retrying"].iter().all(|st| {
                is(
                    text,
                    "spillway_queue_depth",
                    &[("route", "hooks"), ("state", st)],
                    0.0,
                )
            })
    })
    .await;
    assert_eq!(up.count(), 3);
    for (outcome, reason) in [
        ("retry", "status_503"),
        ("delivered", "ok"),
        ("dead", "non_retryable_status"),
    ] {
        assert!(
            is(
                &text,
                "spillway_delivery_attempts_total",
                &[("route", "hooks"), ("outcome", outcome), ("reason", reason)],
                1.0
            ),
            "{outcome} {reason} in\n{text}"
        );
    }
    expect(
        &text,
        &[
            (
                "spillway_retries_total",
                &[
                    ("route", "hooks"),
                    ("mode", "deferred"),
                    ("reason", "status_503"),
                ],
                1.0,
            ),
            (
                "spillway_dead_lettered_total",
                &[("route", "hooks"), ("reason", "non_retryable_status")],
                1.0,
            ),
        ],
    );
    assert!(is(&text, "spillway_queue_time_seconds_count", &hooks, 1.0));
    for code in ["503", "200", "400"] {
        expect(
            &text,
            &[(
                "spillway_upstream_requests_total",
                &[("route", "hooks"), ("mode", "deferred"), ("outcome", code)],
                1.0,
            )],
        );
    }
    expect(
        &text,
        &[
            (
                "spillway_upstream_request_duration_seconds_count",
                &[("route", "hooks"), ("mode", "deferred")],
                3.0,
            ),
            ("spillway_queue_oldest_job_age_seconds", &hooks, 0.0),
        ],
    );
    assert!(value(&text, "spillway_queue_oldest_job_timestamp_seconds", &hooks).is_none());
    assert!(is(&text, "spillway_queue_stats_errors_total", &[], 0.0));
    promtool_check(&text);
}

#[tokio::test]
async fn passthrough_status_codes_retries_refusals_and_circuit_state_are_counted() {
    // 503 then 200 (a retried GET), 404, then 500s that open the breaker.
    let up = FlakyUpstream::start(|n, _| match n {
        0 => Action::status(503),
        1 => Action::status(200),
        2 => Action::status(404),
        _ => Action::status(500),
    })
    .await;
    let sw = Spillway::start(&passthrough_config(up.addr));
    let api = |path: &str| get(path, "api.test");

    assert_eq!(send(sw.proxy, api("/a")).await.status, 200);
    assert_eq!(send(sw.proxy, api("/b")).await.status, 404);
    let text = scrape(&sw).await;
    let route = [("route", "api"), ("mode", "passthrough")];
    for (outcome, n) in [("503", 1.0), ("200", 1.0), ("404", 1.0)] {
        assert!(
            is(
                &text,
                "spillway_upstream_requests_total",
                &[route[0], route[1], ("outcome", outcome)],
                n
            ),
            "upstream {outcome} in\n{text}"
        );
    }
    expect(
        &text,
        &[
            (
                "spillway_retries_total",
                &[route[0], route[1], ("reason", "status_503")],
                1.0,
            ),
            (
                "spillway_requests_total",
                &[route[0], route[1], ("code", "2xx")],
                1.0,
            ),
            (
                "spillway_requests_total",
                &[route[0], route[1], ("code", "4xx")],
                1.0,
            ),
            (
                "spillway_upstream_request_duration_seconds_count",
                &route,
                3.0,
            ),
            (
                "spillway_circuit_state",
                &[("route", "api"), ("state", "closed")],
                1.0,
            ),
        ],
    );

    // Two failures open the breaker; the next request is refused without an attempt.
    for _ in 0..2 {
        assert_eq!(send(sw.proxy, api("/c")).await.status, 500);
    }
    let refused = send(sw.proxy, api("/d")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("spillway-error"), Some("circuit_open"));
    // No route: refused before any route or mode is known.
    assert_eq!(send(sw.proxy, get("/x", "nowhere.test")).await.status, 403);

    let text = scrape(&sw).await;
    expect(
        &text,
        &[
            (
                "spillway_circuit_state",
                &[("route", "api"), ("state", "open")],
                1.0,
            ),
            (
                "spillway_circuit_state",
                &[("route", "api"), ("state", "closed")],
                0.0,
            ),
            (
                "spillway_rejected_total",
                &[("route", "api"), ("reason", "circuit_open")],
                1.0,
            ),
            (
                "spillway_upstream_requests_total",
                &[route[0], route[1], ("outcome", "500")],
                2.0,
            ),
            (
                "spillway_requests_total",
                &[route[0], route[1], ("code", "5xx")],
                3.0,
            ),
            (
                "spillway_requests_total",
                &[("route", "(none)"), ("mode", "none"), ("code", "4xx")],
                1.0,
            ),
            (
                "spillway_rejected_total",
                &[("route", "(none)"), ("reason", "no_route")],
                1.0,
            ),
        ],
    );
    assert_eq!(up.count(), 5);
    promtool_check(&text);

    // Prometheus itself asks for OpenMetrics, and gets it.
    let mut req = get("/metrics", "admin");
    req.headers_mut().insert(
        "accept",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            .parse()
            .unwrap(),
    );
    let om = send(sw.admin, req).await;
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(String::from_utf8_lossy(&om.body).ends_with("# EOF\n"));
}

#[tokio::test]
async fn unmatched_passthrough_is_counted_under_its_own_label() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
unmatched: passthrough
egress: {{ allow: [127.0.0.0/8] }}
routes:
  - name: other
    match: {{ host: other.test }}
    upstream: http://{}
",
        up.addr
    ));
    let uri = format!("http://{}/v1/x", up.addr);
    assert_eq!(
        send(sw.proxy, get(&uri, &up.addr.to_string())).await.status,
        200
    );
    let text = scrape(&sw).await;
    let unmatched = ("route", "(unmatched)");
    expect(
        &text,
        &[
            (
                "spillway_requests_total",
                &[unmatched, ("mode", "passthrough"), ("code", "2xx")],
                1.0,
            ),
            (
                "spillway_upstream_requests_total",
                &[unmatched, ("mode", "passthrough"), ("outcome", "200")],
                1.0,
            ),
        ],
    );
}

#[tokio::test]
async fn a_rejected_reload_counts_an_error_and_a_good_one_moves_the_timestamp() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&passthrough_config(up.addr));
    let text = scrape(&sw).await;
    let started = value(
        &text,
        "spillway_config_last_reload_success_timestamp_seconds",
        &[],
    )
    .unwrap();
    expect(
        &text,
        &[("spillway_config_last_reload_successful", &[], 1.0)],
    );
    assert!(is(&text, "spillway_config_reload_errors_total", &[], 0.0));

    // A new file is renamed over the old (the watcher sees it) and SIGHUP asks as well:
    // one or two reloads, each rejected.
    let write = |yaml: &str| {
        let tmp = sw.dir.path().join(".spillway.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, sw.dir.path().join("spillway.yaml")).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sw.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    };
    write("routes: [ {name: broken\n");
    let text = scrape_until(&sw, "the rejected reload counted", |text| {
        value(text, "spillway_config_reload_errors_total", &[]).is_some_and(|n| n >= 1.0)
    })
    .await;
    expect(
        &text,
        &[("spillway_config_last_reload_successful", &[], 0.0)],
    );
    assert!(is(
        &text,
        "spillway_config_last_reload_success_timestamp_seconds",
        &[],
        started
    ));

    write(&passthrough_config(up.addr).replace("timeout: 5s", "timeout: 4s"));
    let text = scrape_until(&sw, "the good reload recorded", |text| {
        is(text, "spillway_config_last_reload_successful", &[], 1.0)
    })
    .await;
    assert!(value(
        &text,
        "spillway_config_last_reload_success_timestamp_seconds",
        &[]
    )
    .is_some_and(|t| t > started));
    promtool_check(&text);
}

#[tokio::test]
async fn jobs_of_a_route_removed_by_a_reload_stay_counted_as_orphaned() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&deferred_config(up.addr));
    // Paused, so the job is still stored when its route goes away.
    assert_eq!(admin_post(&sw, "/routes/hooks/pause").await, 200);
    assert_eq!(send(sw.proxy, post("kept")).await.status, 202);

    let without_hooks = format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{}/queue.redb' }}
routes:
  - name: api
    match: {{ host: api.test }}
    upstream: http://{}
",
        sw.dir.path().display(),
        up.addr
    );
    let tmp = sw.dir.path().join(".spillway.yaml.tmp");
    std::fs::write(&tmp, without_hooks).unwrap();
    std::fs::rename(&tmp, sw.dir.path().join("spillway.yaml")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sw.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();

    let text = scrape_until(&sw, "hooks reported as orphaned", |text| {
        is(text, "spillway_queue_orphaned", &[("route", "hooks")], 1.0)
    })
    .await;
    expect(
        &text,
        &[(
            "spillway_queue_depth",
            &[("route", "hooks"), ("state", "queued")],
            1.0,
        )],
    );
    assert_eq!(up.count(), 0);
    promtool_check(&text);
}
