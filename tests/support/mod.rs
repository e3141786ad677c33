//! Test support: the real `spillway` binary on loopback ports it picks itself, a
//! scriptable flaky upstream, a raw HTTP/1.1 client and `eventually`.
#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

/// How long a condition may take before a test fails; raise it on slow machines.
pub fn patience() -> Duration {
    let secs = std::env::var("SPILLWAY_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// Polls `probe` until it is true or the patience runs out.
pub async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if probe().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === Spillway ===

pub struct Spillway {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    runs: usize,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

fn spawn(
    dir: &std::path::Path,
    run: usize,
    env: &[(String, String)],
    args: &[String],
) -> (Child, SocketAddr, SocketAddr, PathBuf) {
    let cfg = dir.join("spillway.yaml");
    let log = dir.join(format!("spillway-{run}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["run", "-c"])
        .arg(&cfg)
        .args(args)
        .env("SPILLWAY_LOG_FORMAT", "json")
        .env("SPILLWAY_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut proxy, mut admin) = (None, None);
    let deadline = tokio::time::Instant::now() + patience();
    while proxy.is_none() || admin.is_none() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => panic!(
                "spillway did not report its listeners; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["event"] == "listening" {
            let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
            match v["name"].as_str() {
                Some("proxy") => proxy = Some(addr),
                Some("admin") => admin = Some(addr),
                _ => {}
            }
        }
    }
    (child, proxy.unwrap(), admin.unwrap(), log)
}

impl Spillway {
    /// Starts the binary on `yaml`; the config's listeners should use port 0. `{data}`
    /// in the text is replaced by a fresh directory.
    pub fn start(yaml: &str) -> Spillway {
        Spillway::start_with(yaml, &[], &[])
    }

    /// Like [`Spillway::start`], with extra environment variables (kept on restart).
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Spillway {
        Spillway::start_with(yaml, &[], env)
    }

    /// [`Spillway::start`] with more arguments after `run -c FILE`.
    pub fn start_with_args(yaml: &str, args: &[&str]) -> Spillway {
        Spillway::start_with(yaml, args, &[])
    }

    /// Extra arguments and environment variables, both kept on restart.
    pub fn start_with(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> Spillway {
        let dir = tempfile::tempdir().unwrap();
        let yaml = yaml.replace("{data}", &dir.path().display().to_string());
        std::fs::write(dir.path().join("spillway.yaml"), yaml).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, proxy, admin, log) = spawn(dir.path(), 0, &env, &args);
        Spillway {
            child,
            proxy,
            admin,
            dir,
            log,
            runs: 1,
            env,
            args,
        }
    }

    /// SIGKILL: no drain, no flush; what was committed must be enough.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process if it still runs, then starts it again on the same config and
    /// data directory (new ports).
    pub fn restart(&mut self) {
        self.kill9();
        let (child, proxy, admin, log) = spawn(self.dir.path(), self.runs, &self.env, &self.args);
        self.runs += 1;
        self.child = child;
        self.proxy = proxy;
        self.admin = admin;
        self.log = log;
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Waits for the process to exit within the patience.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + patience();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "spillway did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON access-log lines written so far.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "request")
            .collect()
    }

    /// Peak resident set size of the process, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

impl Drop for Spillway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `spillway run -c cfg` to its exit (for configs or files that must stop it);
/// returns the exit code and stderr.
pub fn run_to_exit(cfg: &std::path::Path) -> (Option<i32>, String) {
    let out = exits(
        Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["run", "-c"])
            .arg(cfg),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` to its exit and returns its output; one still running after [`patience`] is
/// killed and fails the test with what it printed (a command that should exit, say `spillway
/// run` on a file it must refuse, would otherwise hang the whole suite).
pub fn exits(cmd: &mut Command) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    // Its own process group, so the kill also reaches whatever it started (and the pipes close).
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(patience()) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "{cmd:?} still running after {:?}; stderr:\n{}",
                patience(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Opens a CONNECT tunnel through `proxy` to 127.0.0.1:`port` and checks the 200.
pub async fn open_tunnel(proxy: SocketAddr, port: u16) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s
}

// === FlakyUpstream ===

/// What the upstream does with one request.
#[derive(Clone)]
pub enum Action {
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Sleep, then answer 200.
    Delay(Duration),
    /// Answer 200 with a body of this many bytes, streamed in 64 KiB chunks.
    Stream(usize),
}

impl Action {
    pub fn status(status: u16) -> Action {
        Action::Respond {
            status,
            headers: vec![],
            body: Bytes::from_static(b"upstream says hi"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: tokio::time::Instant,
}

type Script = dyn Fn(usize, &Recorded) -> Action + Send + Sync;

/// A real HTTP server on 127.0.0.1 whose answers a test scripts per request number.
pub struct FlakyUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyUpstream {
    pub async fn start<F>(script: F) -> FlakyUpstream
    where
        F: Fn(usize, &Recorded) -> Action + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(script);
        let (s, c) = (seen.clone(), count.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (seen, count, script) = (s.clone(), c.clone(), script.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, count, script) = (seen.clone(), count.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                                at: tokio::time::Instant::now(),
                            };
                            let n = count.fetch_add(1, Ordering::SeqCst);
                            let action = script(n, &rec);
                            seen.lock().push(rec);
                            Ok::<_, Infallible>(respond(action).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FlakyUpstream {
            addr,
            seen,
            count,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().clone()
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn respond(action: Action) -> Response<UpBody> {
    match action {
        Action::Respond {
            status,
            headers,
            body,
        } => {
            let mut rsp = Response::new(Full::new(body).boxed());
            *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in headers {
                rsp.headers_mut().insert(k, v.parse().unwrap());
            }
            rsp
        }
        Action::Delay(d) => {
            tokio::time::sleep(d).await;
            Response::new(Full::new(Bytes::from_static(b"slow")).boxed())
        }
        Action::Stream(total) => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let n = total / chunk.len();
            let frames = futures_util::stream::iter(
                (0..n).map(move |_| Ok::<_, Infallible>(hyper::body::Frame::data(chunk.clone()))),
            );
            Response::new(http_body_util::StreamBody::new(frames).boxed())
        }
    }
}

// === client ===

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request over a fresh HTTP/1.1 connection to `addr`. The URI is written as
/// given, so an absolute URI makes an HTTP_PROXY-style request.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    try_send(addr, req)
        .await
        .expect("the request got no answer")
}

/// Like [`send`], but `None` when the connection fails or closes without an answer
/// (the process was killed).
pub async fn try_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Option<Answer> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let rsp = tx.send_request(req).await.ok()?;
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

pub fn get(uri: &str, host: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Writes raw bytes and reads until the server closes or `limit` bytes arrived.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(patience(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 12 {
                    // Enough for a status line and headers of a small answer.
                    let text = String::from_utf8_lossy(&out);
                    if text.contains("content-length: 0") || text.ends_with('}') {
                        break;
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === FaultyUpstream (fault suite) ===

/// What [`FaultyUpstream`] does with one request: the faults a real upstream shows.
#[derive(Clone, Debug)]
pub enum Fault {
    /// A whole answer.
    Respond {
        status: u16,
        headers: Vec<(&'static str, String)>,
    },
    /// Never answers; the connection stays open until the client gives up.
    Hang,
    /// Closes the connection without an answer (after reading the request).
    Reset,
    /// Sends the status line, headers and `sent` bytes of a longer body, then drops the
    /// connection.
    ResetMidBody { status: u16, sent: usize },
    /// Sends the status and headers at once, then the body one byte per `every`.
    Trickle {
        status: u16,
        bytes: usize,
        every: Duration,
    },
}

impl Fault {
    pub fn status(status: u16) -> Fault {
        Fault::Respond {
            status,
            headers: vec![],
        }
    }
}

/// One request [`FaultyUpstream`] saw, and what it did with it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub fault: Fault,
    pub at: tokio::time::Instant,
}

impl Seen {
    pub fn key(&self) -> String {
        self.headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
    /// Whether the upstream gave a complete 2xx answer.
    pub fn answered_2xx(&self) -> bool {
        matches!(&self.fault, Fault::Respond { status, .. } if (200..300).contains(status))
    }
}

type FaultScript = dyn Fn(usize, &Seen) -> Fault + Send + Sync;

/// A real HTTP/1.1 server on 127.0.0.1 that answers each request with the [`Fault`] a
/// test scripts for it, and records what it saw.
pub struct FaultyUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyUpstream {
    pub async fn start<F>(script: F) -> FaultyUpstream
    where
        F: Fn(usize, &Seen) -> Fault + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let script: Arc<FaultScript> = Arc::new(script);
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (seen, count, script) = (s.clone(), count.clone(), script.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, count, script) = (seen.clone(), count.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mut rec = Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                                fault: Fault::Hang,
                                at: tokio::time::Instant::now(),
                            };
                            let n = count.fetch_add(1, Ordering::SeqCst);
                            let fault = script(n, &rec);
                            rec.fault = fault.clone();
                            seen.lock().push(rec);
                            fault_response(fault).await
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultyUpstream { addr, seen, task }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    /// The idempotency keys the upstream answered 2xx at least once.
    pub fn delivered_keys(&self) -> HashSet<String> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.answered_2xx())
            .map(|s| s.key())
            .collect()
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type FaultBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn fault_response(fault: Fault) -> Result<Response<FaultBody>, std::io::Error> {
    use futures_util::StreamExt;
    use hyper::body::Frame;
    let with_status = |status: u16, body: FaultBody| {
        let mut rsp = Response::new(body);
        *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
        rsp
    };
    match fault {
        Fault::Respond { status, headers } => {
            let body = Full::new(Bytes::from_static(b"upstream says hi"))
                .map_err(|never| match never {})
                .boxed();
            let mut rsp = with_status(status, body);
            for (k, v) in headers {
                rsp.headers_mut().insert(k, v.parse().unwrap());
            }
            Ok(rsp)
        }
        Fault::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        // An error from the service makes hyper drop the connection without an answer.
        Fault::Reset => Err(std::io::Error::other("scripted reset")),
        Fault::ResetMidBody { status, sent } => {
            let first = Bytes::from(vec![b'x'; sent]);
            // The pause lets hyper flush the head and the first bytes before the reset.
            let frames = futures_util::stream::iter([Some(first), None]).then(|part| async move {
                match part {
                    Some(data) => Ok(Frame::data(data)),
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(std::io::Error::other("scripted reset mid-body"))
                    }
                }
            });
            let mut rsp = with_status(
                status,
                BodyExt::boxed(http_body_util::StreamBody::new(frames)),
            );
            rsp.headers_mut().insert(
                "content-length",
                (sent * 4 + 16).to_string().parse().unwrap(),
            );
            Ok(rsp)
        }
        Fault::Trickle {
            status,
            bytes,
            every,
        } => {
            let frames = futures_util::stream::iter(0..bytes).then(move |_| async move {
                tokio::time::sleep(every).await;
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x")))
            });
            let mut rsp = with_status(
                status,
                BodyExt::boxed(http_body_util::StreamBody::new(frames)),
            );
            rsp.headers_mut()
                .insert("content-length", bytes.to_string().parse().unwrap());
            Ok(rsp)
        }
    }
}

/// Polls `probe` until it is true or `limit` runs out; returns whether it became true.
pub async fn within<F, Fut>(limit: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if probe().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
