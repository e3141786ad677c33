//! A damaged store: spillway refuses to start with a message that names the file and what to
//! do, and leaves it byte for byte as it was; `spillway repair` copies the readable jobs into
//! a fresh file, keeps the damaged one beside it, and spillway then starts and delivers them.
//! Foreign files and a second instance on the same file are refused the same way.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{eventually, send, Fault, FaultyUpstream, Spillway};

const JOBS: usize = 300;

fn config(upstream: std::net::SocketAddr) -> String {
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
    timeout: 2s
    concurrency: 8
"
    )
}

fn keyed(key: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(format!(
            "{key}:{}",
            "x".repeat(1000)
        ))))
        .unwrap()
}

async fn admin_post(sw: &Spillway, path: &str) -> u16 {
    let req = Request::post(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(sw.admin, req).await.status
}

/// A stopped spillway whose store holds `JOBS` queued jobs of a paused route.
async fn populated(up: &FaultyUpstream) -> (Spillway, Vec<String>) {
    fill(Spillway::start(&config(up.addr))).await
}

/// Queues `JOBS` jobs on a paused route, then stops spillway.
async fn fill(mut sw: Spillway) -> (Spillway, Vec<String>) {
    assert_eq!(admin_post(&sw, "/routes/hooks/pause").await, 200);
    let mut keys = Vec::new();
    for i in 0..JOBS {
        let key = format!("job-{i:04}");
        assert_eq!(send(sw.proxy, keyed(&key)).await.status, 202);
        keys.push(key);
    }
    sw.sigterm();
    assert!(sw.wait_exit().await.success());
    (sw, keys)
}

fn store(sw: &Spillway) -> PathBuf {
    sw.dir.path().join("queue.redb")
}

fn spillway(args: &[&str]) -> (Option<i32>, String, String) {
    let out = support::exits(Command::new(env!("CARGO_BIN_EXE_spillway")).args(args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `spillway run` on the damaged file: exit 2, the file and the remedy named, no byte changed.
fn refuses_to_start(sw: &Spillway, remedy: &str) {
    let file = store(sw);
    let before = std::fs::read(&file).unwrap();
    let (code, err) = support::run_to_exit(&sw.dir.path().join("spillway.yaml"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(remedy), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the file was modified"
    );
}

/// Runs `spillway repair`, checks the report and that the damaged bytes were kept; returns
/// how many jobs it saved and whether it had to scan raw bytes (no route pause then).
fn repairs(sw: &Spillway) -> (usize, bool) {
    let file = store(sw);
    let damaged = std::fs::read(&file).unwrap();
    let cfg = sw.dir.path().join("spillway.yaml");
    let (code, out, err) = spillway(&["repair", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    eprintln!("{out}");
    assert!(out.contains("repaired"), "{out}");
    let kept: Vec<PathBuf> = std::fs::read_dir(sw.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("queue.redb.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(&kept[0]).unwrap(),
        damaged,
        "original not kept as it was"
    );
    assert!(out.contains(&kept[0].display().to_string()), "{out}");
    let saved = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("jobs saved: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no job count in:\n{out}"));
    let raw = out.contains("read by: raw scan");
    // Nothing left behind but the store (with its reserve and accept log, whose batches the
    // damaged file did not hold are applied at the next start), its damaged original, the
    // config and the logs.
    for e in std::fs::read_dir(sw.dir.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name == "queue.redb"
                || name == "queue.redb.reserve"
                || name == "queue.redb.accept-log"
                || name.starts_with("queue.redb.damaged-")
                || name == "spillway.yaml"
                || name.ends_with(".log"),
            "left behind: {name}"
        );
    }
    (saved, raw)
}

/// Cuts the store to 60% of its length; `spillway run` refuses it, `spillway repair` saves
/// what is left.
fn truncated_then_repaired(sw: &Spillway) -> (usize, bool) {
    let file = store(sw);
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len * 6 / 10).unwrap();
    drop(f);
    refuses_to_start(sw, "spillway repair");
    repairs(sw)
}

/// After repair: spillway starts, the pause survived, and on resume every saved job is
/// delivered (and nothing that was not sent).
async fn delivers_the_saved_jobs(
    sw: &mut Spillway,
    up: &FaultyUpstream,
    sent: &[String],
    (saved, raw): (usize, bool),
) {
    sw.restart();
    let routes = send(sw.admin, support::get("/routes", "admin")).await;
    if !raw {
        assert_eq!(
            routes.json()["routes"][0]["paused"],
            true,
            "the pause was lost"
        );
    }
    // The accept log beside the store may hold the last accepts the damaged file lost; they
    // are applied at this start, so there may be more than repair saved, never fewer. After a
    // raw scan the route is not paused, so some may be delivered already: count those too.
    let route = &routes.json()["routes"][0];
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or_default() as usize;
    let known = count(&route["depth"]["total"]) + count(&route["delivered_kept"]);
    assert!(known >= saved, "{}", routes.json());
    let saved = known;
    assert_eq!(admin_post(sw, "/routes/hooks/resume").await, 200);
    eventually("every saved job delivered", || async {
        let keys: HashSet<String> = up.seen().iter().map(|s| s.key()).collect();
        keys.len() == saved
    })
    .await;
    let sent: HashSet<&String> = sent.iter().collect();
    for s in up.seen() {
        assert!(sent.contains(&s.key()), "unknown key {}", s.key());
        assert!(s.body.starts_with(format!("{}:", s.key()).as_bytes()));
    }
    // The repaired store takes new work too.
    assert_eq!(send(sw.proxy, keyed("after-repair")).await.status, 202);
}

#[tokio::test]
async fn a_truncated_store_is_refused_then_repaired_and_its_readable_jobs_delivered() {
    let up = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let (mut sw, keys) = populated(&up).await;
    let saved = truncated_then_repaired(&sw);
    eprintln!("truncated to 60%: {} of {JOBS} jobs saved", saved.0);
    // The jobs in the 60% that is left are intact.
    assert!(saved.0 >= JOBS / 3, "only {} saved", saved.0);
    delivers_the_saved_jobs(&mut sw, &up, &keys, saved).await;
}

#[tokio::test]
async fn bytes_overwritten_on_a_page_of_jobs_are_refused_then_repaired_and_delivered() {
    let up = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let (mut sw, keys) = populated(&up).await;
    let file = store(&sw);
    let mut bytes = std::fs::read(&file).unwrap();
    // The 4 KiB page holding the middle job's body. Bytes changed in free space (preallocated
    // or released pages) harm nothing and are rightly not refused, so the damage must land on
    // a page in use. Copy-on-write may have left older copies in released pages: every page
    // holding one is overwritten, so the live copy surely is.
    let needle = format!("{}:xxxx", keys[JOBS / 2]);
    let pages: HashSet<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_bytes())
        .map(|(at, _)| at / 4096 * 4096)
        .collect();
    assert!(!pages.is_empty(), "{needle} not found in the store");
    for &page in &pages {
        for (i, b) in bytes[page..page + 4096].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
    }
    std::fs::write(&file, &bytes).unwrap();
    refuses_to_start(&sw, "spillway repair");
    let saved = repairs(&sw);
    eprintln!(
        "{} page(s) of 4 KiB overwritten: {} of {JOBS} jobs saved",
        pages.len(),
        saved.0
    );
    // A 4 KiB page holds at most a handful of 1 KiB jobs.
    assert!(saved.0 >= JOBS - 5 * pages.len(), "only {} saved", saved.0);
    delivers_the_saved_jobs(&mut sw, &up, &keys, saved).await;
}

#[tokio::test]
async fn a_clean_store_repairs_to_every_job() {
    let up = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let (mut sw, keys) = populated(&up).await;
    let saved = repairs(&sw);
    assert_eq!(saved, (JOBS, false));
    delivers_the_saved_jobs(&mut sw, &up, &keys, saved).await;
}

fn foreign(dir: &Path, bytes: &[u8]) -> (PathBuf, PathBuf) {
    let file = dir.join("queue.redb");
    std::fs::write(&file, bytes).unwrap();
    let cfg = dir.join("spillway.yaml");
    std::fs::write(
        &cfg,
        config("127.0.0.1:9".parse().unwrap()).replace("{data}", &dir.display().to_string()),
    )
    .unwrap();
    (file, cfg)
}

#[tokio::test]
async fn a_file_of_another_program_is_refused_by_run_and_by_repair_and_left_untouched() {
    let mut sqlite = b"SQLite format 3\0".to_vec();
    sqlite.extend((0..20_000u32).map(|i| (i * 7 % 251) as u8));
    let random: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (what, bytes) in [("sqlite", sqlite), ("random", random)] {
        let dir = tempfile::tempdir().unwrap();
        let (file, cfg) = foreign(dir.path(), &bytes);
        let (code, err) = support::run_to_exit(&cfg);
        assert_eq!(code, Some(2), "{what}: {err}");
        assert!(err.contains(&file.display().to_string()), "{what}: {err}");
        let (code, out, err) = spillway(&["repair", "--path", file.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{what}: {out}{err}");
        assert!(err.contains("not a spillway store"), "{what}: {err}");
        if what == "sqlite" {
            assert!(err.contains("SQLite"), "{err}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "{what}: modified");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n == "queue.redb" || n == "spillway.yaml"),
            "{what}: {names:?}"
        );
    }
}

#[tokio::test]
async fn a_second_instance_on_the_same_file_is_refused_and_the_first_keeps_working() {
    let up = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let sw = Spillway::start(&config(up.addr));
    assert_eq!(send(sw.proxy, keyed("first")).await.status, 202);
    eventually("delivered", || async { up.count() == 1 }).await;
    let file = store(&sw);
    let cfg = sw.dir.path().join("spillway.yaml");
    // A second config on other ports, same store file.
    let (code, err) = support::run_to_exit(&cfg);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("already open"), "{err}");
    assert!(err.contains("storage.path"), "{err}");
    // Repair refuses too while the file is in use.
    let (code, _, err) = spillway(&["repair", "--path", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("open in another process"), "{err}");
    assert_eq!(send(sw.proxy, keyed("second")).await.status, 202);
    eventually("the first instance still delivers", || async {
        up.count() == 2
    })
    .await;
}

#[tokio::test]
async fn a_truncated_encrypted_store_is_repaired_with_its_keys_and_stays_sealed() {
    let up = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    // The key lives in a file outside the store's directory (which repair keeps tidy).
    let secrets = tempfile::tempdir().unwrap();
    let key_file = secrets.path().join("k1");
    std::fs::write(&key_file, format!("{}\n", "ab".repeat(32))).unwrap();
    let sealed = config(up.addr).replace(
        "storage: { path: '{data}/queue.redb' }",
        &format!(
            "storage:\n  path: '{{data}}/queue.redb'\n  encryption:\n    keys: [{{ id: k1, file: '{}' }}]",
            key_file.display()
        ),
    );
    let (mut sw, keys) = fill(Spillway::start(&sealed)).await;
    let file = store(&sw);
    // No body reaches the file in clear, before or after the repair.
    let clear_body = "x".repeat(200);
    let in_clear = |file: &Path| {
        let bytes = std::fs::read(file).unwrap();
        bytes
            .windows(clear_body.len())
            .any(|w| w == clear_body.as_bytes())
    };
    assert!(!in_clear(&file));
    let saved = truncated_then_repaired(&sw);
    eprintln!(
        "sealed store truncated to 60%: {} of {JOBS} jobs saved",
        saved.0
    );
    assert!(saved.0 >= JOBS / 3, "only {} saved", saved.0);
    assert!(!in_clear(&file), "repair wrote bodies in clear");
    // Delivered with their bodies, so they were opened with the key and sealed again.
    delivers_the_saved_jobs(&mut sw, &up, &keys, saved).await;
}
