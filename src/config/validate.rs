//! Raw YAML to validated [`Config`](super::Config).
//!
//! Parsing (syntax, types, unknown and duplicate keys) stops at the first problem because
//! serde cannot go on; everything after that is checked here and every problem is
//! collected, so one `spillway check` run shows the whole list.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};
use serde_saphyr::{Location, Spanned};

use super::raw::{self, RawConfig, RawRoute};
use super::units::{parse_duration, parse_size, Scalar};
use super::{
    AdminConfig, Backoff, BreakerConfig, Config, ConfigError, ConfigErrors, FailureClass,
    HostMatch, Idempotency, Jitter, Limits, NatsConfig, Ordering, QueueConfig, Quota, RateLimit,
    RetryOn, RetryPolicy, RouteConfig, RouteMatch, Scheme, StorageBackend, StorageConfig,
    Unmatched, Upstream,
};

const DEFAULT_LISTEN: &str = "127.0.0.1:15080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15081";
const DEFAULT_STORAGE_PATH: &str = "./data/spillway.redb";
const DEFAULT_CACHE_SIZE: u64 = 16 * 1024 * 1024;
const DEFAULT_NATS_STREAM: &str = "SPILLWAY";

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            key_path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    from_str(&text, path)
}

/// Validates YAML text; `path` only names the file in errors.
pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let raw = parse(text, path)?;
    let mut cx = Cx {
        file: path,
        errors: Vec::new(),
    };
    let config = cx.config(raw, path);
    if cx.errors.is_empty() {
        Ok(config)
    } else {
        // File order reads best; errors without a position go first.
        cx.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(cx.errors))
    }
}

fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigErrors> {
    // A file with only comments is a valid "all defaults" config, not an EOF error.
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        return Ok(RawConfig::default());
    }
    serde_saphyr::from_str::<Option<RawConfig>>(text)
        .map(Option::unwrap_or_default)
        .map_err(|e| {
            let loc = e.location().filter(|l| l.line() > 0);
            let line = loc.map(|l| clamp(l.line()));
            let column = loc.map(|l| clamp(l.column()));
            let key_path = line.map(|l| key_path_at(text, l)).unwrap_or_default();
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                key_path,
                message: first_line(&e.without_snippet().to_string()),
            }])
        })
}

fn clamp(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The parser's message without its own position suffix or snippet: we print those.
fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or(msg).trim();
    let line = match line.rfind(" at line ") {
        Some(i) => &line[..i],
        None => line,
    };
    // Advice about parser options is for library users, not for someone editing YAML.
    let line = match line.find(", set DuplicateKeyPolicy") {
        Some(i) => &line[..i],
        None => line,
    };
    let line = line.trim_end_matches(':');
    // serde's wording for a non-number in an integer field says nothing to a YAML author.
    if line.starts_with("invalid i64") || line.starts_with("invalid u64") {
        return format!("expected a whole number ({line})");
    }
    line.to_string()
}

/// Best-effort dotted key path for a 1-based line, from indentation alone. The parser
/// does not report one, and a path is what makes an error findable in a long file.
fn key_path_at(text: &str, target: u32) -> String {
    struct Frame {
        indent: isize,
        path: String,
        items: usize,
        is_item: bool,
    }
    let mut stack = vec![Frame {
        indent: -1,
        path: String::new(),
        items: 0,
        is_item: false,
    }];
    let top_path = |stack: &[Frame]| stack.last().map(|f| f.path.clone()).unwrap_or_default();
    for (n, line) in text.lines().enumerate() {
        let line_no = u32::try_from(n + 1).unwrap_or(u32::MAX);
        if line_no > target {
            break;
        }
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut indent = isize::try_from(line.len() - trimmed.len()).unwrap_or(0);
        let mut rest = trimmed;
        // Each `- ` opens a new element of the sequence owned by the frame above it.
        while rest == "-" || rest.starts_with("- ") {
            while stack.len() > 1
                && stack
                    .last()
                    .is_some_and(|f| f.indent > indent || (f.indent == indent && f.is_item))
            {
                stack.pop();
            }
            let Some(parent) = stack.last_mut() else {
                break;
            };
            let path = format!("{}[{}]", parent.path, parent.items);
            parent.items += 1;
            stack.push(Frame {
                indent,
                path,
                items: 0,
                is_item: true,
            });
            let after = rest[1..].trim_start();
            indent += isize::try_from(rest.len() - after.len()).unwrap_or(0);
            rest = after;
        }
        let key = match rest.find(": ") {
            Some(i) => Some(&rest[..i]),
            None => rest.strip_suffix(':'),
        }
        .map(|k| k.trim().trim_matches('"').trim_matches('\''))
        .filter(|k| !k.is_empty() && !k.contains([' ', '{', '[', ',']));
        if let Some(key) = key {
            while stack.len() > 1 && stack.last().is_some_and(|f| f.indent >= indent) {
                stack.pop();
            }
            let path = join(&top_path(&stack), key);
            if line_no == target {
                return path;
            }
            stack.push(Frame {
                indent,
                path,
                items: 0,
                is_item: false,
            });
        } else if line_no == target {
            return top_path(&stack);
        }
    }
    top_path(&stack)
}

/// Collects errors while building the validated config.
struct Cx<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

type S<T> = Spanned<T>;

fn loc<T>(v: &Option<S<T>>, fallback: Location) -> Location {
    v.as_ref().map(|s| s.referenced).unwrap_or(fallback)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Cx<'_> {
    fn err(&mut self, at: Location, key_path: impl Into<String>, message: impl Into<String>) {
        let known = at.line() > 0;
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: known.then(|| clamp(at.line())),
            column: known.then(|| clamp(at.column())),
            key_path: key_path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, v: &Option<S<Scalar>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(&v.value) {
            Ok(d) => d,
            Err(m) => {
                self.err(v.referenced, key, m);
                default
            }
        }
    }

    /// A duration that must be positive (timeouts and windows of zero make no sense).
    fn positive_duration(
        &mut self,
        v: &Option<S<Scalar>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let d = self.duration(v, key, default);
        if d.is_zero() {
            if let Some(v) = v {
                self.err(
                    v.referenced,
                    key,
                    format!("expected a duration greater than zero, found {}", v.value),
                );
            }
            return default;
        }
        d
    }

    fn size(&mut self, v: &Option<S<Scalar>>, key: &str, default: u64) -> u64 {
        let Some(v) = v else { return default };
        match parse_size(&v.value) {
            Ok(n) => n,
            Err(m) => {
                self.err(v.referenced, key, m);
                default
            }
        }
    }

    fn int(&mut self, v: &S<i64>, key: &str, min: i64, max: i64) -> Option<i64> {
        if (min..=max).contains(&v.value) {
            Some(v.value)
        } else if max >= i64::from(u32::MAX) {
            self.err(
                v.referenced,
                key,
                format!("expected an integer >= {min}, found {}", v.value),
            );
            None
        } else {
            self.err(
                v.referenced,
                key,
                format!("expected an integer from {min} to {max}, found {}", v.value),
            );
            None
        }
    }

    fn nonzero_u32(&mut self, v: &Option<S<i64>>, key: &str, default: u32) -> NonZeroU32 {
        let fallback = NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN);
        let Some(v) = v else { return fallback };
        self.int(v, key, 1, i64::from(u32::MAX))
            .and_then(|n| u32::try_from(n).ok())
            .and_then(NonZeroU32::new)
            .unwrap_or(fallback)
    }

    fn socket_addr(&mut self, v: &Option<S<String>>, key: &str, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 0));
        let Some(v) = v else {
            return default.parse().unwrap_or(fallback);
        };
        match v.value.trim().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    v.referenced,
                    key,
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:15080\" or \"[::1]:15080\", found {:?}",
                        v.value
                    ),
                );
                default.parse().unwrap_or(fallback)
            }
        }
    }

    fn header(&mut self, v: &S<String>, key: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(v.value.trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(
                    v.referenced,
                    key,
                    format!(
                        "expected a valid HTTP header name such as \"X-Ordering-Key\", found {:?}",
                        v.value
                    ),
                );
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig, source: &Path) -> Config {
        let listen = self.socket_addr(&raw.listen, "listen", DEFAULT_LISTEN);
        let admin = self.admin(raw.admin.unwrap_or_default());
        let storage = self.storage(raw.storage.unwrap_or_default());
        let limits = self.limits(raw.limits.unwrap_or_default());
        let unmatched = match &raw.unmatched {
            None => Unmatched::Reject,
            Some(v) => match v.value.trim() {
                "reject" => Unmatched::Reject,
                "passthrough" => Unmatched::Passthrough,
                other => {
                    self.err(
                        v.referenced,
                        "unmatched",
                        format!("expected \"reject\" or \"passthrough\", found {other:?}"),
                    );
                    Unmatched::Reject
                }
            },
        };
        let shutdown_grace = self.duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            Duration::from_secs(25),
        );
        let routes = self.routes(raw.routes.unwrap_or_default());
        Config {
            source: source.to_path_buf(),
            listen,
            admin,
            storage,
            limits,
            unmatched,
            shutdown_grace,
            routes,
        }
    }

    fn admin(&mut self, raw: raw::RawAdmin) -> AdminConfig {
        let listen = self.socket_addr(&raw.listen, "admin.listen", DEFAULT_ADMIN_LISTEN);
        let token_env = match &raw.token_env {
            Some(v) if v.value.trim().is_empty() || v.value.contains('=') => {
                self.err(
                    v.referenced,
                    "admin.token_env",
                    format!(
                        "expected the name of an environment variable, found {:?}",
                        v.value
                    ),
                );
                None
            }
            Some(v) => Some(v.value.trim().to_string()),
            None => None,
        };
        // The admin API can pause routes and replay jobs: never expose it unauthenticated.
        if !listen.ip().is_loopback() && token_env.is_none() && raw.token_env.is_none() {
            self.err(
                loc(&raw.listen, Location::UNKNOWN),
                "admin.listen",
                format!(
                    "admin listens on {listen}, beyond loopback, so admin.token_env is required (the name of the environment variable holding the bearer token)"
                ),
            );
        }
        AdminConfig { listen, token_env }
    }

    fn storage(&mut self, raw: raw::RawStorage) -> StorageConfig {
        let backend = match &raw.backend {
            None => StorageBackend::Redb,
            Some(v) => match v.value.trim() {
                "redb" => StorageBackend::Redb,
                "nats" => StorageBackend::Nats,
                other => {
                    self.err(
                        v.referenced,
                        "storage.backend",
                        format!("expected \"redb\" or \"nats\", found {other:?}"),
                    );
                    StorageBackend::Redb
                }
            },
        };
        let path = match &raw.path {
            Some(v) if v.value.trim().is_empty() => {
                self.err(
                    v.referenced,
                    "storage.path",
                    "expected a file path, found an empty string",
                );
                PathBuf::from(DEFAULT_STORAGE_PATH)
            }
            Some(v) => PathBuf::from(&v.value),
            None => PathBuf::from(DEFAULT_STORAGE_PATH),
        };
        let cache_size = self.size(&raw.cache_size, "storage.cache_size", DEFAULT_CACHE_SIZE);
        let stream = raw
            .stream
            .as_ref()
            .map(|s| s.value.trim().to_string())
            .unwrap_or_else(|| DEFAULT_NATS_STREAM.to_string());
        if let Some(s) = &raw.stream {
            let ok = !stream.is_empty()
                && stream
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                self.err(
                    s.referenced,
                    "storage.stream",
                    format!(
                        "expected a JetStream stream name of letters, digits, '_' or '-', found {:?}",
                        s.value
                    ),
                );
            }
        }
        let replicas = match &raw.replicas {
            Some(v) => self
                .int(v, "storage.replicas", 1, 5)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(1),
            None => 1,
        };
        let nats = match (backend, &raw.url) {
            (StorageBackend::Nats, Some(url)) if !url.value.trim().is_empty() => Some(NatsConfig {
                url: url.value.trim().to_string(),
                stream,
                replicas,
                credentials_file: raw
                    .credentials_file
                    .as_ref()
                    .map(|c| c.value.clone().into()),
            }),
            (StorageBackend::Nats, url) => {
                self.err(
                    loc(url, loc(&raw.backend, Location::UNKNOWN)),
                    "storage.url",
                    "storage backend nats requires url (e.g. \"nats://127.0.0.1:4222\")",
                );
                None
            }
            (StorageBackend::Redb, _) => {
                // NATS-only keys on a redb backend are almost certainly a mistake.
                for (v, key) in [
                    (raw.url.as_ref().map(|s| s.referenced), "storage.url"),
                    (raw.stream.as_ref().map(|s| s.referenced), "storage.stream"),
                    (
                        raw.replicas.as_ref().map(|s| s.referenced),
                        "storage.replicas",
                    ),
                    (
                        raw.credentials_file.as_ref().map(|s| s.referenced),
                        "storage.credentials_file",
                    ),
                ] {
                    if let Some(at) = v {
                        self.err(at, key, "only for storage backend nats (backend is redb)");
                    }
                }
                None
            }
        };
        StorageConfig {
            backend,
            path,
            cache_size,
            nats,
        }
    }

    fn limits(&mut self, raw: raw::RawLimits) -> Limits {
        let d = Limits::default();
        let count = |cx: &mut Self, v: &Option<S<i64>>, key: &str, default: usize| match v {
            Some(v) => cx
                .int(v, key, 1, i64::from(u32::MAX))
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(default),
            None => default,
        };
        let max_connections = count(
            self,
            &raw.max_connections,
            "limits.max_connections",
            d.max_connections,
        );
        let max_tunnels = count(self, &raw.max_tunnels, "limits.max_tunnels", d.max_tunnels);
        Limits {
            max_body_bytes: self.size(
                &raw.max_body_bytes,
                "limits.max_body_bytes",
                d.max_body_bytes,
            ),
            max_header_bytes: self.size(
                &raw.max_header_bytes,
                "limits.max_header_bytes",
                d.max_header_bytes,
            ),
            max_connections,
            header_read_timeout: self.positive_duration(
                &raw.header_read_timeout,
                "limits.header_read_timeout",
                d.header_read_timeout,
            ),
            body_read_timeout: self.positive_duration(
                &raw.body_read_timeout,
                "limits.body_read_timeout",
                d.body_read_timeout,
            ),
            max_tunnels,
            tunnel_idle_timeout: self.positive_duration(
                &raw.tunnel_idle_timeout,
                "limits.tunnel_idle_timeout",
                d.tunnel_idle_timeout,
            ),
        }
    }

    fn routes(&mut self, raw: Vec<S<RawRoute>>) -> Vec<Arc<RouteConfig>> {
        let mut out = Vec::with_capacity(raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        // (index, name, matcher, where to point) of every route whose match was valid.
        let mut seen: Vec<(usize, String, RouteMatch)> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let p = format!("routes[{i}]");
            let at = r.referenced;
            let name = self.route_name(&r.value, &p, at);
            if let (Some(n), Some(v)) = (&name, &r.value.name) {
                if let Some(first) = names.get(n) {
                    self.err(
                        v.referenced,
                        join(&p, "name"),
                        format!("duplicate route name {n:?}: routes[{first}] already uses it"),
                    );
                } else {
                    names.insert(n.clone(), i);
                }
            }
            let matcher = self.route_match(&r.value, &p);
            if let Some(m) = &matcher {
                let m_at = loc(&r.value.matcher, at);
                let this_name = name.clone().unwrap_or_else(|| p.clone());
                if let Some((j, other, _)) = seen.iter().find(|(_, _, e)| shadows(e, m)) {
                    self.err(
                        m_at,
                        join(&p, "match"),
                        format!(
                            "route {this_name:?} can never match: the earlier route {other:?} (routes[{j}]) matches every request it would; move it above routes[{j}] or narrow routes[{j}]"
                        ),
                    );
                }
                seen.push((i, this_name, m.clone()));
            }
            let route = self.route(&r.value, &p, at, name, matcher);
            if let Some(route) = route {
                out.push(Arc::new(route));
            }
        }
        out
    }

    fn route_name(&mut self, r: &RawRoute, p: &str, at: Location) -> Option<String> {
        let Some(v) = &r.name else {
            self.err(at, join(p, "name"), "every route needs a name");
            return None;
        };
        let n = v.value.trim();
        let ok = !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            self.err(
                v.referenced,
                join(p, "name"),
                format!(
                    "expected a non-empty name of letters, digits, '_', '.' or '-', found {:?}",
                    v.value
                ),
            );
            return None;
        }
        Some(n.to_string())
    }

    fn route_match(&mut self, r: &RawRoute, p: &str) -> Option<RouteMatch> {
        let Some(m) = &r.matcher else {
            return Some(RouteMatch::default());
        };
        let m = &m.value;
        let mut ok = true;
        let host = match &m.host {
            None => None,
            Some(v) => match parse_host(&v.value) {
                Ok(h) => Some(h),
                Err(msg) => {
                    self.err(v.referenced, join(p, "match.host"), msg);
                    ok = false;
                    None
                }
            },
        };
        let path_prefix = match &m.path_prefix {
            None => None,
            Some(v) => {
                let s = v.value.trim();
                if !s.starts_with('/') || s.contains(['?', '#', ' ']) {
                    self.err(
                        v.referenced,
                        join(p, "match.path_prefix"),
                        format!(
                            "expected a path starting with '/' (no query or fragment), such as \"/v1/quotes\", found {:?}",
                            v.value
                        ),
                    );
                    ok = false;
                    None
                } else {
                    Some(s.to_string())
                }
            }
        };
        let methods = match &m.methods {
            None => None,
            Some(list) if list.is_empty() => {
                self.err(
                    loc(&r.matcher, Location::UNKNOWN),
                    join(p, "match.methods"),
                    "expected at least one method; leave methods out to match every method",
                );
                ok = false;
                None
            }
            Some(list) => {
                let mut out = Vec::new();
                for (k, v) in list.iter().enumerate() {
                    let up = v.value.trim().to_ascii_uppercase();
                    match Method::from_bytes(up.as_bytes()) {
                        Ok(meth) if !up.is_empty() => {
                            if !out.contains(&meth) {
                                out.push(meth);
                            }
                        }
                        _ => {
                            self.err(
                                v.referenced,
                                format!("{p}.match.methods[{k}]"),
                                format!(
                                    "expected an HTTP method such as GET or POST, found {:?}",
                                    v.value
                                ),
                            );
                            ok = false;
                        }
                    }
                }
                Some(out)
            }
        };
        ok.then_some(RouteMatch {
            host,
            path_prefix,
            methods,
        })
    }

    fn route(
        &mut self,
        r: &RawRoute,
        p: &str,
        at: Location,
        name: Option<String>,
        matcher: Option<RouteMatch>,
    ) -> Option<RouteConfig> {
        let upstream = match &r.upstream {
            None => {
                self.err(
                    at,
                    join(p, "upstream"),
                    "every route needs an upstream URL, such as \"https://api.example.com\"",
                );
                None
            }
            Some(v) => match parse_upstream(&v.value) {
                Ok(u) => Some(u),
                Err(m) => {
                    self.err(v.referenced, join(p, "upstream"), m);
                    None
                }
            },
        };
        let deferrable = r.deferrable.as_ref().is_some_and(|d| d.value);

        // Keys that configure the durable queue mean nothing on a passthrough route;
        // accepting them silently would hide a missing `deferrable: true`.
        if !deferrable {
            let only: [(Option<Location>, &str); 5] = [
                (r.concurrency.as_ref().map(|v| v.referenced), "concurrency"),
                (r.quotas.as_ref().map(|v| v.referenced), "quotas"),
                (r.queue.as_ref().map(|v| v.referenced), "queue"),
                (r.ordering.as_ref().map(|v| v.referenced), "ordering"),
                (
                    r.retry
                        .as_ref()
                        .and_then(|rt| rt.value.max_age.as_ref().map(|v| v.referenced)),
                    "retry.max_age",
                ),
            ];
            for (l, key) in only {
                if let Some(l) = l {
                    self.err(
                        l,
                        join(p, key),
                        "only for deferrable routes (set deferrable: true, or remove this key)",
                    );
                }
            }
        }

        let timeout =
            self.positive_duration(&r.timeout, &join(p, "timeout"), Duration::from_secs(10));
        let concurrency = self.nonzero_u32(&r.concurrency, &join(p, "concurrency"), 8);
        let rate_limit = r.rate_limit.as_ref().and_then(|rl| self.rate_limit(rl, p));
        let quotas = self.quotas(r, p);
        let retry = self.retry(r, p, at, deferrable);
        let circuit_breaker = r.circuit_breaker.as_ref().map(|b| {
            let key = join(p, "circuit_breaker");
            BreakerConfig {
                consecutive_failures: self.nonzero_u32(
                    &b.value.consecutive_failures,
                    &format!("{key}.consecutive_failures"),
                    5,
                ),
                open_for: self.positive_duration(
                    &b.value.open_for,
                    &format!("{key}.open_for"),
                    Duration::from_secs(30),
                ),
            }
        });
        let idempotency = {
            let key = join(p, "idempotency");
            let raw = r.idempotency.as_ref().map(|v| &v.value);
            let header = raw
                .and_then(|i| i.header.as_ref())
                .and_then(|h| self.header(h, &format!("{key}.header")))
                .unwrap_or_else(|| HeaderName::from_static("idempotency-key"));
            let none = None;
            let dedupe_window = self.positive_duration(
                raw.map(|i| &i.dedupe_window).unwrap_or(&none),
                &format!("{key}.dedupe_window"),
                Duration::from_secs(24 * 3600),
            );
            Idempotency {
                header,
                dedupe_window,
            }
        };
        let queue = QueueConfig {
            max_depth: r
                .queue
                .as_ref()
                .and_then(|q| q.value.max_depth.as_ref())
                .and_then(|v| self.int(v, &join(p, "queue.max_depth"), 1, i64::MAX))
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(100_000),
        };
        let ordering = match &r.ordering {
            None => None,
            Some(o) => match &o.value.key_header {
                None => {
                    self.err(
                        o.referenced,
                        join(p, "ordering.key_header"),
                        "ordering needs key_header, the request header whose value orders deliveries",
                    );
                    None
                }
                Some(h) => self
                    .header(h, &join(p, "ordering.key_header"))
                    .map(|key_header| Ordering { key_header }),
            },
        };
        let connect_ports = match &r.connect_ports {
            None => vec![443],
            Some(list) => list
                .value
                .iter()
                .enumerate()
                .filter_map(|(k, v)| {
                    self.int(v, &format!("{p}.connect_ports[{k}]"), 1, 65535)
                        .and_then(|n| u16::try_from(n).ok())
                })
                .collect(),
        };

        Some(RouteConfig {
            name: name?,
            matcher: matcher?,
            upstream: upstream?,
            deferrable,
            timeout,
            concurrency,
            rate_limit: rate_limit.flatten(),
            quotas,
            retry: retry?,
            circuit_breaker,
            idempotency,
            queue,
            ordering,
            connect_ports,
        })
    }

    /// `Some(None)` when the rate limit had an error (already reported).
    fn rate_limit(&mut self, rl: &S<raw::RawRateLimit>, p: &str) -> Option<Option<RateLimit>> {
        let key = join(p, "rate_limit");
        let Some(ps) = &rl.value.per_second else {
            self.err(
                rl.referenced,
                format!("{key}.per_second"),
                "rate_limit needs per_second (requests per second, >= 1)",
            );
            return Some(None);
        };
        let per_second = self
            .int(ps, &format!("{key}.per_second"), 1, i64::from(u32::MAX))
            .and_then(|n| u32::try_from(n).ok())
            .and_then(NonZeroU32::new);
        let burst = match &rl.value.burst {
            None => per_second,
            Some(b) => self
                .int(b, &format!("{key}.burst"), 1, i64::from(u32::MAX))
                .and_then(|n| u32::try_from(n).ok())
                .and_then(NonZeroU32::new),
        };
        Some(match (per_second, burst) {
            (Some(per_second), Some(burst)) => Some(RateLimit { per_second, burst }),
            _ => None,
        })
    }

    fn quotas(&mut self, r: &RawRoute, p: &str) -> Vec<Quota> {
        let Some(list) = &r.quotas else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, q) in list.value.iter().enumerate() {
            let key = format!("{p}.quotas[{k}]");
            let limit = match &q.value.limit {
                None => {
                    self.err(
                        q.referenced,
                        format!("{key}.limit"),
                        "a quota needs limit (>= 1)",
                    );
                    None
                }
                Some(v) => self
                    .int(v, &format!("{key}.limit"), 1, i64::MAX)
                    .and_then(|n| u64::try_from(n).ok())
                    .and_then(NonZeroU64::new),
            };
            let per = match &q.value.per {
                None => {
                    self.err(
                        q.referenced,
                        format!("{key}.per"),
                        "a quota needs per, the window length such as \"1h\" or \"24h\"",
                    );
                    None
                }
                Some(_) => {
                    let before = self.errors.len();
                    let d =
                        self.positive_duration(&q.value.per, &format!("{key}.per"), Duration::ZERO);
                    (self.errors.len() == before).then_some(d)
                }
            };
            if let (Some(limit), Some(per)) = (limit, per) {
                out.push(Quota { limit, per });
            }
        }
        out
    }

    fn retry(
        &mut self,
        r: &RawRoute,
        p: &str,
        at: Location,
        deferrable: bool,
    ) -> Option<RetryPolicy> {
        let key = join(p, "retry");
        let raw = r.retry.as_ref().map(|v| &v.value);
        let retry_at = loc(&r.retry, at);
        let (attempts, max_age, retry_on, initial, max) = if deferrable {
            (
                20,
                Some(Duration::from_secs(24 * 3600)),
                "connect-failure timeout reset 408 425 429 500 502 503 504",
                Duration::from_secs(1),
                Duration::from_secs(600),
            )
        } else {
            (
                3,
                None,
                "connect-failure timeout reset 502 503 504",
                Duration::from_millis(100),
                Duration::from_secs(1),
            )
        };
        let max_attempts = self.nonzero_u32(
            &raw.and_then(|r| r.max_attempts.as_ref()).cloned(),
            &format!("{key}.max_attempts"),
            attempts,
        );
        let max_age = match raw.and_then(|r| r.max_age.as_ref()) {
            // Passthrough routes have already been told max_age is not theirs.
            Some(_) if !deferrable => None,
            Some(v) => Some(self.positive_duration(
                &Some(v.clone()),
                &format!("{key}.max_age"),
                Duration::from_secs(24 * 3600),
            )),
            None => max_age,
        };
        let retry_on = match raw.and_then(|r| r.retry_on.as_ref()) {
            None => parse_retry_on_defaults(retry_on),
            Some(list) => self.retry_on(list, &format!("{key}.retry_on")),
        };
        let b = raw.and_then(|r| r.backoff.as_ref());
        let bv = b.map(|b| &b.value);
        let b_at = b.map(|b| b.referenced).unwrap_or(retry_at);
        let bkey = format!("{key}.backoff");
        let none = None;
        let initial_raw = bv.map(|b| &b.initial).unwrap_or(&none);
        let max_raw = bv.map(|b| &b.max).unwrap_or(&none);
        let before = self.errors.len();
        let initial = self.duration(initial_raw, &format!("{bkey}.initial"), initial);
        let max = self.duration(max_raw, &format!("{bkey}.max"), max);
        let multiplier = bv
            .and_then(|b| b.multiplier.as_ref())
            .map(|m| m.value)
            .unwrap_or(2.0);
        let jitter = match bv.and_then(|b| b.jitter.as_ref()) {
            None => Jitter::Full,
            Some(j) => match j.value.trim() {
                "full" => Jitter::Full,
                "equal" => Jitter::Equal,
                "none" => Jitter::None,
                other => {
                    self.err(
                        j.referenced,
                        format!("{bkey}.jitter"),
                        format!("expected \"full\", \"equal\" or \"none\", found {other:?}"),
                    );
                    Jitter::Full
                }
            },
        };
        let backoff = if self.errors.len() > before {
            None
        } else {
            match Backoff::try_new(initial, max, multiplier, jitter) {
                Ok(b) => Some(b),
                Err(_) if max < initial => {
                    self.err(
                        loc(max_raw, loc(initial_raw, b_at)),
                        format!("{bkey}.max"),
                        format!(
                            "max must be at least initial: max is {}, initial is {}",
                            humantime::format_duration(max),
                            humantime::format_duration(initial)
                        ),
                    );
                    None
                }
                Err(_) if initial.is_zero() => {
                    self.err(
                        loc(initial_raw, b_at),
                        format!("{bkey}.initial"),
                        "expected a duration greater than zero, found 0",
                    );
                    None
                }
                Err(m) => {
                    let at = bv
                        .and_then(|b| b.multiplier.as_ref())
                        .map(|m| m.referenced)
                        .unwrap_or(b_at);
                    self.err(
                        at,
                        format!("{bkey}.multiplier"),
                        format!("{m}, found {multiplier}"),
                    );
                    None
                }
            }
        };
        let honor_retry_after = raw
            .and_then(|r| r.honor_retry_after.as_ref())
            .is_none_or(|h| h.value);
        Some(RetryPolicy {
            max_attempts,
            max_age,
            retry_on,
            backoff: backoff?,
            honor_retry_after,
        })
    }

    fn retry_on(&mut self, list: &[S<Scalar>], key: &str) -> RetryOn {
        let mut out = RetryOn::default();
        for (k, v) in list.iter().enumerate() {
            match parse_retry_item(&v.value) {
                Ok(item) => add_retry_item(&mut out, item),
                Err(m) => self.err(v.referenced, format!("{key}[{k}]"), m),
            }
        }
        out.statuses.sort_unstable();
        out.statuses.dedup();
        out
    }
}

enum RetryItem {
    Failure(FailureClass),
    Status(u16),
    Class(u8),
}

fn add_retry_item(out: &mut RetryOn, item: RetryItem) {
    match item {
        RetryItem::Failure(f) if !out.failures.contains(&f) => out.failures.push(f),
        RetryItem::Status(s) => out.statuses.push(s),
        RetryItem::Class(c) if !out.classes.contains(&c) => out.classes.push(c),
        _ => {}
    }
}

fn parse_retry_item(v: &Scalar) -> Result<RetryItem, String> {
    let expected =
        "expected connect-failure, timeout, reset, a status from 100 to 599 or a class such as 5xx";
    match v {
        Scalar::Int(n) if (100..=599).contains(n) => {
            Ok(RetryItem::Status(u16::try_from(*n).unwrap_or(500)))
        }
        Scalar::Str(s) => {
            let s = s.trim().to_ascii_lowercase();
            match s.as_str() {
                "connect-failure" => Ok(RetryItem::Failure(FailureClass::ConnectFailure)),
                "timeout" => Ok(RetryItem::Failure(FailureClass::Timeout)),
                "reset" => Ok(RetryItem::Failure(FailureClass::Reset)),
                _ => {
                    if let Ok(n) = s.parse::<u16>() {
                        if (100..=599).contains(&n) {
                            return Ok(RetryItem::Status(n));
                        }
                    }
                    let b = s.as_bytes();
                    if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && &b[1..] == b"xx" {
                        return Ok(RetryItem::Class(b[0] - b'0'));
                    }
                    Err(format!("{expected}, found {v}"))
                }
            }
        }
        _ => Err(format!("{expected}, found {v}")),
    }
}

fn parse_retry_on_defaults(list: &str) -> RetryOn {
    let mut out = RetryOn::default();
    for item in list.split_whitespace() {
        if let Ok(i) = parse_retry_item(&Scalar::Str(item.to_string())) {
            add_retry_item(&mut out, i);
        }
    }
    out.statuses.sort_unstable();
    out
}

/// Does the earlier match `e` catch every request the later match `l` would?
fn shadows(e: &RouteMatch, l: &RouteMatch) -> bool {
    let host = match (&e.host, &l.host) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    };
    let path = match (&e.path_prefix, &l.path_prefix) {
        (None, _) => true,
        (Some(a), Some(b)) => segment_prefix(a, b),
        (Some(_), None) => false,
    };
    let methods = match (&e.methods, &l.methods) {
        (None, _) => true,
        (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        (Some(_), None) => false,
    };
    host && path && methods
}

/// `/v1` is a segment prefix of `/v1` and `/v1/x`, not of `/v10`.
fn segment_prefix(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    let path = path.trim_end_matches('/');
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

fn parse_host(raw: &str) -> Result<HostMatch, String> {
    let s = raw.trim().to_ascii_lowercase();
    let bad = || {
        format!(
            "expected a host name or IP address with an optional port, such as \"api.example.com\" or \"api.example.com:8443\", found {raw:?}"
        )
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        h.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        let port = match after {
            "" => None,
            a => Some(a.strip_prefix(':').ok_or_else(bad)?),
        };
        (h.to_string(), port)
    } else if s.matches(':').count() > 1 {
        // An unbracketed IPv6 literal cannot carry a port.
        s.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (s.clone(), None)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.clone(), None),
        }
    };
    let host_ok = !host.is_empty()
        && (host.contains(':')
            || host.split('.').all(|l| {
                !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    if !host_ok {
        return Err(bad());
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?),
    };
    Ok(HostMatch { host, port })
}

fn parse_upstream(raw: &str) -> Result<Upstream, String> {
    let text = raw.trim();
    let url = url::Url::parse(text).map_err(|e| {
        format!("expected an absolute http or https URL such as \"https://api.example.com\", found {raw:?} ({e})")
    })?;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err(format!(
                "expected an http or https URL, found scheme {other:?} in {raw:?}"
            ))
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "expected a URL without user or password (credentials belong in headers, not in the config), found {raw:?}"
        ));
    }
    if url.query().is_some() {
        return Err(format!(
            "expected a URL without a query string, found {raw:?}"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!("expected a URL without a fragment, found {raw:?}"));
    }
    let (host, host_in_authority) = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => {
            (d.to_ascii_lowercase(), d.to_ascii_lowercase())
        }
        Some(url::Host::Ipv4(a)) => (a.to_string(), a.to_string()),
        Some(url::Host::Ipv6(a)) => (a.to_string(), format!("[{a}]")),
        _ => return Err(format!("expected a URL with a host, found {raw:?}")),
    };
    let port = url.port_or_known_default().unwrap_or(scheme.default_port());
    let authority_text = if port == scheme.default_port() {
        host_in_authority
    } else {
        format!("{host_in_authority}:{port}")
    };
    let authority = http::uri::Authority::from_str(&authority_text)
        .map_err(|e| format!("invalid host in {raw:?}: {e}"))?;
    let base_path = url.path().trim_end_matches('/').to_string();
    let uri = Uri::from_str(text).map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
    Ok(Upstream {
        scheme,
        host,
        port,
        authority,
        base_path,
        url: uri,
    })
}
