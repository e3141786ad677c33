//! Hot reload: `SIGHUP`, or a change of the config file, loads the file again and swaps
//! what can be swapped while traffic flows.
//!
//! - **Applies at once**, for requests and deliveries that start afterwards: routes (added,
//!   removed, changed, reordered), upstreams, per-attempt timeouts, retry policies, rate
//!   limits, quotas, breakers, idempotency and queue settings, `unmatched`, `egress`,
//!   `shutdown_grace`, `limits.max_body_bytes`, `limits.body_read_timeout`,
//!   `limits.tunnel_idle_timeout` and `limits.max_requests_per_connection` (for
//!   connections opened afterwards).
//!   A request in progress finishes on the table it started with; a delivery attempt already
//!   sent finishes under the policy it was leased with.
//! - **State**: a route whose config did not change keeps its breaker, rate limiter, retry
//!   budget and dispatcher; a changed route starts afresh with its new config.
//! - **Needs a restart** (logged per key, the running value stays, the rest still applies):
//!   `listen`, `admin.listen`, `admin.token_env`, `storage.*`, and the limits bound into the
//!   listener: `limits.max_connections`, `limits.header_read_timeout`,
//!   `limits.idle_timeout`, `limits.max_header_bytes`, `limits.max_tunnels`. Storage opens at startup, and only when
//!   some route is deferrable: a route made deferrable while no store is open keeps its old
//!   definition (a route new in the file is left out) until a restart. Opening the store
//!   lazily was left out on purpose: the admin API and readiness are wired to the store at
//!   startup, so a store opened later would be one they cannot see.
//! - **Invalid file**: every error is logged with file:line:col and key; the running config
//!   stays, whole. So does a file with nothing but blanks and comments: valid at startup, but
//!   on a running process most likely one caught mid-write.
//! - **Removed routes**: the dispatcher stops, the jobs stay stored (listed by
//!   [`Runtime::orphaned_routes`]); when the route returns, delivery resumes.
//!
//! The file is watched through its directory, so editors that write a new file and rename it
//! over the old one, and Kubernetes ConfigMap volumes (which swap a `..data` symlink), are
//! seen. Events are debounced, and a reload happens only when the file's text changed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{new_debouncer, DebounceEventResult, Debouncer};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::HttpClient;
use crate::config::{Config, ConfigError, ConfigErrors, RouteConfig};
use crate::dispatch::{Dispatcher, Wakes};
use crate::metrics::Metrics;
use crate::proxy::defer::Deferrer;
use crate::proxy::Proxy;
use crate::queue::{JobStore, StoreError};

/// Quiet time after the last file event before the file is read again: an editor's
/// write, rename and chmod become one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// How long a reload waits for a stopped dispatcher to leave its loop.
const DISPATCHER_STOP_WAIT: Duration = Duration::from_secs(5);

/// What started a reload (a log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
    /// Called from code (the admin API, tests).
    Request,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file_change",
            Trigger::Request => "request",
        }
    }
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The new config runs (an empty summary means nothing changed).
    Applied(ReloadSummary),
    /// The file is invalid; the running config stays, whole.
    Rejected(ConfigErrors),
}

impl ReloadOutcome {
    /// Success or failure, as a metric sees it.
    pub fn ok(&self) -> bool {
        matches!(self, ReloadOutcome::Applied(_))
    }
}

/// What changed between the running config and the one now running.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Route name and the keys that changed in it.
    pub changed: Vec<(String, Vec<&'static str>)>,
    /// Other keys that changed and applied (`unmatched`, `limits.max_body_bytes`, ...).
    pub settings: Vec<&'static str>,
    /// Keys whose new value waits for a restart; their running value stays.
    pub needs_restart: Vec<String>,
    /// Not a change but the state after it: routes with jobs stored and no deferrable
    /// route of that name configured (see [`Runtime::orphaned_routes`]).
    pub orphaned: Vec<String>,
}

impl ReloadSummary {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.settings.is_empty()
            && self.needs_restart.is_empty()
    }
}

type Hook = Box<dyn Fn(&ReloadOutcome) + Send + Sync>;

/// A running dispatcher and what it was started with.
struct Running {
    route: Arc<RouteConfig>,
    wake: Arc<Notify>,
    /// The dispatcher's ear for operators' actions, heard while paused too.
    control: Arc<Notify>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What the running process shares and a reload replaces: the config now in force, the
/// proxy's route table and the dispatchers of deferrable routes.
pub struct Runtime {
    config: ArcSwap<Config>,
    proxy: Arc<Proxy>,
    store: Option<Arc<dyn JobStore>>,
    client: HttpClient,
    admin_base: String,
    stop: CancellationToken,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
    /// Also serialises reloads: one applies at a time.
    dispatchers: tokio::sync::Mutex<HashMap<String, Running>>,
    hooks: Mutex<Vec<Hook>>,
    /// The file's text as last read by a reload (or at watch start), so that file events
    /// which leave the text as it was do not reload.
    last_text: Mutex<Option<String>>,
}

impl Runtime {
    /// Builds the proxy and starts a dispatcher per deferrable route (when `store` is open).
    pub(crate) fn start(
        config: Config,
        client: HttpClient,
        store: Option<Arc<dyn JobStore>>,
        admin_base: String,
        stop: CancellationToken,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Arc<Runtime> {
        let mut running = HashMap::new();
        if let Some(store) = &store {
            for route in config.routes.iter().filter(|r| r.deferrable) {
                let r = spawn_dispatcher(
                    store,
                    route,
                    &client,
                    Arc::new(Notify::new()),
                    &stop,
                    &tasks,
                    &metrics,
                );
                running.insert(route.name.clone(), r);
            }
        }
        let deferrer = deferrer(&store, &admin_base, &running);
        let proxy = Arc::new(Proxy::new(
            &config,
            client.clone(),
            deferrer,
            metrics.clone(),
        ));
        let runtime = Arc::new(Runtime {
            config: ArcSwap::from_pointee(config),
            proxy,
            store,
            client,
            admin_base,
            stop,
            tasks,
            metrics,
            dispatchers: tokio::sync::Mutex::new(running),
            hooks: Mutex::new(Vec::new()),
            last_text: Mutex::new(None),
        });
        let metrics = runtime.metrics.clone();
        runtime.on_reload(move |outcome| metrics.config_reloaded(outcome.ok()));
        runtime
    }

    /// The registry the proxy, the dispatchers and reloads report into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The config in force: the file's last valid version, with the keys that need a
    /// restart still at their startup values.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    pub fn store(&self) -> Option<&Arc<dyn JobStore>> {
        self.store.as_ref()
    }

    /// Names of the configured routes, in file order.
    pub fn configured_routes(&self) -> Vec<String> {
        self.config
            .load()
            .routes
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// Routes with jobs stored but no deferrable route of that name configured: nothing
    /// delivers their jobs until the route returns. Sorted.
    pub async fn orphaned_routes(&self) -> Result<Vec<String>, StoreError> {
        let Some(store) = &self.store else {
            return Ok(Vec::new());
        };
        let stored = store.routes().await?;
        let config = self.config.load();
        Ok(stored
            .into_iter()
            .filter(|name| {
                !config
                    .routes
                    .iter()
                    .any(|r| r.deferrable && r.name == *name)
            })
            .collect())
    }

    /// Lets the route's dispatcher look at its queue now (after an admin retry, replay or
    /// resume) rather than at its next timer.
    pub async fn wake(&self, route: &str) {
        if let Some(r) = self.dispatchers.lock().await.get(route) {
            r.control.notify_one();
        }
    }

    /// Runs `hook` after every reload, with its outcome (metrics count them here).
    pub fn on_reload(&self, hook: impl Fn(&ReloadOutcome) + Send + Sync + 'static) {
        self.hooks.lock().push(Box::new(hook));
    }

    /// Reads the config file again and applies it; logs the outcome and runs the hooks.
    pub async fn reload(&self, trigger: Trigger) -> ReloadOutcome {
        let path = self.config.load().source.clone();
        let outcome = match read(&path).await {
            Ok(text) => {
                *self.last_text.lock() = Some(text.clone());
                if is_blank(&text) {
                    ReloadOutcome::Rejected(ConfigErrors(vec![ConfigError {
                        file: path.clone(),
                        line: None,
                        column: None,
                        key_path: String::new(),
                        message: "the file is empty (truncated, or a write in progress?); an empty file would remove every route".into(),
                    }]))
                } else {
                    match crate::config::from_str(&text, &path) {
                        Ok(config) => self.apply(config).await,
                        Err(errs) => ReloadOutcome::Rejected(errs),
                    }
                }
            }
            Err(errs) => ReloadOutcome::Rejected(errs),
        };
        self.report(trigger, &path, &outcome);
        outcome
    }

    /// Applies a validated config: dispatchers first (a new route's dispatcher is there
    /// before its first accept), then the proxy's route table in one swap. Neither logs
    /// nor runs the hooks; [`Runtime::reload`] does both.
    pub async fn apply(&self, new: Config) -> ReloadOutcome {
        let mut running = self.dispatchers.lock().await;
        let old = self.config.load_full();
        let (config, needs_restart) = effective(&old, new, self.store.is_some());
        let mut summary = diff(&old, &config);
        summary.needs_restart = needs_restart;
        if let Some(store) = &self.store {
            self.sync_dispatchers(store, &mut running, &config).await;
        }
        let unchanged: HashSet<String> = config
            .routes
            .iter()
            .filter(|r| old.route(&r.name).is_some_and(|o| same(&**o, &**r)))
            .map(|r| r.name.clone())
            .collect();
        let deferrer = deferrer(&self.store, &self.admin_base, &running);
        self.proxy.swap(&config, deferrer, &unchanged);
        self.config.store(Arc::new(config));
        drop(running);
        summary.orphaned = match self.orphaned_routes().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the routes that have stored jobs");
                Vec::new()
            }
        };
        ReloadOutcome::Applied(summary)
    }

    /// Stops the dispatchers of removed or changed routes, then starts those of new or
    /// changed ones. A changed route keeps its wake-up, so an accept that raced the reload
    /// still wakes the new dispatcher.
    async fn sync_dispatchers(
        &self,
        store: &Arc<dyn JobStore>,
        running: &mut HashMap<String, Running>,
        config: &Config,
    ) {
        let want: HashMap<&str, &Arc<RouteConfig>> = config
            .routes
            .iter()
            .filter(|r| r.deferrable)
            .map(|r| (r.name.as_str(), r))
            .collect();
        let mut wakes = HashMap::new();
        let mut stopping = Vec::new();
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            let keep = match (want.get(name.as_str()), running.get(&name)) {
                (Some(new), Some(r)) => same(&***new, &*r.route),
                _ => false,
            };
            if keep {
                continue;
            }
            if let Some(r) = running.remove(&name) {
                r.stop.cancel();
                wakes.insert(name.clone(), r.wake.clone());
                stopping.push((name, r.task));
            }
        }
        for (name, task) in stopping {
            // Attempts already sent finish on their own; only the loop is waited for, so
            // two loops of one route do not lease side by side for long.
            if tokio::time::timeout(DISPATCHER_STOP_WAIT, task)
                .await
                .is_err()
            {
                tracing::warn!(route = %name, "a dispatcher did not stop within 5s; it stops once its storage call returns");
            }
        }
        for (name, route) in want {
            if running.contains_key(name) {
                continue;
            }
            let wake = wakes
                .remove(name)
                .unwrap_or_else(|| Arc::new(Notify::new()));
            let r = spawn_dispatcher(
                store,
                route,
                &self.client,
                wake,
                &self.stop,
                &self.tasks,
                &self.metrics,
            );
            running.insert(name.to_owned(), r);
        }
    }

    /// The one place a reload's outcome is told: the log, then the hooks.
    fn report(&self, trigger: Trigger, path: &Path, outcome: &ReloadOutcome) {
        let file = path.display().to_string();
        match outcome {
            ReloadOutcome::Applied(s) => {
                for key in &s.needs_restart {
                    tracing::warn!(trigger = trigger.as_str(), %file, %key, "config reload: `{key}` changed, which needs a restart; the running value stays until then");
                }
                if !s.orphaned.is_empty() {
                    tracing::warn!(trigger = trigger.as_str(), orphaned = ?s.orphaned, "routes with stored jobs are not configured as deferrable; their jobs stay stored and deliver when the route returns");
                }
                if s.is_empty() {
                    tracing::info!(
                        trigger = trigger.as_str(),
                        %file,
                        "config reloaded; nothing changed"
                    );
                } else {
                    let changed: Vec<String> = s
                        .changed
                        .iter()
                        .map(|(name, keys)| format!("{name} ({})", keys.join(", ")))
                        .collect();
                    tracing::info!(
                        trigger = trigger.as_str(),
                        %file,
                        added = ?s.added,
                        removed = ?s.removed,
                        changed = ?changed,
                        settings = ?s.settings,
                        needs_restart = ?s.needs_restart,
                        routes = ?self.configured_routes(),
                        "config reloaded"
                    );
                }
            }
            ReloadOutcome::Rejected(errs) => {
                for e in &errs.0 {
                    tracing::error!(
                        trigger = trigger.as_str(),
                        file = %e.file.display(),
                        line = e.line,
                        column = e.column,
                        key = %e.key_path,
                        "config reload: {e}"
                    );
                }
                tracing::error!(
                    trigger = trigger.as_str(),
                    %file,
                    errors = errs.0.len(),
                    "config reload rejected; the running config stays"
                );
            }
        }
        for hook in self.hooks.lock().iter() {
            hook(outcome);
        }
    }

    /// Reloads on `SIGHUP` and, with `watch_file`, on changes of the config file, until
    /// shutdown. Call once, before telling anyone the process is up: `SIGHUP` kills a
    /// process that has no handler for it.
    pub fn watch(self: &Arc<Self>, watch_file: bool) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; config reloads only follow file changes");
                None
            }
        };
        let path = self.config.load().source.clone();
        let changed = Arc::new(Notify::new());
        let watcher = if watch_file {
            watch_dir(&path, changed.clone())
        } else {
            None
        };
        *self.last_text.lock() = std::fs::read_to_string(&path).ok();
        let rt = self.clone();
        self.tasks.spawn(async move {
            // Dropping the debouncer ends the watch.
            let _watcher = watcher;
            loop {
                let trigger = tokio::select! {
                    Some(()) = next_signal(&mut hup) => Trigger::Signal,
                    _ = changed.notified() => Trigger::FileChange,
                    _ = rt.stop.cancelled() => return,
                };
                if trigger == Trigger::FileChange && !rt.text_changed(&path).await {
                    tracing::debug!(file = %path.display(), "config file event, same text; no reload");
                    continue;
                }
                rt.reload(trigger).await;
            }
        });
    }

    async fn text_changed(&self, path: &Path) -> bool {
        let now = read(path).await.ok();
        *self.last_text.lock() != now
    }
}

async fn next_signal(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Nothing but blanks and comments. Valid YAML, and a valid (empty) config at startup,
/// but on a running process far more likely a file caught mid-write than a wish to
/// drop every route.
fn is_blank(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#'))
}

async fn read(path: &Path) -> Result<String, ConfigErrors> {
    let p = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || std::fs::read_to_string(&p)).await;
    let message = match result {
        Ok(Ok(text)) => return Ok(text),
        Ok(Err(e)) => format!("cannot read the file: {e}"),
        Err(e) => format!("cannot read the file: {e}"),
    };
    Err(ConfigErrors(vec![ConfigError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        key_path: String::new(),
        message,
    }]))
}

fn spawn_dispatcher(
    store: &Arc<dyn JobStore>,
    route: &Arc<RouteConfig>,
    client: &HttpClient,
    wake: Arc<Notify>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
    metrics: &Arc<Metrics>,
) -> Running {
    // A child token: a reload stops one dispatcher, shutdown stops them all.
    let token = stop.child_token();
    let control = Arc::new(Notify::new());
    let d = Dispatcher::new(
        store.clone(),
        route.clone(),
        client.clone(),
        Wakes {
            jobs: wake.clone(),
            control: control.clone(),
        },
        token.clone(),
        tasks.clone(),
        metrics.clone(),
    );
    Running {
        route: route.clone(),
        wake,
        control,
        stop: token,
        task: tasks.spawn(d.run()),
    }
}

fn deferrer(
    store: &Option<Arc<dyn JobStore>>,
    admin_base: &str,
    running: &HashMap<String, Running>,
) -> Option<Arc<Deferrer>> {
    store.as_ref().map(|store| {
        Arc::new(Deferrer {
            store: store.clone(),
            admin_base: admin_base.to_owned(),
            wake: running
                .iter()
                .map(|(name, r)| (name.clone(), r.wake.clone()))
                .collect(),
        })
    })
}

/// Watches the file's directory (and, for a symlink, its target's), and wakes `changed`
/// for events that may concern the file. `None` (logged) when the platform refuses.
fn watch_dir(path: &Path, changed: Arc<Notify>) -> Option<Debouncer<RecommendedWatcher>> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut names = HashSet::new();
    let mut dirs = Vec::new();
    for p in [Some(path.clone()), std::fs::canonicalize(&path).ok()]
        .into_iter()
        .flatten()
    {
        if let (Some(dir), Some(name)) = (p.parent(), p.file_name()) {
            names.insert(name.to_os_string());
            if !dirs.iter().any(|d: &PathBuf| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    let handler = move |res: DebounceEventResult| match res {
        Ok(events) => {
            // `..data` and friends: a Kubernetes ConfigMap volume swapping its contents.
            let ours = events.iter().any(|e| {
                e.path
                    .file_name()
                    .is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with(".."))
            });
            if ours {
                changed.notify_one();
            }
        }
        Err(e) => tracing::warn!(error = %e, "config file watch error"),
    };
    let mut debouncer = match new_debouncer(DEBOUNCE, handler) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(e) = debouncer.watcher().watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP");
        }
    }
    Some(debouncer)
}

// === comparing configs ===

/// Values are compared by their `Debug` text: every config type prints every field, and
/// this keeps the config module free of comparison code that would have to track each
/// new key.
fn same<T: fmt::Debug + ?Sized>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The config to run: `new`, with every key that needs a restart kept at its running value.
/// Returns it and the keys so kept.
fn effective(old: &Config, mut new: Config, store_open: bool) -> (Config, Vec<String>) {
    let mut restart = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:tt)+) => {
            if !same(&old.$($field)+, &new.$($field)+) {
                restart.push($key.to_owned());
                new.$($field)+ = old.$($field)+.clone();
            }
        };
    }
    keep!("listen", listen);
    keep!("admin.listen", admin.listen);
    keep!("admin.token_env", admin.token_env);
    keep!("storage.backend", storage.backend);
    keep!("storage.path", storage.path);
    keep!("storage.cache_size", storage.cache_size);
    keep!("storage.nats", storage.nats);
    keep!("limits.max_connections", limits.max_connections);
    keep!("limits.header_read_timeout", limits.header_read_timeout);
    keep!("limits.idle_timeout", limits.idle_timeout);
    keep!("limits.max_header_bytes", limits.max_header_bytes);
    keep!("limits.max_tunnels", limits.max_tunnels);
    if !store_open {
        let mut routes = Vec::with_capacity(new.routes.len());
        for r in std::mem::take(&mut new.routes) {
            if !r.deferrable {
                routes.push(r);
                continue;
            }
            restart.push(format!(
                "routes[{}].deferrable (storage opens at startup)",
                r.name
            ));
            if let Some(o) = old.route(&r.name) {
                routes.push(o.clone());
            }
        }
        new.routes = routes;
    }
    (new, restart)
}

/// Route by route and key by key, what differs between `old` and `new`.
fn diff(old: &Config, new: &Config) -> ReloadSummary {
    let mut s = ReloadSummary::default();
    for r in &new.routes {
        match old.route(&r.name) {
            None => s.added.push(r.name.clone()),
            Some(o) => {
                let keys = route_keys(o, r);
                if !keys.is_empty() {
                    s.changed.push((r.name.clone(), keys));
                }
            }
        }
    }
    for o in &old.routes {
        if new.route(&o.name).is_none() {
            s.removed.push(o.name.clone());
        }
    }
    let order = |c: &Config, other: &Config| -> Vec<String> {
        c.routes
            .iter()
            .filter(|r| other.route(&r.name).is_some())
            .map(|r| r.name.clone())
            .collect()
    };
    if order(old, new) != order(new, old) {
        s.settings.push("routes (order)");
    }
    macro_rules! setting {
        ($key:literal, $($field:tt)+) => {
            if !same(&old.$($field)+, &new.$($field)+) {
                s.settings.push($key);
            }
        };
    }
    setting!("unmatched", unmatched);
    setting!("egress", egress);
    setting!(
        "limits.max_requests_per_connection",
        limits.max_requests_per_connection
    );
    setting!("shutdown_grace", shutdown_grace);
    setting!("limits.max_body_bytes", limits.max_body_bytes);
    setting!("limits.body_read_timeout", limits.body_read_timeout);
    setting!("limits.tunnel_idle_timeout", limits.tunnel_idle_timeout);
    s
}

/// The keys of one route that differ.
fn route_keys(a: &RouteConfig, b: &RouteConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    macro_rules! key {
        ($name:literal, $field:ident) => {
            if !same(&a.$field, &b.$field) {
                keys.push($name);
            }
        };
    }
    key!("match", matcher);
    key!("upstream", upstream);
    key!("deferrable", deferrable);
    key!("timeout", timeout);
    key!("concurrency", concurrency);
    key!("rate_limit", rate_limit);
    key!("quotas", quotas);
    key!("retry", retry);
    key!("circuit_breaker", circuit_breaker);
    key!("idempotency", idempotency);
    key!("queue", queue);
    key!("ordering", ordering);
    key!("connect_ports", connect_ports);
    key!("allow_private", allow_private);
    // A key added to RouteConfig but not above still counts as a change.
    if keys.is_empty() && !same(a, b) {
        keys.push("other");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        crate::config::from_str(text, Path::new("test.yaml")).unwrap()
    }

    const BASE: &str = "
listen: 127.0.0.1:1000
admin: { listen: 127.0.0.1:1001 }
storage: { path: /tmp/a.redb }
routes:
  - name: a
    match: { path_prefix: /a }
    upstream: http://127.0.0.1:9000
  - name: b
    match: { path_prefix: /b }
    upstream: http://127.0.0.1:9000
    deferrable: true
";

    #[test]
    fn blank_files_are_told_apart_from_configs() {
        assert!(is_blank(""));
        assert!(is_blank("\n  \n# only a comment\n   # another\n"));
        assert!(!is_blank("# a comment\nroutes: []\n"));
    }

    #[test]
    fn same_file_is_an_empty_summary() {
        let (c, restart) = effective(&cfg(BASE), cfg(BASE), true);
        assert!(restart.is_empty());
        assert!(diff(&cfg(BASE), &c).is_empty());
    }

    #[test]
    fn routes_added_removed_and_changed_are_named_with_their_keys() {
        let new = BASE.replace("  - name: a\n", "  - name: c\n").replace(
            "deferrable: true",
            "deferrable: true\n    rate_limit: { per_second: 5, burst: 5 }",
        );
        let (c, restart) = effective(&cfg(BASE), cfg(&new), true);
        assert!(restart.is_empty());
        let s = diff(&cfg(BASE), &c);
        assert_eq!(s.added, ["c"]);
        assert_eq!(s.removed, ["a"]);
        assert_eq!(s.changed, [("b".to_owned(), vec!["rate_limit"])]);
        assert!(s.settings.is_empty());
    }

    #[test]
    fn listener_and_storage_keys_need_a_restart_and_keep_their_running_value() {
        let new = BASE
            .replace("127.0.0.1:1000", "127.0.0.1:2000")
            .replace("/tmp/a.redb", "/tmp/b.redb")
            .replace(
                "storage:",
                "limits: { max_connections: 7, max_body_bytes: 10KiB }\nstorage:",
            );
        let old = cfg(BASE);
        let (c, restart) = effective(&old, cfg(&new), true);
        assert_eq!(
            restart,
            ["listen", "storage.path", "limits.max_connections"]
        );
        assert_eq!(c.listen, old.listen);
        assert_eq!(c.storage.path, old.storage.path);
        assert_eq!(c.limits.max_connections, old.limits.max_connections);
        // The rest of the reload applies.
        assert_eq!(c.limits.max_body_bytes, 10 * 1024);
        assert_eq!(diff(&old, &c).settings, ["limits.max_body_bytes"]);
    }

    #[test]
    fn a_route_made_deferrable_without_a_store_keeps_its_old_definition() {
        let old_text = BASE.replace("    deferrable: true\n", "");
        let new = BASE.replace(
            "routes:",
            "routes:\n  - name: n\n    match: { path_prefix: /n }\n    upstream: http://127.0.0.1:9\n    deferrable: true",
        );
        let old = cfg(&old_text);
        let (c, restart) = effective(&old, cfg(&new), false);
        assert_eq!(
            restart,
            [
                "routes[n].deferrable (storage opens at startup)",
                "routes[b].deferrable (storage opens at startup)"
            ]
        );
        assert!(c.routes.iter().all(|r| !r.deferrable));
        assert_eq!(
            c.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(diff(&old, &c).is_empty());
    }

    #[test]
    fn reordered_routes_are_a_change() {
        let swapped = "
listen: 127.0.0.1:1000
admin: { listen: 127.0.0.1:1001 }
storage: { path: /tmp/a.redb }
routes:
  - name: b
    match: { path_prefix: /b }
    upstream: http://127.0.0.1:9000
    deferrable: true
  - name: a
    match: { path_prefix: /a }
    upstream: http://127.0.0.1:9000
";
        let s = diff(&cfg(BASE), &cfg(swapped));
        assert_eq!(s.settings, ["routes (order)"]);
        assert!(s.changed.is_empty());
    }
}
