//! deploy/, end to end: real clients (curl, Python requests) reaching spillway through
//! the proxy variables, the pod's config starting the real binary, and every metric name
//! the alert rules and the dashboard use checked against a scrape of the real binary.
//! The tool checks of the files themselves are in deploy/check.sh.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use support::{eventually, get, send, Action, FlakyUpstream, Spillway};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A deferrable route (`hooks.test`) and a passthrough route (`api.test`), both to `up`.
fn config(up: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 2s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{up}
    deferrable: true
    timeout: 2s
    retry:
      max_attempts: 3
      retry_on: [connect-failure, timeout, reset, 503]
      backoff: {{ initial: 50ms, max: 200ms, jitter: none }}
  - name: api
    match: {{ host: api.test }}
    upstream: http://{up}
    timeout: 2s
    retry:
      max_attempts: 3
      retry_on: [connect-failure, timeout, reset, 503]
      backoff: {{ initial: 10ms, max: 50ms }}
    circuit_breaker: {{ consecutive_failures: 5, open_for: 30s }}
"
    )
}

// === real clients through HTTP_PROXY ===

/// Whether `program args` runs and exits 0; otherwise the test is skipped with `why`, or
/// fails under CI (`.ci/run` installs both tools, so a skip there would hide a gap).
fn client_available(program: &str, args: &[&str], why: &str) -> bool {
    let ok = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why} (deploy/check.sh install sets it up)"
        );
        eprintln!("SKIPPED: {why}; run `bash deploy/check.sh install`");
    }
    ok
}

/// A client process with exactly the proxy variables an app gets from the manifests:
/// both cases of HTTP_PROXY and NO_PROXY, nothing inherited.
/// Async, so the upstream on this test's runtime keeps answering while the client runs.
fn proxied(program: &str, proxy: SocketAddr) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "REQUEST_METHOD",
        "CURL_HOME",
    ] {
        cmd.env_remove(var);
    }
    let url = format!("http://{proxy}");
    let bypass = "localhost,127.0.0.1,::1";
    cmd.env("HTTP_PROXY", &url)
        .env("http_proxy", &url)
        .env("NO_PROXY", bypass)
        .env("no_proxy", bypass);
    cmd
}

/// Status, lowercased headers and body of `curl -i` output (the last response in it).
fn parse_curl(out: &Output) -> (u16, BTreeMap<String, String>, String) {
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in curl output:\n{text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

async fn curl(proxy: SocketAddr, args: &[&str]) -> (u16, BTreeMap<String, String>, String) {
    let out = proxied("curl", proxy)
        .args(["-sS", "-i", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    parse_curl(&out)
}

/// Runs a Python snippet that prints one JSON object: status, headers, body.
async fn python_requests(proxy: SocketAddr, code: &str) -> serde_json::Value {
    let script = format!(
        "import json, requests\n{code}\nprint(json.dumps({{'status': r.status_code, \
         'headers': {{k.lower(): v for k, v in r.headers.items()}}, 'body': r.text}}))\n"
    );
    let out = proxied("python3", proxy)
        .args(["-c", &script])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test]
async fn curl_through_http_proxy_defers_and_passes_through() {
    if !client_available("curl", &["--version"], "curl is not installed") {
        return;
    }
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));

    // Deferrable: curl sends `POST http://hooks.test/v1/events` to the proxy; the 202 and
    // the job id can only come from spillway (hooks.test resolves nowhere).
    let (status, headers, body) = curl(
        sw.proxy,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"n":1}"#,
            "http://hooks.test/v1/events",
        ],
    )
    .await;
    assert_eq!(status, 202, "{headers:?} {body}");
    let job = headers.get("spillway-job-id").expect("a job id").clone();
    assert!(body.contains(&job), "{body}");
    eventually("the job is delivered", || async {
        up.requests().iter().any(|r| r.method == "POST")
    })
    .await;
    let delivered = up
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(delivered.uri, "/v1/events");
    assert_eq!(delivered.body, r#"{"n":1}"#);
    assert!(delivered.headers.contains_key("idempotency-key"));

    // Passthrough: the upstream's own answer, relayed with spillway's request id.
    let (status, headers, body) = curl(sw.proxy, &["http://api.test/v1/quotes/42"]).await;
    assert_eq!(status, 200, "{headers:?} {body}");
    assert_eq!(body, "upstream says hi");
    let id = headers.get("x-request-id").expect("spillway's request id");
    assert!(up
        .requests()
        .iter()
        .any(|r| r.uri == "/v1/quotes/42" && r.headers["x-request-id"] == id.as_str()));
}

#[tokio::test]
async fn curl_bypasses_spillway_for_no_proxy_hosts() {
    if !client_available("curl", &["--version"], "curl is not installed") {
        return;
    }
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));
    // 127.0.0.1 is in NO_PROXY (as in the manifests): curl goes straight to the upstream,
    // so spillway neither sees nor protects calls to loopback addresses.
    let (status, headers, _) = curl(sw.proxy, &[&format!("http://{}/direct", up.addr)]).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("x-request-id"), "{headers:?}");
    let direct = up
        .requests()
        .into_iter()
        .find(|r| r.uri == "/direct")
        .unwrap();
    assert!(!direct.headers.contains_key("x-request-id"));
    assert!(sw.access_lines().is_empty(), "{}", sw.logs());
}

#[tokio::test]
async fn python_requests_through_http_proxy_defers_and_passes_through() {
    if !client_available(
        "python3",
        &["-c", "import requests"],
        "python3 with requests is not installed",
    ) {
        return;
    }
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));

    let r = python_requests(
        sw.proxy,
        "r = requests.post('http://hooks.test/v1/events', json={'n': 2}, \
         headers={'Idempotency-Key': 'py-1'}, timeout=30)",
    )
    .await;
    assert_eq!(r["status"], 202, "{r}");
    let job = r["headers"]["spillway-job-id"].as_str().expect("a job id");
    let answer: serde_json::Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert_eq!(answer["job_id"], job);
    assert_eq!(answer["status"], "queued");
    eventually("the job is delivered", || async {
        up.requests().iter().any(|r| r.method == "POST")
    })
    .await;
    let delivered = up
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(delivered.uri, "/v1/events");
    assert_eq!(delivered.headers["idempotency-key"], "py-1");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&delivered.body).unwrap(),
        serde_json::json!({"n": 2})
    );

    let r = python_requests(
        sw.proxy,
        "r = requests.get('http://api.test/v1/quotes/7', timeout=30)",
    )
    .await;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"], "upstream says hi");
    assert!(r["headers"]["x-request-id"].is_string(), "{r}");
    assert!(up.requests().iter().any(|r| r.uri == "/v1/quotes/7"));
}

/// A plain Java 11+ `HttpClient` with the default proxy selector, which follows the
/// `http.proxyHost`/`http.proxyPort` system properties (Java ignores HTTP_PROXY).
const JAVA_CLIENT: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Client {
    public static void main(String[] args) throws Exception {
        HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(args[0]));
        if (args.length > 1) {
            b.header("content-type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(args[1]));
        }
        HttpResponse<String> r = HttpClient.newHttpClient()
            .send(b.build(), HttpResponse.BodyHandlers.ofString());
        System.out.println("HTTP/1.1 " + r.statusCode());
        r.headers().map().forEach((k, v) -> System.out.println(k + ": " + v.get(0)));
        System.out.println();
        System.out.print(r.body());
    }
}
"#;

async fn java(
    proxy: SocketAddr,
    dir: &Path,
    args: &[&str],
) -> (u16, BTreeMap<String, String>, String) {
    let out = tokio::process::Command::new("java")
        .arg(format!("-Dhttp.proxyHost={}", proxy.ip()))
        .arg(format!("-Dhttp.proxyPort={}", proxy.port()))
        .arg("-Dhttp.nonProxyHosts=localhost|127.0.0.1|[::1]")
        .arg(dir.join("Client.java"))
        .args(args)
        .env_remove("JAVA_TOOL_OPTIONS")
        .env_remove("JDK_JAVA_OPTIONS")
        .output()
        .await
        .expect("java runs");
    parse_curl(&out)
}

#[tokio::test]
async fn java_with_proxy_properties_defers_and_passes_through() {
    // Not installed by .ci/run: the machine image has a JDK; skipped where it has none.
    if Command::new("java").arg("-version").output().is_err() {
        eprintln!("SKIPPED: java is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Client.java"), JAVA_CLIENT).unwrap();
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));

    let (status, headers, body) = java(
        sw.proxy,
        dir.path(),
        &["http://hooks.test/v1/events", r#"{"n":3}"#],
    )
    .await;
    assert_eq!(status, 202, "{headers:?} {body}");
    let job = headers.get("spillway-job-id").expect("a job id");
    assert!(body.contains(job.as_str()), "{body}");
    eventually("the job is delivered", || async {
        up.requests().iter().any(|r| r.method == "POST")
    })
    .await;
    let delivered = up
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(delivered.uri, "/v1/events");
    assert_eq!(delivered.body, r#"{"n":3}"#);

    let (status, headers, body) =
        java(sw.proxy, dir.path(), &["http://api.test/v1/quotes/9"]).await;
    assert_eq!(status, 200, "{headers:?} {body}");
    assert_eq!(body, "upstream says hi");
    assert!(headers.contains_key("x-request-id"), "{headers:?}");
}

// === the pod's config ===

#[test]
fn pod_config_passes_spillway_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .current_dir(root())
        .args(["check", "-c", "deploy/kubernetes/base/spillway.yaml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok\n"), "{stdout}");
    assert!(stdout.contains("partner-webhooks\tdeferrable"), "{stdout}");
}

/// The ConfigMap's file, as the pod runs it, on free ports and a temporary volume: admin on
/// all interfaces with the token from the Secret, probes open, the API behind the token.
#[tokio::test]
async fn pod_config_starts_and_answers_the_probes() {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/base/spillway.yaml"))
        .unwrap()
        .replace("listen: 127.0.0.1:15080", "listen: 127.0.0.1:0")
        .replace("listen: 0.0.0.0:15081", "listen: 0.0.0.0:0")
        .replace("path: /var/lib/spillway/", "path: {data}/");
    assert_eq!(text.matches(":0\n").count(), 2, "the listeners moved?");
    assert!(text.contains("{data}/spillway.redb"), "storage.path moved?");
    let sw = Spillway::start_with_env(&text, &[("SPILLWAY_ADMIN_TOKEN", "pod-secret")]);
    let admin = SocketAddr::from(([127, 0, 0, 1], sw.admin.port()));

    let health = send(admin, get("/healthz", "spillway")).await;
    assert_eq!(health.status, 200, "startup and liveness probe");
    let ready = send(admin, get("/readyz", "spillway")).await;
    assert_eq!(ready.status, 200, "readiness probe");
    assert_eq!(send(admin, get("/jobs", "spillway")).await.status, 401);
    let mut jobs = get("/jobs", "spillway");
    jobs.headers_mut()
        .insert("authorization", "Bearer pod-secret".parse().unwrap());
    assert_eq!(send(admin, jobs).await.status, 200);
    // What the PodMonitor does: /metrics with the Secret's token.
    assert_eq!(send(admin, get("/metrics", "spillway")).await.status, 401);
    let mut metrics = get("/metrics", "spillway");
    metrics
        .headers_mut()
        .insert("authorization", "Bearer pod-secret".parse().unwrap());
    let scraped = send(admin, metrics).await;
    assert_eq!(scraped.status, 200);
    assert!(String::from_utf8_lossy(&scraped.body).contains("spillway_build_info"));
}

// === metric names in deploy/ against a scrape of the binary ===

/// What a scrape shows: every sample name with the label names seen on it, and every
/// name a `# TYPE` line declares (with its series suffixes), samples or not.
#[derive(Default)]
struct Exposition {
    labels: BTreeMap<String, BTreeSet<String>>,
    declared: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                    continue;
                };
                let names: Vec<String> = match kind {
                    "counter" => vec![
                        name.to_owned(),
                        format!("{}_total", name.trim_end_matches("_total")),
                    ],
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{name}{s}"))
                        .collect(),
                    "info" => vec![
                        name.to_owned(),
                        format!("{}_info", name.trim_end_matches("_info")),
                    ],
                    _ => vec![name.to_owned()],
                };
                e.declared.extend(names);
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = line[..end].to_owned();
                let set = e.labels.entry(name).or_default();
                if line[end..].starts_with('{') {
                    let inner = &line[end + 1..line.rfind('}').unwrap_or(line.len())];
                    set.extend(label_names(inner));
                }
            }
        }
        e
    }

    fn knows(&self, name: &str) -> bool {
        self.labels.contains_key(name) || self.declared.contains(name)
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Label names in a selector or a sample's braces: identifiers followed by `=`, `!=`,
/// `=~` or `!~`, outside quoted values (plain or JSON-escaped quotes).
fn label_names(inner: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = inner.chars().collect();
    let (mut i, mut quoted) = (0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            // A plain `"` and a JSON-escaped `\"` both delimit a value.
            quoted = !quoted;
            i += 1;
        } else if !quoted && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            if rest.starts_with('=') || rest.starts_with("!=") || rest.starts_with("!~") {
                out.insert(chars[start..i].iter().collect());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `spillway_*` name in `text`, with the label names of each `{...}` selector that
/// follows it (empty when it has none).
fn metric_uses(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("spillway_") {
        let start = from + pos;
        let before = text[..start].chars().next_back();
        let end = text[start..]
            .find(|c: char| !is_ident(c))
            .map_or(text.len(), |n| start + n);
        from = end;
        if before.is_some_and(is_ident) {
            continue;
        }
        let name = text[start..end].to_owned();
        let labels = if text[end..].starts_with('{') {
            let close = text[end..].find('}').map_or(text.len(), |n| end + n);
            label_names(&text[end + 1..close])
        } else {
            BTreeSet::new()
        };
        out.push((name, labels));
    }
    out
}

/// Label names in every `by (...)` clause.
fn grouping_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for part in text.split("by (").skip(1).chain(text.split("by(").skip(1)) {
        if let Some(list) = part.split(')').next() {
            out.extend(
                list.split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty() && l.chars().all(is_ident)),
            );
        }
    }
    out
}

fn deploy_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (dir, ext) in [("deploy/prometheus", "yml"), ("deploy/grafana", "json")] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == ext) {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 3,
        "alerts, their tests and the dashboard: {files:?}"
    );
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Labels Prometheus adds at scrape time (the Prometheus Operator adds the last two).
const SCRAPE_LABELS: [&str; 4] = ["job", "instance", "namespace", "pod"];

async fn scrape(admin: SocketAddr) -> (u16, String) {
    scrape_as(admin, None).await
}

/// `/metrics`, as Prometheus asks for it when `accept` is OpenMetrics.
async fn scrape_as(admin: SocketAddr, accept: Option<&str>) -> (u16, String) {
    let mut req = get("/metrics", "spillway");
    if let Some(a) = accept {
        req.headers_mut().insert("accept", a.parse().unwrap());
    }
    let a = send(admin, req).await;
    (a.status, String::from_utf8_lossy(&a.body).into_owned())
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_metrics_spillway_exports() {
    // The first /flaky attempt fails, so a passthrough retry is counted.
    let flaked = Arc::new(AtomicBool::new(false));
    let up = FlakyUpstream::start(move |_, r| match r.uri.as_str() {
        "/dead" => Action::status(400),
        "/flaky" if !flaked.swap(true, Ordering::SeqCst) => Action::status(503),
        "/down" => Action::status(503),
        _ => Action::status(200),
    })
    .await;
    let limited = format!(
        "  - name: limited
    match: {{ host: limited.test }}
    upstream: http://{}
    rate_limit: {{ per_second: 1, burst: 1 }}
  - name: budget
    match: {{ host: budget.test }}
    upstream: http://{}
    retry:
      max_attempts: 3
      retry_on: [503]
      backoff: {{ initial: 1ms, max: 1ms, jitter: none }}
",
        up.addr, up.addr
    );
    let sw = Spillway::start(&(config(up.addr) + &limited));
    let (status, body) = scrape(sw.admin).await;
    assert_eq!(
        status, 200,
        "spillway serves no /metrics here (answer {status}: {body}); this test needs the \
         metrics feature (branch `metrics`) merged"
    );

    // Traffic that makes most families carry series: a delivery, a dead letter, a
    // passthrough answer, a retried passthrough, a refusal.
    let mut post = get("/v1/events", "hooks.test");
    *post.method_mut() = http::Method::POST;
    assert_eq!(send(sw.proxy, post).await.status, 202);
    for _ in 0..2 {
        let mut keyed = get("/v1/events", "hooks.test");
        *keyed.method_mut() = http::Method::POST;
        keyed
            .headers_mut()
            .insert("idempotency-key", "same".parse().unwrap());
        assert_eq!(send(sw.proxy, keyed).await.status, 202);
    }
    let mut dead = get("/dead", "hooks.test");
    *dead.method_mut() = http::Method::POST;
    assert_eq!(send(sw.proxy, dead).await.status, 202);
    assert_eq!(send(sw.proxy, get("/ok", "api.test")).await.status, 200);
    assert_eq!(send(sw.proxy, get("/flaky", "api.test")).await.status, 200);
    let mut refused = false;
    for _ in 0..20 {
        if send(sw.proxy, get("/", "limited.test")).await.status == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the 1/s rate limit never answered 429");
    // An upstream that always fails spends the route's retry budget (two retries a request
    // against a reserve of about a hundred): bounded, checked every ten requests.
    let mut spent = false;
    for i in 0..400 {
        assert_eq!(
            send(sw.proxy, get("/down", "budget.test")).await.status,
            503
        );
        if i % 10 == 9 {
            let (_, text) = scrape(sw.admin).await;
            if text.contains("spillway_retry_budget_exhausted_total{") {
                spent = true;
                break;
            }
        }
    }
    assert!(spent, "the retry budget was never exhausted");
    assert_eq!(send(sw.proxy, get("/", "nowhere.test")).await.status, 403);
    eventually("a delivery and a dead letter in the scrape", || async {
        let (_, text) = scrape(sw.admin).await;
        let e = Exposition::parse(&text);
        e.labels.contains_key("spillway_delivered_total")
            && e.labels.contains_key("spillway_dead_lettered_total")
    })
    .await;
    // Both formats: the families without series yet (a retry budget never spent) may show
    // only in the OpenMetrics one, as `# TYPE` lines.
    let (_, text) = scrape(sw.admin).await;
    let (_, om) = scrape_as(
        sw.admin,
        Some("application/openmetrics-text; version=1.0.0"),
    )
    .await;
    // A reload that drops the deferrable route while it holds jobs: its queue is orphaned.
    let without_hooks = {
        let full = config(up.addr) + &limited;
        let start = full.find("  - name: hooks").unwrap();
        let end = full.find("  - name: api").unwrap();
        format!("{}{}", &full[..start], &full[end..])
    };
    std::fs::write(sw.dir.path().join("spillway.yaml"), without_hooks).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sw.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    eventually("the orphaned queue in the scrape", || async {
        scrape(sw.admin)
            .await
            .1
            .contains("spillway_queue_orphaned{")
    })
    .await;
    let (_, orphaned) = scrape(sw.admin).await;
    let exp = Exposition::parse(&format!("{text}\n{om}\n{orphaned}"));

    let mut known_labels: BTreeSet<String> = SCRAPE_LABELS.iter().map(|s| s.to_string()).collect();
    for set in exp.labels.values() {
        known_labels.extend(set.iter().cloned());
    }

    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for file in deploy_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (name, labels) in metric_uses(&text) {
            used.insert(name.clone());
            if !exp.knows(&name) {
                problems.push(format!("{}: {name} is not exported", rel(&file)));
                continue;
            }
            if let Some(have) = exp.labels.get(&name) {
                for l in labels.difference(have) {
                    if !SCRAPE_LABELS.contains(&l.as_str()) {
                        problems.push(format!(
                            "{}: {name} has no label {l} (it has {have:?})",
                            rel(&file)
                        ));
                    }
                }
            }
        }
        for l in grouping_labels(&text) {
            if !known_labels.contains(&l) {
                problems.push(format!(
                    "{}: grouping by {l}, which no metric has",
                    rel(&file)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "metric names or labels that spillway does not export:\n{}\n\nscrape:\n{text}",
        problems.join("\n")
    );
    // The rules and the dashboard cover what DESIGN.md says operators alert on.
    for must in [
        "spillway_queue_depth",
        "spillway_queue_oldest_job_age_seconds",
        "spillway_retries_total",
        "spillway_dead_lettered_total",
        "spillway_circuit_state",
        "spillway_config_last_reload_successful",
        "spillway_request_duration_seconds_bucket",
        "spillway_delivery_attempts_total",
    ] {
        assert!(used.contains(must), "deploy/ never uses {must}");
    }
}

#[test]
fn metric_use_scanner_reads_selectors_in_yaml_and_json() {
    let uses = metric_uses(
        r#"expr: sum by (route) (rate(spillway_requests_total{mode="deferred", code=~"5.."}[5m])) / spillway_x"#,
    );
    assert_eq!(uses.len(), 2);
    assert_eq!(uses[0].0, "spillway_requests_total");
    assert_eq!(
        uses[0].1,
        ["code", "mode"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(uses[1].0, "spillway_x");
    let json = r#""expr": "max(spillway_queue_depth{job=~\"$job\", route=~\"a,b=c\"})""#;
    let uses = metric_uses(json);
    assert_eq!(
        uses[0].1,
        ["job", "route"].iter().map(|s| s.to_string()).collect()
    );
    assert!(metric_uses("not_spillway_thing").is_empty());
    assert_eq!(
        grouping_labels("sum by (job, instance, route) (x) and max by(le) (y)"),
        ["instance", "job", "le", "route"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let e = Exposition::parse(
        "# TYPE spillway_a counter\n# TYPE spillway_h histogram\nspillway_a_total{route=\"r\",mode=\"m\"} 1\n",
    );
    assert!(e.knows("spillway_a_total") && e.knows("spillway_h_bucket"));
    assert!(!e.knows("spillway_h"));
    assert_eq!(e.labels["spillway_a_total"].len(), 2);
}
