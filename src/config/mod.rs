//! The validated configuration: every value here is already checked, so code after
//! [`load`] never re-validates. `raw.rs` mirrors the YAML, `validate.rs` turns it into
//! these types and collects every error with its file, line, column and key path.

mod raw;
mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};

pub use validate::{from_str, load};

/// The whole, validated configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration came from (for messages and reloads).
    pub source: PathBuf,
    /// The app-facing proxy listener (`listen`).
    pub listen: SocketAddr,
    pub admin: AdminConfig,
    pub storage: StorageConfig,
    pub limits: Limits,
    pub unmatched: Unmatched,
    /// Where client-chosen destinations may go (`egress:`).
    pub egress: Egress,
    pub shutdown_grace: Duration,
    /// Headers masked in every admin API answer, on top of `Authorization`,
    /// `Proxy-Authorization`, `Cookie` and `Set-Cookie` (`redact_headers`).
    pub redact_headers: Vec<HeaderName>,
    /// Routes in file order; the first that matches wins.
    pub routes: Vec<Arc<RouteConfig>>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Name of the environment variable that holds the bearer token.
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageBackend {
    Redb,
    Nats,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// redb file path (backend `redb`).
    pub path: PathBuf,
    /// redb page cache size in bytes (`cache_size`, default 16 MiB).
    pub cache_size: u64,
    /// JetStream settings (backend `nats`).
    pub nats: Option<NatsConfig>,
    /// Encryption at rest of stored headers and bodies (`storage.encryption`); off when absent.
    pub encryption: Option<EncryptionConfig>,
}

/// `storage.encryption`: the keys records may be sealed with, and the one new records use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// Every key that may open a stored record, in file order; ids are unique.
    pub keys: Vec<KeySource>,
    /// The id of the key new records are sealed with; one of `keys`.
    pub primary: String,
}

/// One entry of `storage.encryption.keys`: where the key is read from at start. The key
/// itself is never part of the configuration, so it never shows in the admin API or logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    /// Stored with every record sealed by this key (letters, digits, `.`, `_`, `-`).
    pub id: String,
    pub from: KeyFrom,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    /// A file holding the key (`file:`), e.g. a mounted secret.
    File(PathBuf),
    /// An environment variable holding the key (`env:`).
    Env(String),
}

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    pub stream: String,
    pub replicas: u32,
    pub credentials_file: Option<PathBuf>,
    /// How long a leased job may go without an ack or a progress signal before JetStream
    /// gives it to another replica (`ack_wait`, default 30s). Progress is signalled every
    /// third of it while a delivery runs, so it bounds how long a dead replica's jobs wait.
    pub ack_wait: Duration,
}

/// Process-wide limits (`limits:`), each with a safe default.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (`413` beyond). Default 1 MiB.
    pub max_body_bytes: u64,
    /// Largest request head (`431` beyond). Default 64 KiB.
    pub max_header_bytes: u64,
    /// Concurrent client connections on the proxy listener. Default 1024.
    pub max_connections: usize,
    /// Time a client has to send a complete request head. Default 10s.
    pub header_read_timeout: Duration,
    /// Time a client has to send a complete request body. Default 30s.
    pub body_read_timeout: Duration,
    /// Concurrent CONNECT tunnels. Default 256.
    pub max_tunnels: usize,
    /// A tunnel with no bytes in either direction for this long is closed. Default 5m.
    pub tunnel_idle_timeout: Duration,
    /// A client connection with no request in flight for this long is closed (keep-alive
    /// between requests, an HTTP/2 connection with no open stream). Default 60s.
    pub idle_timeout: Duration,
    /// A connection is closed after answering this many requests (HTTP/1.1: the last
    /// answer carries `Connection: close`; HTTP/2: a GOAWAY once it is reached), so one
    /// client cannot pin a connection forever and load spreads after a deploy. Default 1000.
    pub max_requests_per_connection: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_tunnels: 256,
            tunnel_idle_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            max_requests_per_connection: 1000,
        }
    }
}

/// `egress:`: the deny list for destinations that a client chooses (unmatched
/// passthrough, `CONNECT`). A route's own `upstream` is never checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// `deny_private`: refuse, or only log, a destination in a denied range.
    pub deny_private: DenyMode,
    /// `allow`: ranges let through although the deny list names them (for example the
    /// cluster's service range).
    pub allow: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DenyMode {
    /// `403 destination_denied` (default).
    #[default]
    Enforce,
    /// Log what would be denied and let it through, to help rollouts.
    Report,
}

/// What happens to a request that matches no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// `403 no_route` (default).
    Reject,
    /// Forward to the authority the client named, without retries.
    Passthrough,
}

/// One entry of `routes:`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// `match:` (a keyword in Rust, hence the field name).
    pub matcher: RouteMatch,
    pub upstream: Upstream,
    pub deferrable: bool,
    /// Per attempt.
    pub timeout: Duration,
    /// Deliveries in flight (deferrable routes).
    pub concurrency: NonZeroU32,
    pub rate_limit: Option<RateLimit>,
    pub quotas: Vec<Quota>,
    pub retry: RetryPolicy,
    pub circuit_breaker: Option<BreakerConfig>,
    pub idempotency: Idempotency,
    pub queue: QueueConfig,
    pub ordering: Option<Ordering>,
    /// Ports a `CONNECT` to this route's host may name. Default `[443]`.
    pub connect_ports: Vec<u16>,
    /// `allow_private`: client-chosen destinations under this route (`CONNECT`) may
    /// reach loopback, private and CGNAT addresses (sidecar use toward in-cluster
    /// services). Default false.
    pub allow_private: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    pub host: Option<HostMatch>,
    /// Starts with `/`; matches on a segment boundary.
    pub path_prefix: Option<String>,
    /// `None` means every method.
    pub methods: Option<Vec<Method>>,
}

/// `match.host`: a lowercase host name or IP literal, with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMatch {
    pub host: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A route's `upstream` URL, split into what the proxy needs.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    /// Lowercase host (IPv6 literals without brackets).
    pub host: String,
    pub port: u16,
    /// `host[:port]` as it goes into `Host` (port omitted when it is the scheme's default).
    pub authority: http::uri::Authority,
    /// Path prefix prepended to every request path, without a trailing `/` (may be empty).
    pub base_path: String,
    /// The URL as written, for messages.
    pub url: Uri,
}

#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// A long-window delivery quota (`quotas: [{limit, per}]`).
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub limit: NonZeroU64,
    pub per: Duration,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub max_attempts: NonZeroU32,
    /// Deferrable routes: a job older than this is dead-lettered.
    pub max_age: Option<Duration>,
    pub retry_on: RetryOn,
    pub backoff: Backoff,
    pub honor_retry_after: bool,
}

/// What class of failure an attempt ended in, as named in `retry_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// No connection could be made: nothing was sent.
    ConnectFailure,
    /// The attempt's `timeout` ran out.
    Timeout,
    /// The connection broke after the request started.
    Reset,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::ConnectFailure => "connect-failure",
            FailureClass::Timeout => "timeout",
            FailureClass::Reset => "reset",
        }
    }
}

/// The parsed `retry_on` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub failures: Vec<FailureClass>,
    /// Exact statuses, sorted.
    pub statuses: Vec<u16>,
    /// Whole classes written as `5xx` (the leading digit).
    pub classes: Vec<u8>,
}

impl RetryOn {
    pub fn failure(&self, class: FailureClass) -> bool {
        self.failures.contains(&class)
    }
    pub fn status(&self, status: u16) -> bool {
        self.statuses.binary_search(&status).is_ok()
            || self.classes.contains(&((status / 100) as u8))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, delay]` (AWS "full jitter").
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
    None,
}

/// Exponential backoff; `initial <= max` and `multiplier >= 1` hold by construction.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Backoff {
    pub fn try_new(
        initial: Duration,
        max: Duration,
        multiplier: f64,
        jitter: Jitter,
    ) -> Result<Self, &'static str> {
        if max < initial {
            return Err("max must be at least initial");
        }
        if !(multiplier.is_finite() && multiplier >= 1.0) {
            return Err("multiplier must be a finite number >= 1.0");
        }
        if initial.is_zero() {
            return Err("initial must be greater than zero");
        }
        Ok(Backoff {
            initial,
            max,
            multiplier,
            jitter,
        })
    }
    pub fn initial(&self) -> Duration {
        self.initial
    }
    pub fn max(&self) -> Duration {
        self.max
    }
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub consecutive_failures: NonZeroU32,
    pub open_for: Duration,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    /// Default `Idempotency-Key`.
    pub header: HeaderName,
    /// Default 24h.
    pub dedupe_window: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Default 100,000.
    pub max_depth: u64,
}

#[derive(Debug, Clone)]
pub struct Ordering {
    pub key_header: HeaderName,
}

// === errors ===

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` where the parser could not tell.
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// Dotted path of the key, e.g. `routes[1].retry.backoff.max` (empty for the whole file).
    pub key_path: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.key_path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key_path, self.message)
        }
    }
}

/// Every problem found in a file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    pub fn route(&self, name: &str) -> Option<&Arc<RouteConfig>> {
        self.routes.iter().find(|r| r.name == name)
    }
}
