//! `App::build` binds every listener (port 0 allowed) and runs until told to stop;
//! `report_listeners` prints what it bound; `shutdown` drains within `shutdown_grace`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::client::HttpClient;
use crate::config::Config;
use crate::proxy::defer::now_ms;
use crate::proxy::server;
use crate::queue::{JobStore, RedbStore};
use crate::reload::Runtime;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up TLS for upstreams: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the admin listener {addr} is reachable beyond loopback, so the token variable {var} must be set and non-empty")]
    AdminToken { addr: SocketAddr, var: String },
    #[cfg_attr(
        not(feature = "nats"),
        error("storage backend `nats` is not available in this build (built without the `nats` feature); use `redb`")
    )]
    #[cfg_attr(feature = "nats", error("storage backend `nats` needs storage.url"))]
    BackendUnavailable,
    #[error("cannot open the job store: {0}")]
    Store(#[from] crate::queue::StoreError),
    #[error("storage.encryption: {0}")]
    EncryptionKey(#[from] crate::queue::crypt::KeyError),
}

/// The JetStream store for the deferrable routes; see `queue::nats`.
#[cfg(feature = "nats")]
async fn open_nats(
    config: &Config,
    deferrable: &[Arc<crate::config::RouteConfig>],
) -> Result<Arc<dyn JobStore>, AppError> {
    let nats = config
        .storage
        .nats
        .as_ref()
        .ok_or(AppError::BackendUnavailable)?;
    let opts = crate::queue::NatsOptions {
        routes: deferrable.iter().map(|r| r.name.clone()).collect(),
        dedupe_window: deferrable
            .iter()
            .map(|r| r.idempotency.dedupe_window)
            .max()
            .unwrap_or_default(),
    };
    Ok(Arc::new(crate::queue::NatsStore::open(nats, opts).await?))
}

#[cfg(not(feature = "nats"))]
async fn open_nats(
    _config: &Config,
    _deferrable: &[Arc<crate::config::RouteConfig>],
) -> Result<Arc<dyn JobStore>, AppError> {
    Err(AppError::BackendUnavailable)
}

pub struct App {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The config the admin API shows; a reload sends the new one here.
    ready: Readiness,
    stop: CancellationToken,
    proxy_task: JoinHandle<hyper_util::server::graceful::GracefulShutdown>,
    admin_task: JoinHandle<()>,
    tasks: TaskTracker,
    runtime: Arc<Runtime>,
}

/// One machine-readable line per bound listener on stdout, so tests and scripts learn
/// the real port when the config says `:0`.
fn report(name: &str, addr: SocketAddr) {
    println!(
        "{}",
        serde_json::json!({ "event": "listening", "name": name, "addr": addr.to_string() })
    );
}

impl App {
    /// What a config reload replaces, and the accessors the admin API reads.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Prints the listening lines; the binary calls it once it is ready to be driven
    /// (signal handlers installed).
    pub fn report_listeners(&self) {
        report("proxy", self.proxy_addr);
        report("admin", self.admin_addr);
    }

    pub async fn build(config: Config) -> Result<App, AppError> {
        if !config.admin.listen.ip().is_loopback() {
            let var = config.admin.token_env.clone().unwrap_or_default();
            if std::env::var(&var).map_or(true, |v| v.is_empty()) {
                return Err(AppError::AdminToken {
                    addr: config.admin.listen,
                    var,
                });
            }
        }
        let client = HttpClient::new()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();

        // Storage opens (and recovers in-flight jobs) before anything listens, so
        // readiness never reports a proxy that cannot keep its 202 promise.
        let deferrable: Vec<_> = config
            .routes
            .iter()
            .filter(|r| r.deferrable)
            .cloned()
            .collect();
        let store: Option<Arc<dyn JobStore>> = if deferrable.is_empty() {
            None
        } else if config.storage.backend == crate::config::StorageBackend::Nats {
            Some(open_nats(&config, &deferrable).await?)
        } else {
            let path = config.storage.path.clone();
            let cache = usize::try_from(config.storage.cache_size).unwrap_or(usize::MAX);
            let sealer = match &config.storage.encryption {
                Some(e) => Some(Arc::new(crate::queue::crypt::Sealer::load(e)?)),
                None => None,
            };
            let store =
                tokio::task::spawn_blocking(move || RedbStore::open_sealed(&path, cache, sealer))
                    .await
                    .map_err(|e| crate::queue::StoreError::Unavailable(e.to_string()))??;
            Some(Arc::new(store))
        };

        // The backlog holds clients waiting for a connection slot; the default (128) is
        // small next to `limits.max_connections` (the kernel caps it at somaxconn).
        let backlog = u32::try_from(config.limits.max_connections)
            .unwrap_or(u32::MAX)
            .max(128);
        let bind = |name: &'static str, addr: SocketAddr| async move {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            };
            socket
                .and_then(|s| {
                    // As std's bind does, so a restart can take the port at once.
                    s.set_reuseaddr(true)?;
                    s.bind(addr)?;
                    s.listen(backlog)
                })
                .map_err(|source| AppError::Bind { name, addr, source })
        };
        let proxy_listener = bind("proxy", config.listen).await?;
        let admin_listener = bind("admin", config.admin.listen).await?;
        let proxy_addr = proxy_listener
            .local_addr()
            .map_err(|source| AppError::Bind {
                name: "proxy",
                addr: config.listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| AppError::Bind {
                name: "admin",
                addr: config.admin.listen,
                source,
            })?;

        let ready = Readiness::default();
        let runtime = Runtime::start(
            config.clone(),
            client,
            store.clone(),
            format!("http://{admin_addr}"),
            stop.clone(),
            tasks.clone(),
            Arc::new(crate::metrics::Metrics::new()),
        );
        let proxy = runtime.proxy().clone();
        let proxy_task = tokio::spawn(server::serve(
            proxy_listener,
            proxy.clone(),
            config.limits.clone(),
            stop.clone(),
        ));
        let admin_stop = stop.clone();
        let router = admin::router(admin::AdminState {
            ready: ready.clone(),
            runtime: runtime.clone(),
            auth: admin::Auth::from_env(&config.admin),
        });
        let admin_task = tokio::spawn(async move {
            let serve = axum::serve(admin_listener, router)
                .with_graceful_shutdown(async move { admin_stop.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });

        if let Some(store) = &store {
            tasks.spawn(purge(store.clone(), stop.clone()));
        }

        // Ready before the listeners are reported: whoever reads the report may probe
        // /readyz at once.
        ready.set(true);
        tracing::info!(%proxy_addr, %admin_addr, routes = ?proxy.route_names(), "spillway started");
        Ok(App {
            proxy_addr,
            admin_addr,
            ready,
            stop,
            proxy_task,
            admin_task,
            tasks,
            runtime,
        })
    }

    /// Stops accepting, reports not ready, lets in-flight requests finish within the
    /// grace period. Returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.ready.set(false);
        self.stop.cancel();
        let graceful = match self.proxy_task.await {
            Ok(g) => g,
            Err(_) => return false,
        };
        // Dispatchers stop leasing at once; attempts already sent may finish in the grace
        // period. One cut short stays in_flight on disk and is delivered after restart.
        self.tasks.close();
        let tasks = self.tasks;
        // Read now: a reload may have changed it.
        let grace = self.runtime.config().shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            graceful.shutdown().await;
            tasks.wait().await;
        })
        .await
        .is_ok();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin_task).await;
        if drained {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!(?grace, "shutdown grace ran out with requests in flight");
        }
        drained
    }
}

/// Removes delivered jobs and idempotency keys past their window, in small batches so
/// accepts never wait behind one long transaction.
async fn purge(store: Arc<dyn JobStore>, stop: CancellationToken) {
    loop {
        match store.purge_expired(now_ms(), 500).await {
            Ok(n) if n >= 500 => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purge of expired jobs failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
