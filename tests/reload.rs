//! Hot reload, end to end: SIGHUP and file changes swap routes and policies while the
//! process keeps its listeners; an invalid file changes nothing; jobs of a removed route
//! wait for it. Real binary, real upstreams on 127.0.0.1.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use parking_lot::Mutex;
use support::{eventually, get, send, Action, FlakyUpstream, Spillway};

const HEAD: &str = "listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
storage: { path: '{data}/queue.redb' }
shutdown_grace: 2s
";

fn route(name: &str, up: SocketAddr, extra: &str) -> String {
    format!(
        "  - name: {name}
    match: {{ host: {name}.test }}
    upstream: http://{up}
    timeout: 2s
{extra}"
    )
}

fn config(routes: &[String]) -> String {
    format!("{HEAD}routes:\n{}", routes.concat())
}

/// Writes the file the way editors and config tools do: a new file renamed over the old.
fn rewrite(sw: &Spillway, yaml: &str) {
    let yaml = yaml.replace("{data}", &sw.dir.path().display().to_string());
    let tmp = sw.dir.path().join(".spillway.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, sw.dir.path().join("spillway.yaml")).unwrap();
}

fn sighup(sw: &Spillway) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sw.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

/// JSON log lines whose message contains `text`.
fn log_lines(sw: &Spillway, text: &str) -> Vec<serde_json::Value> {
    sw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

async fn status(sw: &Spillway, host: &str) -> u16 {
    send(sw.proxy, get("/x", host)).await.status
}

fn post(host: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post("/hook")
        .header("host", host)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn sighup_adds_removes_and_changes_routes() {
    let a = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let b = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let limited = "    rate_limit: { per_second: 1, burst: 1 }\n";
    let sw = Spillway::start_with_args(
        &config(&[
            route("one", a.addr, ""),
            route("two", a.addr, ""),
            route("lim", a.addr, limited),
        ]),
        &["--no-watch"],
    );
    assert_eq!(status(&sw, "one.test").await, 200);
    assert_eq!(status(&sw, "two.test").await, 200);
    assert_eq!(status(&sw, "three.test").await, 403);
    // One per second, burst one: five in a row cannot all pass.
    let mut refused = 0;
    for _ in 0..5 {
        let a = send(sw.proxy, get("/x", "lim.test")).await;
        if a.status == 429 {
            assert_eq!(a.header("spillway-error"), Some("rate_limited"));
            refused += 1;
        }
    }
    assert!(refused > 0, "the rate limit never refused");

    let generous = "    rate_limit: { per_second: 1000, burst: 1000 }\n";
    rewrite(
        &sw,
        &config(&[
            route("one", b.addr, ""),
            route("three", a.addr, ""),
            route("lim", a.addr, generous),
        ]),
    );
    sighup(&sw);
    eventually("the reload is logged", || async {
        !log_lines(&sw, "config reloaded").is_empty()
    })
    .await;
    let line = &log_lines(&sw, "config reloaded")[0];
    assert_eq!(line["trigger"], "sighup");
    assert_eq!(line["added"], r#"["three"]"#);
    assert_eq!(line["removed"], r#"["two"]"#);
    let changed = line["changed"].as_str().unwrap();
    assert!(changed.contains("one (upstream)"), "{changed}");
    assert!(changed.contains("lim (rate_limit)"), "{changed}");

    // Same listener, new table.
    assert_eq!(status(&sw, "three.test").await, 200);
    let gone = send(sw.proxy, get("/x", "two.test")).await;
    assert_eq!(gone.status, 403);
    assert_eq!(gone.json()["error"], "no_route");
    let before = b.count();
    assert_eq!(status(&sw, "one.test").await, 200);
    assert_eq!(
        b.count(),
        before + 1,
        "route one did not move to upstream b"
    );
    for _ in 0..5 {
        assert_eq!(status(&sw, "lim.test").await, 200);
    }
}

#[tokio::test]
async fn an_invalid_file_keeps_the_running_config_and_logs_every_error() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let good = config(&[route("one", up.addr, "")]);
    let sw = Spillway::start_with_args(&good, &["--no-watch"]);
    assert_eq!(status(&sw, "one.test").await, 200);

    let bad = good
        .replace("timeout: 2s", "timeout: 2")
        .replace("routes:\n", "unmatched: sometimes\nroutes:\n");
    rewrite(&sw, &bad);
    sighup(&sw);
    eventually("the rejection is logged", || async {
        !log_lines(&sw, "config reload rejected").is_empty()
    })
    .await;
    let errors = log_lines(&sw, "config reload: ");
    let keys: Vec<&str> = errors.iter().filter_map(|e| e["key"].as_str()).collect();
    assert!(keys.contains(&"routes[0].timeout"), "{keys:?}");
    assert!(keys.contains(&"unmatched"), "{keys:?}");
    for e in &errors {
        assert!(e["line"].as_u64().is_some(), "no line in {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("spillway.yaml:"), "{msg}");
    }
    assert_eq!(log_lines(&sw, "config reload rejected")[0]["errors"], 2);
    // Still serving the old config.
    assert_eq!(status(&sw, "one.test").await, 200);

    // A fixed file applies again.
    rewrite(
        &sw,
        &config(&[route("one", up.addr, ""), route("two", up.addr, "")]),
    );
    sighup(&sw);
    eventually("the fixed file applies", || async {
        status(&sw, "two.test").await == 200
    })
    .await;

    // A truncated file is refused rather than read as "no routes".
    std::fs::write(sw.dir.path().join("spillway.yaml"), "").unwrap();
    sighup(&sw);
    eventually("the empty file is refused", || async {
        !log_lines(&sw, "the file is empty").is_empty()
    })
    .await;
    assert_eq!(status(&sw, "two.test").await, 200);
}

#[tokio::test]
async fn a_changed_file_reloads_without_a_signal() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&[route("one", up.addr, "")]));
    assert_eq!(status(&sw, "two.test").await, 403);
    rewrite(
        &sw,
        &config(&[route("one", up.addr, ""), route("two", up.addr, "")]),
    );
    eventually("the new route answers", || async {
        status(&sw, "two.test").await == 200
    })
    .await;
    let line = &log_lines(&sw, "config reloaded")[0];
    assert_eq!(line["trigger"], "file_change");
    assert_eq!(line["added"], r#"["two"]"#);

    // An in-place edit (no rename) is seen too.
    let path = sw.dir.path().join("spillway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("name: two", "name: deux")
            .replace("two.test", "deux.test"),
    )
    .unwrap();
    eventually("the renamed route answers", || async {
        status(&sw, "deux.test").await == 200
    })
    .await;
    assert_eq!(status(&sw, "two.test").await, 403);
}

#[tokio::test]
async fn listener_changes_need_a_restart_and_the_rest_applies() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start_with_args(&config(&[route("one", up.addr, "")]), &["--no-watch"]);
    let moved = config(&[route("one", up.addr, ""), route("two", up.addr, "")])
        .replace("listen: 127.0.0.1:0\nadmin", "listen: 127.0.0.1:1\nadmin")
        .replace("routes:\n", "limits: { max_connections: 3 }\nroutes:\n");
    rewrite(&sw, &moved);
    sighup(&sw);
    eventually("the reload is logged", || async {
        !log_lines(&sw, "config reloaded").is_empty()
    })
    .await;
    let restart = log_lines(&sw, "needs a restart");
    let keys: Vec<&str> = restart.iter().filter_map(|l| l["key"].as_str()).collect();
    assert_eq!(keys, ["listen", "limits.max_connections"]);
    // The old listener still serves, with the new route.
    assert_eq!(status(&sw, "two.test").await, 200);
}

#[tokio::test]
async fn jobs_of_a_removed_route_stay_stored_and_deliver_when_it_returns() {
    let healthy = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(Mutex::new(HashSet::new()));
    let (h, d) = (healthy.clone(), delivered.clone());
    let up = FlakyUpstream::start(move |_, req| {
        if h.load(Ordering::SeqCst) {
            let key = req.headers["idempotency-key"].to_str().unwrap().to_owned();
            d.lock().insert(key);
            Action::status(200)
        } else {
            Action::status(503)
        }
    })
    .await;
    let hooks = route(
        "hooks",
        up.addr,
        "    deferrable: true
    retry:
      max_attempts: 1000
      backoff: { initial: 50ms, max: 200ms, jitter: none }
",
    );
    let other = route("other", up.addr, "");
    let sw = Spillway::start_with_args(&config(&[hooks.clone(), other.clone()]), &["--no-watch"]);
    for key in ["k1", "k2", "k3"] {
        assert_eq!(send(sw.proxy, post("hooks.test", key)).await.status, 202);
    }
    eventually("every job was tried", || async { up.count() >= 3 }).await;

    rewrite(&sw, &config(std::slice::from_ref(&other)));
    sighup(&sw);
    // The dispatcher stops while the reload applies; the reload is logged after that.
    eventually(
        "the route's dispatcher stops and the reload is logged",
        || async {
            !log_lines(&sw, "dispatcher stopped").is_empty()
                && !log_lines(&sw, "config reloaded").is_empty()
        },
    )
    .await;
    let reloaded = &log_lines(&sw, "config reloaded")[0];
    assert_eq!(reloaded["removed"], r#"["hooks"]"#);
    let orphaned = &log_lines(&sw, "their jobs stay stored")[0];
    assert_eq!(orphaned["orphaned"], r#"["hooks"]"#);
    assert_eq!(send(sw.proxy, post("hooks.test", "k4")).await.status, 403);
    // The admin API lists the stored jobs' route as orphaned.
    let rsp = send(sw.admin, get("/routes", "admin")).await;
    assert_eq!(rsp.status, 200);
    let routes: serde_json::Value = serde_json::from_slice(&rsp.body).unwrap();
    let hooks_row = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "hooks")
        .expect("orphaned route listed")
        .clone();
    assert_eq!(hooks_row["mode"], "orphaned");
    assert_eq!(hooks_row["orphaned"], true);
    assert_eq!(hooks_row["depth"]["total"], 3);

    healthy.store(true, Ordering::SeqCst);
    rewrite(&sw, &config(&[hooks, other]));
    sighup(&sw);
    eventually("the stored jobs are delivered", || async {
        delivered.lock().len() == 3
    })
    .await;
    let keys = delivered.lock().clone();
    assert_eq!(keys, HashSet::from(["k1", "k2", "k3"].map(String::from)));
}

#[tokio::test]
async fn a_changed_deferrable_route_delivers_new_jobs_to_its_new_upstream() {
    let a = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let b = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start_with_args(
        &config(&[route("hooks", a.addr, "    deferrable: true\n")]),
        &["--no-watch"],
    );
    assert_eq!(
        send(sw.proxy, post("hooks.test", "before")).await.status,
        202
    );
    eventually("delivered to a", || async { a.count() == 1 }).await;

    rewrite(
        &sw,
        &config(&[route("hooks", b.addr, "    deferrable: true\n")]),
    );
    sighup(&sw);
    eventually("the reload is logged", || async {
        !log_lines(&sw, "config reloaded").is_empty()
    })
    .await;
    assert_eq!(
        send(sw.proxy, post("hooks.test", "after")).await.status,
        202
    );
    eventually("delivered to b", || async { b.count() == 1 }).await;
    assert_eq!(b.requests()[0].headers["idempotency-key"], "after");
    assert_eq!(a.count(), 1);
}

#[tokio::test]
async fn an_unchanged_route_keeps_its_breaker_and_a_changed_one_starts_afresh() {
    let up = FlakyUpstream::start(|_, _| Action::status(503)).await;
    let breaker = |open_for: &str| {
        route(
            "brk",
            up.addr,
            &format!(
                "    retry: {{ max_attempts: 1 }}\n    circuit_breaker: {{ consecutive_failures: 2, open_for: {open_for} }}\n"
            ),
        )
    };
    let sw = Spillway::start_with_args(&config(&[breaker("1h")]), &["--no-watch"]);
    assert_eq!(status(&sw, "brk.test").await, 503);
    assert_eq!(status(&sw, "brk.test").await, 503);
    let open = send(sw.proxy, get("/x", "brk.test")).await;
    assert_eq!(open.header("spillway-error"), Some("circuit_open"));
    assert_eq!(up.count(), 2);

    // Another route changes; this one does not, so its breaker stays open.
    rewrite(&sw, &config(&[breaker("1h"), route("other", up.addr, "")]));
    sighup(&sw);
    eventually("the new route answers", || async {
        status(&sw, "other.test").await == 503
    })
    .await;
    let calls = up.count();
    let still = send(sw.proxy, get("/x", "brk.test")).await;
    assert_eq!(still.header("spillway-error"), Some("circuit_open"));
    assert_eq!(up.count(), calls);

    // Its own config changes: a fresh breaker lets the next request through.
    rewrite(&sw, &config(&[breaker("2h"), route("other", up.addr, "")]));
    sighup(&sw);
    eventually("the changed route reaches its upstream again", || async {
        let before = up.count();
        let a = send(sw.proxy, get("/x", "brk.test")).await;
        a.header("spillway-error").is_none() && up.count() == before + 1
    })
    .await;
}
