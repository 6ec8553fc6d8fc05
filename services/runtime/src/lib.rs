//! Plumbing every taskbus service shares: the shutdown token, signal handling, telemetry, the
//! health/metrics HTTP server, NATS and PostgreSQL connections, stream setup, and the dev
//! servers (`nats-server`, PostgreSQL) that `taskbus dev` and the test harness start.

/// Every taskbus binary links this crate, so this sets their allocator: mimalloc instead of
/// the system's. The services allocate a little for every message (subjects, headers, JSON);
/// glibc's malloc and free took about a sixth of the CPU of `taskbus bench` at 2,000 tasks/s,
/// and the bench process used 7% less CPU with mimalloc (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod db;
pub mod devservers;
pub mod http;
pub mod nats;
pub mod telemetry;

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Cancel `token` on SIGTERM or SIGINT (Ctrl-C). Returns when the signal arrived or the token
/// was cancelled some other way.
pub async fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install SIGTERM handler");
                token.cancelled().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received, shutting down"),
            _ = token.cancelled() => return,
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = token.cancelled() => return,
    }
    token.cancel();
}
