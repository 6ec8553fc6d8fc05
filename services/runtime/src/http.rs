//! `/healthz`, `/readyz` and `/metrics` (Prometheus text) for every service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Shared health state: services flip `ready` once their dependencies are up.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    registry: Arc<Mutex<Registry>>,
}

impl Health {
    pub fn new(registry: Registry) -> Self {
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            registry: Arc::new(Mutex::new(registry)),
        }
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
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
    if h.is_ready() {
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
