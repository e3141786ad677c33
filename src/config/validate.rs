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
    AdminConfig, Backoff, BreakerConfig, Config, ConfigError, ConfigErrors, DenyMode, Egress,
    FailureClass, HostMatch, Idempotency, Jitter, Limits, NatsConfig, Ordering, QueueConfig, Quota,
    RateLimit, RetryOn, RetryPolicy, RouteConfig, RouteMatch, Scheme, StorageBackend,
    StorageConfig, Unmatched, Upstream,
};
use super::{EncryptionConfig, KeyFrom, KeySource};

const DEFAULT_LISTEN: &str = "127.0.0.1:15080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15081";
const DEFAULT_STORAGE_PATH: &str = "./data/spillway.redb";
const DEFAULT_CACHE_SIZE: u64 = 16 * 1024 * 1024;
const DEFAULT_NATS_STREAM: &str = "SPILLWAY";
/// Longest encryption key id; it is stored with every sealed record.
const KEY_ID_MAX: usize = 64;

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= KEY_ID_MAX
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

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
        backend: StorageBackend::Redb,
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
    if line.starts_with("invalid floating point") {
        return "expected a number such as 2.0".to_string();
    }
    if line.starts_with("expected mapping start") {
        return "expected a mapping of keys and values here".to_string();
    }
    if line.starts_with("expected sequence start") {
        return "expected a list here".to_string();
    }
    if line.starts_with("multiple YAML documents") {
        return "expected one YAML document, found several (remove the extra `---`)".to_string();
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
    /// Set once `storage` is read: some route keys depend on the backend.
    backend: StorageBackend,
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
        self.backend = storage.backend;
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
        let egress = self.egress(raw.egress.unwrap_or_default());
        let shutdown_grace = self.duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            Duration::from_secs(25),
        );
        let redact_headers = raw
            .redact_headers
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, h)| self.header(h, &format!("redact_headers[{i}]")))
            .collect();
        let routes = self.routes(raw.routes.unwrap_or_default());
        Config {
            source: source.to_path_buf(),
            listen,
            admin,
            storage,
            limits,
            unmatched,
            egress,
            shutdown_grace,
            redact_headers,
            routes,
        }
    }

    fn egress(&mut self, raw: raw::RawEgress) -> Egress {
        let deny_private = match &raw.deny_private {
            None => DenyMode::Enforce,
            Some(v) => match v.value.trim() {
                "enforce" => DenyMode::Enforce,
                "report" => DenyMode::Report,
                other => {
                    self.err(
                        v.referenced,
                        "egress.deny_private",
                        format!("expected \"enforce\" or \"report\", found {other:?}"),
                    );
                    DenyMode::Enforce
                }
            },
        };
        let allow = raw
            .allow
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, v)| {
                let text = v.value.trim();
                // A bare address means just that address.
                let parsed = text.parse::<ipnet::IpNet>().or_else(|_| {
                    text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)
                });
                match parsed {
                    Ok(net) => Some(net.trunc()),
                    Err(_) => {
                        self.err(
                            v.referenced,
                            format!("egress.allow[{i}]"),
                            format!(
                                "expected an address range such as \"10.96.0.0/12\" or an address, found {text:?}"
                            ),
                        );
                        None
                    }
                }
            })
            .collect();
        Egress {
            deny_private,
            allow,
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
        let ack_wait =
            self.positive_duration(&raw.ack_wait, "storage.ack_wait", Duration::from_secs(30));
        let nats = match (backend, &raw.url) {
            (StorageBackend::Nats, Some(url)) if !url.value.trim().is_empty() => Some(NatsConfig {
                url: url.value.trim().to_string(),
                stream,
                replicas,
                credentials_file: raw
                    .credentials_file
                    .as_ref()
                    .map(|c| c.value.clone().into()),
                ack_wait,
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
                    (
                        raw.ack_wait.as_ref().map(|s| s.referenced),
                        "storage.ack_wait",
                    ),
                ] {
                    if let Some(at) = v {
                        self.err(at, key, "only for storage backend nats (backend is redb)");
                    }
                }
                None
            }
        };
        let encryption_at = loc(&raw.encryption, Location::UNKNOWN);
        let encryption = raw.encryption.map(|e| self.encryption(e));
        if let (StorageBackend::Nats, Some(_)) = (backend, &encryption) {
            self.err(
                encryption_at,
                "storage.encryption",
                "only for storage backend redb (backend is nats)",
            );
        }
        StorageConfig {
            backend,
            path,
            cache_size,
            nats,
            encryption: encryption.flatten(),
        }
    }

    /// `storage.encryption`: key ids, where each key comes from, and the primary. The keys
    /// themselves are read when the store opens (`queue::crypt`), not here: a config check
    /// may run where the secrets are not mounted.
    fn encryption(&mut self, raw: S<raw::RawEncryption>) -> Option<EncryptionConfig> {
        let at = raw.referenced;
        let raw = raw.value;
        let mut keys: Vec<KeySource> = Vec::new();
        let mut ok = true;
        let raw_keys = raw.keys.unwrap_or_default();
        if raw_keys.is_empty() {
            self.err(
                at,
                "storage.encryption.keys",
                "expected at least one key, e.g. [{ id: k1, file: /run/secrets/spillway-k1 }]",
            );
            ok = false;
        }
        for (i, k) in raw_keys.into_iter().enumerate() {
            let key_at = k.referenced;
            let k = k.value;
            let path = format!("storage.encryption.keys[{i}]");
            let id = match &k.id {
                Some(v) if valid_key_id(v.value.trim()) => Some(v.value.trim().to_string()),
                Some(v) => {
                    self.err(
                        v.referenced,
                        format!("{path}.id"),
                        format!(
                            "expected a key id of 1 to {KEY_ID_MAX} letters, digits, '.', '_' or '-', found {:?}",
                            v.value
                        ),
                    );
                    None
                }
                None => {
                    self.err(
                        key_at,
                        format!("{path}.id"),
                        "every key needs an id (stored with each record it seals)",
                    );
                    None
                }
            };
            if let (Some(id), Some(v)) = (&id, &k.id) {
                if keys.iter().any(|o| &o.id == id) {
                    self.err(
                        v.referenced,
                        format!("{path}.id"),
                        format!("key id {id:?} is listed twice"),
                    );
                    ok = false;
                }
            }
            let from = match (&k.file, &k.env) {
                (Some(f), None) if !f.value.trim().is_empty() => {
                    Some(KeyFrom::File(PathBuf::from(f.value.trim())))
                }
                (None, Some(e))
                    if !e.value.trim().is_empty()
                        && !e.value.contains('=')
                        && !e.value.contains('\0') =>
                {
                    Some(KeyFrom::Env(e.value.trim().to_string()))
                }
                (Some(f), None) => {
                    self.err(
                        f.referenced,
                        format!("{path}.file"),
                        "expected a file path, found an empty string",
                    );
                    None
                }
                (None, Some(e)) => {
                    self.err(
                        e.referenced,
                        format!("{path}.env"),
                        format!(
                            "expected the name of an environment variable, found {:?}",
                            e.value
                        ),
                    );
                    None
                }
                (Some(f), Some(_)) => {
                    self.err(
                        f.referenced,
                        path.clone(),
                        "give either file or env for a key, not both",
                    );
                    None
                }
                (None, None) => {
                    self.err(
                        key_at,
                        path.clone(),
                        "expected file (a path holding the key) or env (a variable holding it)",
                    );
                    None
                }
            };
            match (id, from) {
                (Some(id), Some(from)) => keys.push(KeySource { id, from }),
                _ => ok = false,
            }
        }
        let primary = match &raw.primary {
            Some(p) if keys.iter().any(|k| k.id == p.value.trim()) => {
                Some(p.value.trim().to_string())
            }
            Some(p) => {
                if ok {
                    let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
                    self.err(
                        p.referenced,
                        "storage.encryption.primary",
                        format!(
                            "expected the id of one of the keys ({}), found {:?}",
                            ids.join(", "),
                            p.value
                        ),
                    );
                }
                None
            }
            // One key needs no choice.
            None if keys.len() == 1 => keys.first().map(|k| k.id.clone()),
            None => {
                if ok {
                    self.err(
                        at,
                        "storage.encryption.primary",
                        "with more than one key, primary names the key new records are sealed with",
                    );
                }
                None
            }
        };
        match primary {
            Some(primary) if ok => Some(EncryptionConfig { keys, primary }),
            _ => None,
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
            idle_timeout: self.positive_duration(
                &raw.idle_timeout,
                "limits.idle_timeout",
                d.idle_timeout,
            ),
            max_requests_per_connection: match &raw.max_requests_per_connection {
                Some(v) => self
                    .int(
                        v,
                        "limits.max_requests_per_connection",
                        1,
                        i64::from(u32::MAX),
                    )
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(d.max_requests_per_connection),
                None => d.max_requests_per_connection,
            },
        }
    }

    fn routes(&mut self, raw: Vec<S<RawRoute>>) -> Vec<Arc<RouteConfig>> {
        let mut out = Vec::with_capacity(raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        // (index, name, matcher) of every earlier route whose match was valid.
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
        if let (Some(o), StorageBackend::Nats) = (&r.ordering, self.backend) {
            // A JetStream consumer hands out any pending message; holding one back behind
            // an older one with the same key would need a lock across replicas.
            self.err(
                o.referenced,
                join(p, "ordering"),
                "not available with storage backend nats (backend redb keeps per-key order)",
            );
        }
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
            allow_private: r.allow_private.as_ref().is_some_and(|v| v.value),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn ok(yaml: &str) -> Config {
        from_str(yaml, Path::new("t.yaml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn errs(yaml: &str) -> Vec<ConfigError> {
        match from_str(yaml, Path::new("t.yaml")) {
            Ok(_) => panic!("expected errors for:\n{yaml}"),
            Err(e) => e.0,
        }
    }

    /// The one error at `key`, with its message.
    fn err_at(yaml: &str, key: &str) -> ConfigError {
        let all = errs(yaml);
        all.iter()
            .find(|e| e.key_path == key)
            .cloned()
            .unwrap_or_else(|| panic!("no error at {key}: {all:?}"))
    }

    const ROUTE: &str = "routes:\n  - name: r\n    upstream: https://api.example.com\n";

    #[test]
    fn empty_file_gives_defaults() {
        for text in ["", "# only a comment\n", "{}\n"] {
            let c = ok(text);
            assert_eq!(c.listen, "127.0.0.1:15080".parse().unwrap());
            assert_eq!(c.admin.listen, "127.0.0.1:15081".parse().unwrap());
            assert_eq!(c.admin.token_env, None);
            assert_eq!(c.storage.backend, StorageBackend::Redb);
            assert_eq!(c.storage.path, PathBuf::from("./data/spillway.redb"));
            assert_eq!(c.storage.cache_size, 16 * 1024 * 1024);
            assert!(c.storage.nats.is_none());
            assert_eq!(c.limits.max_body_bytes, Limits::default().max_body_bytes);
            assert_eq!(c.unmatched, Unmatched::Reject);
            assert_eq!(c.shutdown_grace, Duration::from_secs(25));
            assert!(c.routes.is_empty());
        }
    }

    #[test]
    fn passthrough_route_defaults() {
        let c = ok(ROUTE);
        let r = &c.routes[0];
        assert!(!r.deferrable);
        assert_eq!(r.timeout, Duration::from_secs(10));
        assert_eq!(r.concurrency.get(), 8);
        assert_eq!(r.connect_ports, vec![443]);
        assert_eq!(r.queue.max_depth, 100_000);
        assert_eq!(r.idempotency.header.as_str(), "idempotency-key");
        assert_eq!(r.idempotency.dedupe_window, Duration::from_secs(86400));
        assert_eq!(r.retry.max_attempts.get(), 3);
        assert_eq!(r.retry.max_age, None);
        assert!(r.retry.retry_on.failure(FailureClass::ConnectFailure));
        assert!(r.retry.retry_on.failure(FailureClass::Timeout));
        assert!(r.retry.retry_on.failure(FailureClass::Reset));
        assert_eq!(r.retry.retry_on.statuses, vec![502, 503, 504]);
        assert_eq!(r.retry.backoff.initial(), Duration::from_millis(100));
        assert_eq!(r.retry.backoff.max(), Duration::from_secs(1));
        assert_eq!(r.retry.backoff.multiplier(), 2.0);
        assert_eq!(r.retry.backoff.jitter(), Jitter::Full);
        assert!(r.retry.honor_retry_after);
        assert!(r.rate_limit.is_none());
        assert!(r.circuit_breaker.is_none());
        assert!(r.ordering.is_none());
        assert!(r.matcher.host.is_none() && r.matcher.methods.is_none());
    }

    #[test]
    fn deferrable_route_defaults() {
        let c = ok(&format!("{ROUTE}    deferrable: true\n"));
        let r = &c.routes[0];
        assert!(r.deferrable);
        assert_eq!(r.retry.max_attempts.get(), 20);
        assert_eq!(r.retry.max_age, Some(Duration::from_secs(86400)));
        assert_eq!(
            r.retry.retry_on.statuses,
            vec![408, 425, 429, 500, 502, 503, 504]
        );
        assert_eq!(r.retry.backoff.initial(), Duration::from_secs(1));
        assert_eq!(r.retry.backoff.max(), Duration::from_secs(600));
    }

    #[test]
    fn full_example_parses() {
        let text = include_str!("../../config/spillway.yaml");
        let c = ok(text);
        assert_eq!(c.routes.len(), 2);
        let hooks = c.route("partner-webhooks").unwrap();
        assert_eq!(hooks.quotas.len(), 2);
        assert_eq!(
            hooks.ordering.as_ref().unwrap().key_header.as_str(),
            "x-ordering-key"
        );
        let rl = c.route("tax-quote").unwrap().rate_limit.unwrap();
        assert_eq!((rl.per_second.get(), rl.burst.get()), (20, 40));
    }

    #[test]
    fn units() {
        let c = ok("limits:\n  max_body_bytes: 2MiB\n  max_header_bytes: 1000\n  tunnel_idle_timeout: 1h 30m\nshutdown_grace: 250ms\n");
        assert_eq!(c.limits.max_body_bytes, 2 << 20);
        assert_eq!(c.limits.max_header_bytes, 1000);
        assert_eq!(c.limits.tunnel_idle_timeout, Duration::from_secs(5400));
        assert_eq!(c.shutdown_grace, Duration::from_millis(250));
        let e = err_at("shutdown_grace: 25\n", "shutdown_grace");
        assert!(e.message.contains("unit"), "{}", e.message);
        assert_eq!((e.line, e.column), (Some(1), Some(17)));
        err_at("limits:\n  max_body_bytes: huge\n", "limits.max_body_bytes");
    }

    #[test]
    fn parse_errors_have_position_and_key() {
        let e = errs("routes:\n  - name: a\n    upstream: https://x.example\n    retyr: {}\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(4));
        assert_eq!(e[0].key_path, "routes[0].retyr");
        assert!(e[0].message.contains("retyr"));

        let e = errs("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(2));
        assert!(e[0].message.contains("duplicate"), "{}", e[0].message);

        let e = errs("routes: [\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].line.is_some());
    }

    #[test]
    fn key_path_from_indentation() {
        let text = "a:\n  b: 1\nroutes:\n  - name: x\n    retry:\n      backoff: {}\n  - name: y\n    match:\n      methods:\n        - GET\n";
        assert_eq!(key_path_at(text, 2), "a.b");
        assert_eq!(key_path_at(text, 4), "routes[0].name");
        assert_eq!(key_path_at(text, 6), "routes[0].retry.backoff");
        assert_eq!(key_path_at(text, 7), "routes[1].name");
        assert_eq!(key_path_at(text, 10), "routes[1].match.methods[0]");
    }

    #[test]
    fn collects_every_error() {
        let e = errs(
            "listen: nope\nadmin:\n  listen: 10.0.0.1:15081\nunmatched: maybe\nroutes:\n  - name: ''\n    upstream: ftp://x\n  - name: b\n    upstream: https://b.example\n    timeout: 3\n",
        );
        let keys: Vec<_> = e.iter().map(|e| e.key_path.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "listen",
                "admin.listen",
                "unmatched",
                "routes[0].name",
                "routes[0].upstream",
                // routes[0] has no match, so it catches everything routes[1] would.
                "routes[1].match",
                "routes[1].timeout"
            ]
        );
        assert!(e.iter().all(|e| e.line.is_some() && e.column.is_some()));
    }

    #[test]
    fn route_names() {
        ok("routes:\n  - name: a.b_c-1\n    upstream: https://x.example\n");
        err_at(
            "routes:\n  - name: 'a b'\n    upstream: https://x.example\n",
            "routes[0].name",
        );
        err_at(
            "routes:\n  - upstream: https://x.example\n",
            "routes[0].name",
        );
        let e = err_at(
            "routes:\n  - name: a\n    match: { host: a.example }\n    upstream: https://x.example\n  - name: a\n    match: { host: b.example }\n    upstream: https://x.example\n",
            "routes[1].name",
        );
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("routes[0]"));
    }

    #[test]
    fn shadowing() {
        let route = |name: &str, m: &str| {
            format!("  - name: {name}\n    match: {m}\n    upstream: https://x.example\n")
        };
        let cases = [
            (
                "{ host: a.example }",
                "{ host: a.example, path_prefix: /v1 }",
                true,
            ),
            ("{ path_prefix: /v1 }", "{ path_prefix: /v1/x }", true),
            ("{ path_prefix: /v1 }", "{ path_prefix: /v10 }", false),
            ("{ path_prefix: /v1 }", "{ host: a.example }", false),
            ("{ methods: [GET, POST] }", "{ methods: [post] }", true),
            ("{ methods: [GET] }", "{ methods: [GET, POST] }", false),
            ("{ host: a.example }", "{ host: b.example }", false),
            ("{ host: a.example }", "{ host: 'A.example' }", true),
            ("{ host: a.example }", "{ host: 'a.example:8443' }", false),
        ];
        for (first, second, shadowed) in cases {
            let text = format!(
                "routes:\n{}{}",
                route("first", first),
                route("second", second)
            );
            let r = from_str(&text, Path::new("t.yaml"));
            match (shadowed, r) {
                (false, Ok(_)) => {}
                (true, Err(e)) => {
                    assert_eq!(e.0.len(), 1, "{e}");
                    assert_eq!(e.0[0].key_path, "routes[1].match");
                    assert!(e.0[0].message.contains("\"first\""), "{e}");
                }
                (want, got) => panic!("{first} then {second}: want shadowed={want}, got {got:?}"),
            }
        }
        // A route with no match at all catches everything after it.
        err_at(
            "routes:\n  - name: all\n    upstream: https://x.example\n  - name: b\n    match: { host: b.example }\n    upstream: https://x.example\n",
            "routes[1].match",
        );
    }

    #[test]
    fn matchers() {
        let c = ok("routes:\n  - name: r\n    match: { host: 'API.Example.com:8443', path_prefix: /v1, methods: [get, Post, PROPFIND] }\n    upstream: https://x.example\n");
        let m = &c.routes[0].matcher;
        assert_eq!(
            m.host,
            Some(HostMatch {
                host: "api.example.com".into(),
                port: Some(8443)
            })
        );
        assert_eq!(m.path_prefix.as_deref(), Some("/v1"));
        let methods: Vec<_> = m
            .methods
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.as_str())
            .collect();
        assert_eq!(methods, vec!["GET", "POST", "PROPFIND"]);
        let c = ok("routes:\n  - name: r\n    match: { host: '[::1]:8080' }\n    upstream: https://x.example\n");
        assert_eq!(c.routes[0].matcher.host.as_ref().unwrap().host, "::1");

        let base = "routes:\n  - name: r\n    upstream: https://x.example\n    match: ";
        err_at(
            &format!("{base}{{ path_prefix: v1 }}\n"),
            "routes[0].match.path_prefix",
        );
        err_at(
            &format!("{base}{{ methods: ['GE T'] }}\n"),
            "routes[0].match.methods[0]",
        );
        err_at(
            &format!("{base}{{ methods: [] }}\n"),
            "routes[0].match.methods",
        );
        err_at(
            &format!("{base}{{ host: 'a b' }}\n"),
            "routes[0].match.host",
        );
        err_at(
            &format!("{base}{{ host: 'a.example:0' }}\n"),
            "routes[0].match.host",
        );
    }

    #[test]
    fn upstreams() {
        let up = |u: &str| {
            ok(&format!("routes:\n  - name: r\n    upstream: '{u}'\n")).routes[0]
                .upstream
                .clone()
        };
        let u = up("https://API.example.com/base/");
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!(u.host, "api.example.com");
        assert_eq!(u.port, 443);
        assert_eq!(u.authority.as_str(), "api.example.com");
        assert_eq!(u.base_path, "/base");
        let u = up("http://api.example.com:8080");
        assert_eq!(
            (u.port, u.authority.as_str()),
            (8080, "api.example.com:8080")
        );
        assert_eq!(u.base_path, "");
        let u = up("http://api.example.com:80/");
        assert_eq!(u.authority.as_str(), "api.example.com");
        let u = up("http://[::1]:9000");
        assert_eq!(
            (u.host.as_str(), u.authority.as_str()),
            ("::1", "[::1]:9000")
        );

        for bad in [
            "ftp://x.example",
            "/relative",
            "https://user:pw@x.example",
            "https://x.example/?q=1",
            "https://x.example/#frag",
            "not a url",
        ] {
            err_at(
                &format!("routes:\n  - name: r\n    upstream: '{bad}'\n"),
                "routes[0].upstream",
            );
        }
        err_at("routes:\n  - name: r\n", "routes[0].upstream");
    }

    #[test]
    fn backoff_checks() {
        let e = err_at(
            &format!("{ROUTE}    retry:\n      backoff: {{ initial: 5s, max: 1s }}\n"),
            "routes[0].retry.backoff.max",
        );
        assert!(
            e.message.contains("5s") && e.message.contains("1s"),
            "{}",
            e.message
        );
        assert_eq!(e.line, Some(5));
        err_at(
            &format!("{ROUTE}    retry:\n      backoff: {{ multiplier: 0.5 }}\n"),
            "routes[0].retry.backoff.multiplier",
        );
        err_at(
            &format!("{ROUTE}    retry:\n      backoff: {{ initial: 0s }}\n"),
            "routes[0].retry.backoff.initial",
        );
        err_at(
            &format!("{ROUTE}    retry:\n      backoff: {{ jitter: some }}\n"),
            "routes[0].retry.backoff.jitter",
        );
        let c = ok(&format!(
            "{ROUTE}    retry:\n      backoff: {{ initial: 1s, max: 1s, multiplier: 1, jitter: equal }}\n"
        ));
        assert_eq!(c.routes[0].retry.backoff.jitter(), Jitter::Equal);
    }

    #[test]
    fn retry_checks() {
        err_at(
            &format!("{ROUTE}    retry: {{ max_attempts: 0 }}\n"),
            "routes[0].retry.max_attempts",
        );
        let c = ok(&format!(
            "{ROUTE}    retry: {{ retry_on: [reset, '429', 503, 5xx], honor_retry_after: false }}\n"
        ));
        let r = &c.routes[0].retry;
        assert_eq!(r.retry_on.failures, vec![FailureClass::Reset]);
        assert_eq!(r.retry_on.statuses, vec![429, 503]);
        assert_eq!(r.retry_on.classes, vec![5]);
        assert!(r.retry_on.status(599) && !r.retry_on.status(404));
        assert!(!r.honor_retry_after);
        for bad in ["99", "600", "6xx", "flaky"] {
            err_at(
                &format!("{ROUTE}    retry: {{ retry_on: [timeout, {bad}] }}\n"),
                "routes[0].retry.retry_on[1]",
            );
        }
    }

    #[test]
    fn rate_limit_and_breaker() {
        let c = ok(&format!("{ROUTE}    rate_limit: {{ per_second: 7 }}\n"));
        let rl = c.routes[0].rate_limit.unwrap();
        assert_eq!((rl.per_second.get(), rl.burst.get()), (7, 7));
        err_at(
            &format!("{ROUTE}    rate_limit: {{ per_second: 0 }}\n"),
            "routes[0].rate_limit.per_second",
        );
        err_at(
            &format!("{ROUTE}    rate_limit: {{ per_second: 1, burst: 0 }}\n"),
            "routes[0].rate_limit.burst",
        );
        err_at(
            &format!("{ROUTE}    circuit_breaker: {{ consecutive_failures: 0 }}\n"),
            "routes[0].circuit_breaker.consecutive_failures",
        );
        let c = ok(&format!("{ROUTE}    circuit_breaker: {{ open_for: 1m }}\n"));
        let b = c.routes[0].circuit_breaker.unwrap();
        assert_eq!(b.open_for, Duration::from_secs(60));
    }

    #[test]
    fn deferrable_only_keys() {
        for (key, yaml) in [
            ("concurrency", "    concurrency: 2\n"),
            ("quotas", "    quotas: [{ limit: 1, per: 1h }]\n"),
            ("queue", "    queue: { max_depth: 5 }\n"),
            ("ordering", "    ordering: { key_header: X-K }\n"),
            ("retry.max_age", "    retry: { max_age: 1h }\n"),
        ] {
            let e = err_at(&format!("{ROUTE}{yaml}"), &format!("routes[0].{key}"));
            assert!(e.message.contains("only for deferrable routes"));
            ok(&format!("{ROUTE}    deferrable: true\n{yaml}"));
        }
    }

    #[test]
    fn deferrable_details() {
        let d = format!("{ROUTE}    deferrable: true\n");
        err_at(
            &format!("{d}    quotas: [{{ limit: 0, per: 1h }}]\n"),
            "routes[0].quotas[0].limit",
        );
        err_at(
            &format!("{d}    quotas: [{{ limit: 5 }}]\n"),
            "routes[0].quotas[0].per",
        );
        err_at(
            &format!("{d}    ordering: {{}}\n"),
            "routes[0].ordering.key_header",
        );
        err_at(
            &format!("{d}    ordering: {{ key_header: 'bad header' }}\n"),
            "routes[0].ordering.key_header",
        );
        err_at(
            &format!("{d}    idempotency: {{ header: 'a:b' }}\n"),
            "routes[0].idempotency.header",
        );
        err_at(
            &format!("{d}    queue: {{ max_depth: 0 }}\n"),
            "routes[0].queue.max_depth",
        );
        let c = ok(&format!(
            "{d}    retry: {{ max_age: 2h }}\n    connect_ports: [443, 8443]\n"
        ));
        assert_eq!(c.routes[0].retry.max_age, Some(Duration::from_secs(7200)));
        assert_eq!(c.routes[0].connect_ports, vec![443, 8443]);
        err_at(
            &format!("{ROUTE}    connect_ports: [0]\n"),
            "routes[0].connect_ports[0]",
        );
    }

    #[test]
    fn admin_and_listen() {
        let e = err_at("admin:\n  listen: 0.0.0.0:15081\n", "admin.listen");
        assert!(e.message.contains("token_env"));
        assert_eq!(e.line, Some(2));
        let c = ok("admin:\n  listen: 0.0.0.0:15081\n  token_env: TOKEN\n");
        assert_eq!(c.admin.token_env.as_deref(), Some("TOKEN"));
        ok("admin:\n  listen: '[::1]:0'\nlisten: 127.0.0.1:0\n");
        err_at("listen: 127.0.0.1\n", "listen");
    }

    #[test]
    fn storage() {
        let c = ok("storage:\n  backend: nats\n  url: nats://127.0.0.1:4222\n");
        let n = c.storage.nats.unwrap();
        assert_eq!((n.stream.as_str(), n.replicas), ("SPILLWAY", 1));
        assert_eq!(c.storage.backend, StorageBackend::Nats);
        err_at("storage:\n  backend: nats\n", "storage.url");
        err_at("storage:\n  backend: sqlite\n", "storage.backend");
        err_at("storage:\n  url: nats://x\n", "storage.url");
        assert!(c.storage.encryption.is_none());
        let c = ok("storage:\n  path: /var/lib/s.redb\n  cache_size: 1GiB\n");
        assert_eq!(c.storage.cache_size, 1 << 30);
    }

    #[test]
    fn storage_encryption_keys_and_primary() {
        let c = ok("storage:\n  encryption:\n    keys:\n      - { id: k2, file: /run/secrets/k2 }\n      - { id: k1, env: SPILLWAY_KEY_K1 }\n    primary: k2\n");
        let e = c.storage.encryption.unwrap();
        assert_eq!(e.primary, "k2");
        assert_eq!(
            e.keys,
            vec![
                KeySource {
                    id: "k2".into(),
                    from: KeyFrom::File("/run/secrets/k2".into())
                },
                KeySource {
                    id: "k1".into(),
                    from: KeyFrom::Env("SPILLWAY_KEY_K1".into())
                },
            ]
        );
        // One key is its own primary.
        let c = ok("storage:\n  encryption:\n    keys: [{ id: only, env: K }]\n");
        assert_eq!(c.storage.encryption.unwrap().primary, "only");

        let enc = |body: &str| format!("storage:\n  encryption:\n{body}");
        let e = err_at(
            &enc("    keys: [{ id: a, env: A }, { id: b, env: B }]\n"),
            "storage.encryption.primary",
        );
        assert!(e.message.contains("more than one key"), "{e}");
        let e = err_at(
            &enc("    keys: [{ id: a, env: A }]\n    primary: z\n"),
            "storage.encryption.primary",
        );
        assert!(e.message.contains("(a)"), "{e}");
        err_at(&enc("    keys: []\n"), "storage.encryption.keys");
        err_at(&enc("    primary: a\n"), "storage.encryption.keys");
        let e = err_at(
            &enc("    keys: [{ id: a, env: A }, { id: a, env: B }]\n"),
            "storage.encryption.keys[1].id",
        );
        assert!(e.message.contains("twice"), "{e}");
        err_at(
            &enc("    keys: [{ id: 'a b', env: A }]\n"),
            "storage.encryption.keys[0].id",
        );
        err_at(
            &enc("    keys: [{ env: A }]\n"),
            "storage.encryption.keys[0].id",
        );
        err_at(
            &enc("    keys: [{ id: a }]\n"),
            "storage.encryption.keys[0]",
        );
        err_at(
            &enc("    keys: [{ id: a, env: A, file: /f }]\n"),
            "storage.encryption.keys[0]",
        );
        err_at(
            &enc("    keys: [{ id: a, env: 'A=1' }]\n"),
            "storage.encryption.keys[0].env",
        );
        err_at(
            &enc("    keys: [{ id: a, file: '' }]\n"),
            "storage.encryption.keys[0].file",
        );
        err_at(
            &enc("    keys: [{ id: a, key: '00' }]\n"),
            "storage.encryption.keys",
        );
        err_at(
            "storage:\n  backend: nats\n  url: nats://x\n  encryption:\n    keys: [{ id: a, env: A }]\n",
            "storage.encryption",
        );
    }

    #[test]
    fn redact_headers_are_header_names() {
        assert!(ok("").redact_headers.is_empty());
        let c = ok("redact_headers: [X-Api-Key, x-signature]\n");
        let names: Vec<_> = c.redact_headers.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, ["x-api-key", "x-signature"]);
        let e = err_at("redact_headers: [ok, 'bad header']\n", "redact_headers[1]");
        assert!(e.message.contains("header name"), "{}", e.message);
    }

    #[test]
    fn unmatched_values() {
        assert_eq!(
            ok("unmatched: passthrough\n").unmatched,
            Unmatched::Passthrough
        );
        err_at("unmatched: allow\n", "unmatched");
    }

    #[test]
    fn egress_keys() {
        let d = ok("");
        assert_eq!(d.egress.deny_private, DenyMode::Enforce);
        assert!(d.egress.allow.is_empty());
        assert_eq!(d.limits.max_requests_per_connection, 1000);
        let c = ok("egress:\n  deny_private: report\n  allow: [10.96.0.0/12, 127.0.0.1, 'fd00::/8', 10.1.2.3/8]\n");
        assert_eq!(c.egress.deny_private, DenyMode::Report);
        let allow: Vec<String> = c.egress.allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            allow,
            ["10.96.0.0/12", "127.0.0.1/32", "fd00::/8", "10.0.0.0/8"]
        );
        err_at("egress:\n  deny_private: off\n", "egress.deny_private");
        err_at("egress:\n  allow: [10.0.0.0/33]\n", "egress.allow[0]");
        err_at("egress:\n  allow: [internal]\n", "egress.allow[0]");
        err_at("egress:\n  deny: [1.2.3.4]\n", "egress.deny");
        let r = ok(&format!("{ROUTE}    allow_private: true\n"));
        assert!(r.routes[0].allow_private);
        assert!(!ok(ROUTE).routes[0].allow_private);
        let l = ok("limits: { max_requests_per_connection: 1 }\n");
        assert_eq!(l.limits.max_requests_per_connection, 1);
        err_at(
            "limits: { max_requests_per_connection: 0 }\n",
            "limits.max_requests_per_connection",
        );
    }
}
