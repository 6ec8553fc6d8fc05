//! `/healthz`, `/readyz` and `/metrics` (Prometheus text) for every service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Shared health state: services flip `ready` once their dependencies are up; with
/// [`Health::watch_nats`] readiness also follows the NATS connection.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    nats: Arc<OnceLock<async_nats::Client>>,
    registry: Arc<Mutex<Registry>>,
}

impl Health {
    pub fn new(registry: Registry) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            nats: Arc::default(),
            registry: Arc::new(Mutex::new(registry)),
        }
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    /// Report not ready while `client` is disconnected (it reconnects by itself; readiness
    /// comes back with it). The first client given is the one watched.
    pub fn watch_nats(&self, client: &async_nats::Client) {
        let _ = self.nats.set(client.clone());
    }
    /// Whether the NATS connection, if watched, is up.
    pub fn nats_connected(&self) -> bool {
        self.nats
            .get()
            .is_none_or(|c| c.connection_state() == async_nats::connection::State::Connected)
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.nats_connected()
    }
    /// Register more metrics after construction.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut guard = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
    /// Render the registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let guard = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &guard).is_err() {
            out.clear();
        }
        out
    }
}

/// The health/metrics router; services may merge their own routes into it.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if !h.nats_connected() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the NATS connection is down (reconnecting)\n",
        )
    } else if h.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.render(),
    )
}

/// Bind `addr` (port 0 picks a free port) and return the listener and its real address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Serve `app` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Bind `addr` and serve the health/metrics router on `tracker` until `shutdown`; returns the
/// bound address. The one way every service starts its health server.
pub async fn spawn_health(
    tracker: &tokio_util::task::TaskTracker,
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let (listener, bound) = bind(addr).await?;
    let app = router(health);
    tracker.spawn(async move {
        if let Err(e) = serve(listener, app, shutdown).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    Ok(bound)
}
