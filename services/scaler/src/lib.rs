//! The taskbus scaler: turns each pool's queue lag into the numbers autoscalers need.
//!
//! A scaler replica runs, under one shutdown token:
//! - a **pools watcher** following the `taskbus_pools` KV bucket;
//! - the **refresh loop** ([`collector`]) reading every pool's work consumer each
//!   `refresh_interval` (default 250 ms) and recomputing its lag ([`lag`] documents the figures
//!   and the desired-replicas formula);
//! - the **KEDA External Scaler** gRPC service ([`grpc`]);
//! - one HTTP server with `/healthz`, `/readyz`, `/metrics` (Prometheus, every figure per pool),
//!   the **Kubernetes external metrics API** ([`extapi`]) and `/v1/lag` (JSON);
//! - a follower of agent heartbeats ([`agents`]) counting each pool's live agents;
//! - optionally **direct mode** ([`direct`]), patching Deployment scale subresources.
//!
//! Both listeners may serve TLS ([`tls`]); the simulator ([`simulate`]) replays arrival traces
//! through the same policy code.
//!
//! The scaler keeps no state that matters across restarts or between replicas: every replica
//! reads the same consumers and computes the same figures.

pub mod agents;
pub mod collector;
pub mod direct;
pub mod extapi;
pub mod freeze;
pub mod grpc;
pub mod lag;
pub mod metrics;
pub mod policy;
pub mod simulate;
pub mod state;
pub mod tls;

/// Code generated from `proto/externalscaler.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("externalscaler");
}

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use taskbus_proto::streams::StreamOptions;
use taskbus_proto::Subjects;
use taskbus_runtime::{CancellationToken, TaskTracker};
use tracing::info;

pub use direct::DirectConfig;
pub use policy::DirectPolicy;

/// Scaler settings (the binary fills them from flags and `TASKBUS_*` variables).
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// NATS credentials and TLS settings.
    pub nats_auth: taskbus_runtime::nats::NatsAuth,
    pub prefix: String,
    pub streams: StreamOptions,
    /// KEDA External Scaler gRPC address (port 0 picks one).
    pub grpc_listen: SocketAddr,
    /// Serve gRPC over TLS with these PEM files (KEDA trigger metadata `caCert` then names the
    /// CA); `None` = plaintext h2c.
    pub grpc_tls: Option<tls::TlsFiles>,
    /// `/healthz`, `/readyz`, `/metrics`, the external metrics API and `/v1/lag`.
    pub http_listen: SocketAddr,
    /// Serve HTTPS with these PEM files (needed behind the Kubernetes API aggregator);
    /// `None` = plain HTTP.
    pub http_tls: Option<tls::TlsFiles>,
    /// How often every pool's consumer is read.
    pub refresh_interval: Duration,
    /// Time constant of the smoothed rates.
    pub smoothing: Duration,
    /// Service time assumed until one is measured.
    pub default_service_time: Duration,
    /// Direct mode; `None` = publish metrics only (KEDA or HPA scale).
    pub direct: Option<DirectConfig>,
}

impl Config {
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_auth: Default::default(),
            prefix: taskbus_proto::subjects::DEFAULT_PREFIX.into(),
            streams: StreamOptions::default(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_tls: None,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_tls: None,
            refresh_interval: Duration::from_millis(250),
            smoothing: Duration::from_secs(10),
            default_service_time: Duration::from_secs(1),
            direct: None,
        }
    }
}

/// Errors that stop the scaler from starting.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error(transparent)]
    Nats(#[from] taskbus_runtime::nats::NatsError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("refresh interval must be between 10 ms and 60 s, got {0:?}")]
    RefreshInterval(Duration),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "direct mode: cannot create a Kubernetes client (in-cluster config or kubeconfig): {0}"
    )]
    Kube(#[source] kube::Error),
}

impl ScalerError {
    pub(crate) fn js(e: impl std::fmt::Display) -> Self {
        ScalerError::JetStream(e.to_string())
    }
}

/// A started scaler; [`Running::wait`] returns once everything has stopped.
pub struct Running {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
}

impl Running {
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
}

/// Connect, load the pools, bind both listeners and start every loop. Returns once the scaler
/// serves (its first refresh round is done).
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, ScalerError> {
    if config.refresh_interval < Duration::from_millis(10)
        || config.refresh_interval > Duration::from_secs(60)
    {
        return Err(ScalerError::RefreshInterval(config.refresh_interval));
    }
    let tls_acceptor = config.http_tls.as_ref().map(tls::acceptor).transpose()?;
    let mut grpc_builder = match &config.grpc_tls {
        Some(files) => tonic::transport::Server::builder()
            .tls_config(tls::grpc_config(files)?)
            .map_err(|e| tls::TlsError::Grpc(e.to_string()))?,
        None => tonic::transport::Server::builder(),
    };
    let subjects = Subjects::new(&config.prefix);
    let client =
        taskbus_runtime::nats::connect(&config.nats_url, &config.nats_auth, "taskbus-scaler")
            .await?;
    let js = jetstream::new(client.clone());
    taskbus_runtime::nats::ensure_streams(&js, &subjects, &config.streams).await?;
    let kv = taskbus_runtime::nats::pools_bucket(&js, &subjects, config.streams.replicas).await?;

    let metrics = metrics::Metrics::default();
    let health = taskbus_runtime::http::Health::new(metrics.registry());
    let shared = state::Shared::new(metrics);
    collector::load_pools(&kv, &shared).await?;

    let kube_client = match &config.direct {
        Some(d) => Some(match &d.client {
            Some(c) => c.clone(),
            None => kube::Client::try_default()
                .await
                .map_err(ScalerError::Kube)?,
        }),
        None => None,
    };

    let (grpc_listener, grpc_addr) = taskbus_runtime::http::bind(config.grpc_listen)
        .await
        .map_err(|source| ScalerError::Listen {
            what: "gRPC",
            addr: config.grpc_listen,
            source,
        })?;
    let (http_listener, http_addr) = taskbus_runtime::http::bind(config.http_listen)
        .await
        .map_err(|source| ScalerError::Listen {
            what: "HTTP",
            addr: config.http_listen,
            source,
        })?;

    let tracker = TaskTracker::new();
    let first_round = shared.subscribe();
    tracker.spawn(agents::follow(
        client,
        subjects.clone(),
        shared.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(collector::watch_pools(kv, shared.clone(), shutdown.clone()));
    tracker.spawn(collector::refresh_loop(
        js,
        subjects,
        shared.clone(),
        collector::RefreshConfig {
            interval: config.refresh_interval,
            smoothing: config.smoothing,
            default_service_time: config.default_service_time,
        },
        health.clone(),
        shutdown.clone(),
    ));

    let svc = pb::external_scaler_server::ExternalScalerServer::new(grpc::Scaler::new(
        shared.clone(),
        shutdown.clone(),
    ));
    let sd = shutdown.clone();
    tracker.spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
        if let Err(e) = grpc_builder
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, sd.cancelled())
            .await
        {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });

    let app = taskbus_runtime::http::router(health.clone()).merge(extapi::router(shared.clone()));
    let sd = shutdown.clone();
    match tls_acceptor {
        Some(acceptor) => {
            tracker.spawn(tls::serve(
                http_listener,
                app,
                acceptor,
                tracker.clone(),
                sd,
            ));
        }
        None => {
            tracker.spawn(async move {
                if let Err(e) = taskbus_runtime::http::serve(http_listener, app, sd).await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            });
        }
    }

    if let (Some(client), Some(d)) = (kube_client, config.direct.clone()) {
        info!(namespace = %d.namespace, "direct mode: scaling Deployments");
        tracker.spawn(direct::run(client, d, shared.clone(), shutdown.clone()));
    }
    tracker.close();

    // Ready once the first refresh round has published figures for every pool.
    let mut rx = first_round;
    tokio::select! {
        _ = rx.changed() => {}
        _ = shutdown.cancelled() => {}
    }
    health.set_ready(true);
    info!(grpc = %grpc_addr, http = %http_addr, tls = config.http_tls.is_some(), "scaler ready");
    Ok(Running {
        tracker,
        shutdown,
        grpc_addr,
        http_addr,
    })
}

/// Start and run until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ScalerError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
