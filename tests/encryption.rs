//! Encryption at rest, end to end: with `storage.encryption` on, request bodies and headers
//! never reach the queue file in clear, delivery and the admin API work as before, keys rotate
//! across restarts, and a store opened without its keys fails those jobs with a clear error.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{eventually, run_to_exit, send, Action, Answer, FlakyUpstream, Spillway};

const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
/// base64 of 32 bytes of 0x22.
const K2: &str = "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=";
const BODY_MARKER: &str = "MARKER-7f3c-BODY-SHOULD-NOT-BE-ON-DISK";
const HEADER_MARKER: &str = "MARKER-91ab-HEADER-SHOULD-NOT-BE-ON-DISK";

fn config(upstream: std::net::SocketAddr, encryption: &str, backoff: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage:
  path: '{{data}}/queue.redb'
{encryption}
shutdown_grace: 2s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{upstream}/base
    deferrable: true
    timeout: 1s
    retry:
      max_attempts: 50
      backoff: {backoff}
"
    )
}

const K1_ONLY: &str = "  encryption:
    keys: [{ id: k1, env: SPILLWAY_TEST_KEY_K1 }]";

fn post() -> Request<Full<Bytes>> {
    Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("content-type", "application/json")
        .header("x-partner-token", HEADER_MARKER)
        .body(Full::new(Bytes::from(format!(
            r#"{{"note":"{BODY_MARKER}"}}"#
        ))))
        .unwrap()
}

async fn admin(sw: &Spillway, path: &str) -> Answer {
    let req = Request::get(path)
        .header("host", sw.admin.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(sw.admin, req).await
}

fn queue_file_has(sw: &Spillway, needle: &str) -> bool {
    let bytes = std::fs::read(sw.dir.path().join("queue.redb")).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn bodies_are_sealed_on_disk_and_still_delivered_and_shown() {
    // Two failures first, so the job is written (and rewritten) several times.
    let up = FlakyUpstream::start(|n, _| Action::status(if n < 2 { 503 } else { 200 })).await;
    let sw = Spillway::start_with_env(
        &config(
            up.addr,
            K1_ONLY,
            "{ initial: 50ms, max: 200ms, jitter: none }",
        ),
        &[("SPILLWAY_TEST_KEY_K1", K1)],
    );
    let a = send(sw.proxy, post()).await;
    assert_eq!(a.status, 202);
    let id = a.header("spillway-job-id").unwrap().to_owned();
    assert!(!queue_file_has(&sw, BODY_MARKER));

    eventually("delivery after two failures", || async { up.count() == 3 }).await;
    let seen = &up.requests()[2];
    let body = String::from_utf8_lossy(&seen.body);
    assert!(body.contains(BODY_MARKER), "{body}");
    assert_eq!(seen.headers["x-partner-token"], HEADER_MARKER);

    let path = format!("/jobs/{id}");
    eventually("acked", || async {
        admin(&sw, &path).await.json()["state"] == "delivered"
    })
    .await;
    let job = admin(&sw, &path).await;
    assert_eq!(job.status, 200);
    let job = job.json();
    assert!(
        job["body"]["text"].as_str().unwrap().contains(BODY_MARKER),
        "{job}"
    );
    for marker in [BODY_MARKER, HEADER_MARKER] {
        assert!(
            !queue_file_has(&sw, marker),
            "{marker} is in the queue file"
        );
    }
}

#[tokio::test]
async fn keys_rotate_across_restarts_and_a_missing_key_fails_its_jobs_clearly() {
    // Never succeeds: the job stays stored between restarts, due again every 2s.
    let up = FlakyUpstream::start(|_, _| Action::status(503)).await;
    let slow = "{ initial: 2s, max: 2s, jitter: none }";
    let mut sw = Spillway::start_with_env(
        &config(up.addr, K1_ONLY, slow),
        &[("SPILLWAY_TEST_KEY_K1", K1)],
    );
    let id = send(sw.proxy, post())
        .await
        .header("spillway-job-id")
        .unwrap()
        .to_owned();
    eventually("first attempt", || async { up.count() == 1 }).await;

    // Rotation: k2 (from a file) becomes primary, k1 stays listed for the old record.
    let secrets = tempfile::tempdir().unwrap();
    let k2_file = secrets.path().join("k2");
    std::fs::write(&k2_file, format!("{K2}\n")).unwrap();
    let rotated = format!(
        "  encryption:
    keys:
      - {{ id: k2, file: '{}' }}
      - {{ id: k1, env: SPILLWAY_TEST_KEY_K1 }}
    primary: k2",
        k2_file.display()
    );
    let cfg = sw.dir.path().join("spillway.yaml");
    let data = sw.dir.path().display().to_string();
    let write = |text: String| std::fs::write(&cfg, text.replace("{data}", &data)).unwrap();
    write(config(up.addr, &rotated, slow));
    sw.restart();
    let job = admin(&sw, &format!("/jobs/{id}")).await;
    assert_eq!(job.status, 200);
    assert!(job.json()["body"]["text"]
        .as_str()
        .unwrap()
        .contains(BODY_MARKER));

    // Encryption removed from the config: the store still opens, the job fails by name.
    write(config(up.addr, "", slow));
    sw.restart();
    let sent = up.count();
    let a = admin(&sw, &format!("/jobs/{id}")).await;
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    let err = a.json();
    assert_eq!(err["error"], "job_sealed");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains(&id) && msg.contains("\"k1\""), "{msg}");
    // Once due, leasing dead-letters it with the reason instead of sending it.
    eventually("dead-lettered", || async {
        let list = admin(&sw, "/jobs?state=dead").await.json();
        list["jobs"].as_array().is_some_and(|j| {
            j.iter().any(|j| {
                j["id"] == id.as_str()
                    && j["dead_reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("\"k1\""))
            })
        })
    })
    .await;
    assert_eq!(up.count(), sent, "nothing is sent without the request");
}

#[test]
fn a_key_that_cannot_be_loaded_stops_the_start_without_showing_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k1");
    std::fs::write(&key_file, "not-a-key-SECRETISH-VALUE").unwrap();
    let cfg = dir.path().join("spillway.yaml");
    let enc = format!(
        "  encryption:\n    keys: [{{ id: k1, file: '{}' }}]",
        key_file.display()
    );
    let text = config("127.0.0.1:9".parse().unwrap(), &enc, "{ initial: 1s }")
        .replace("{data}", &dir.path().display().to_string());
    std::fs::write(&cfg, text).unwrap();
    let (code, out) = run_to_exit(&cfg);
    assert_ne!(code, Some(0));
    assert!(
        out.contains("\"k1\"") && out.contains("64 hex digits"),
        "{out}"
    );
    assert!(!out.contains("SECRETISH"), "{out}");
    assert!(!dir.path().join("queue.redb").exists(), "nothing stored");
}
