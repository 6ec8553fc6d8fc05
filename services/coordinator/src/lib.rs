//! The taskbus coordinator: admits, validates, routes and tracks tasks.
//!
//! A coordinator replica runs these loops, all under one shutdown token:
//! - **admission** ([`admission`]): pulls raw producer messages from `TASKBUS_SUBMIT` in
//!   batches, validates each, records the batch in PostgreSQL with one statement, puts the admitted
//!   tasks on `taskbus.work.<pool>.<priority>` and the refused ones on the events stream as
//!   `rejected`, then acks the batch;
//! - **outcomes** ([`outcomes`]): pulls `succeeded`/`failed` events from `TASKBUS_EVENTS` and
//!   records them with guarded, batched updates (requeueing failed attempts while attempts
//!   remain, else `dead`);
//! - **started** tracking from the core-NATS `started` events (best effort, batched);
//! - **maintenance**: deadlines (`expired`), overdue attempts (`timed_out`), the dispatch
//!   outbox (attempts whose work message was never confirmed are re-sent), queued tasks whose
//!   work message the work stream lost (`lost.rs`, re-sent) and, when a [`retention`] is set,
//!   deleting the records of tasks finished long enough ago;
//! - the agent **registry** (heartbeats) and reputation (EWMA per agent, published to KV);
//! - **schedules** (`schedules.rs`): recurring tasks from the `taskbus_schedules` KV bucket,
//!   submitted at each cron tick under a per-tick id, so every replica may fire every tick
//!   and each tick still runs once;
//! - the **API** ([`api`]): a NATS services-framework service (`taskbus-coordinator`) answering
//!   `taskbus.api.task.get`, `tasks.list`, `task.cancel`, `dlq.replay` and `agents.list`.
//!
//! Any number of replicas may run against one NATS and one PostgreSQL: they share the durable
//! consumers, and every database write is idempotent and guarded.

pub mod admission;
pub mod api;
mod dispatch;
mod fairness;
mod flush;
pub mod lost;
mod maintenance;
pub mod metrics;
pub mod outcomes;
mod pipeline;
pub mod pools;
mod registry;
pub mod retention;
mod schedules;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use taskbus_proto::streams::StreamOptions;
use taskbus_proto::{Limits, Subjects};
use taskbus_runtime::{CancellationToken, TaskTracker};
use tracing::info;

/// Coordinator settings (the binary fills them from flags and `TASKBUS_*` variables).
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// NATS credentials and TLS settings.
    pub nats_auth: taskbus_runtime::nats::NatsAuth,
    pub database_url: String,
    pub prefix: String,
    /// Pools created (with default settings) at start when missing.
    pub ensure_pools: Vec<String>,
    pub limits: Limits,
    pub streams: StreamOptions,
    /// Most messages handled in one batch (one SQL statement, one ack round).
    pub batch_size: usize,
    /// Admission batches in progress at once (each holds one database connection while it
    /// writes; admission has this many connections of its own, besides `db_max_connections`);
    /// 1 handles one batch after the other.
    pub admission_pipeline: usize,
    pub db_max_connections: u32,
    /// `/healthz`, `/readyz`, `/metrics`; `None` serves nothing.
    pub http_listen: Option<SocketAddr>,
    /// Publish the informational `admitted` event on core NATS.
    pub publish_admitted: bool,
    /// How long before the oldest message of its work band a queued task must have been handed
    /// out for the coordinator to decide that its work message is lost and send it again
    /// (default 3 minutes; see `lost.rs`). Longer than any clock difference between the
    /// coordinator's PostgreSQL and nats-server; the command line takes at least 30 s.
    pub lost_work_after: Duration,
    /// How long finished tasks keep their record (default: forever); see [`retention`].
    pub retention: retention::Retention,
}

impl Config {
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_auth: Default::default(),
            database_url: database_url.into(),
            prefix: taskbus_proto::subjects::DEFAULT_PREFIX.into(),
            ensure_pools: vec!["default".into()],
            limits: Limits::default(),
            streams: StreamOptions::default(),
            batch_size: 500,
            admission_pipeline: 3,
            db_max_connections: 8,
            http_listen: None,
            publish_admitted: true,
            lost_work_after: Duration::from_secs(180),
            retention: retention::Retention::default(),
        }
    }
}

/// Errors that stop the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Nats(#[from] taskbus_runtime::nats::NatsError),
    #[error(transparent)]
    Db(#[from] taskbus_runtime::db::DbError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("pool settings: {0}")]
    Pools(String),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("configuration: {0}")]
    Config(String),
}

impl CoordinatorError {
    pub(crate) fn js(e: impl std::fmt::Display) -> Self {
        CoordinatorError::JetStream(e.to_string())
    }
}

/// Shared state of one replica.
pub(crate) struct Ctx {
    pub subjects: Subjects,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub db: sqlx::PgPool,
    /// Admission's inserts: their own connections (never queued behind other statements),
    /// with cached plans (see [`taskbus_runtime::db::Plans::Cached`]) and asynchronous commit,
    /// made durable through [`Ctx::wal_flush`] before the submit messages are acked.
    pub db_admit: sqlx::PgPool,
    pub(crate) wal_flush: flush::WalFlush,
    pub pools: pools::Pools,
    pub limits: Limits,
    pub metrics: metrics::Metrics,
    pub(crate) registry: registry::Registry,
    pub batch_size: usize,
    pub admission_pipeline: usize,
    pub publish_admitted: bool,
    pub retention: retention::Retention,
    pub lost_work_after: Duration,
    /// How far the outcome consumer has got (the `started` writer waits for it).
    pub(crate) outcome_progress: outcomes::Progress,
    /// `started` events waiting to be written.
    pub(crate) pending_starts: outcomes::PendingStarts,
}

/// A started coordinator; [`Running::wait`] returns once every loop has stopped.
pub struct Running {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The bound health/metrics address, when serving.
    pub http_addr: Option<SocketAddr>,
}

impl Running {
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
}

/// Connect, migrate, create streams and consumers, then start the loops. Returns when the
/// coordinator is ready (its API answers and its consumers exist).
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Running, CoordinatorError> {
    if let Some(keep) = config.retention.shortest() {
        if keep < config.streams.duplicate_window {
            return Err(CoordinatorError::Config(format!(
                "a retention of {:?} is shorter than JetStream's duplicate window of {:?}: a task \
                 submitted again after its record was deleted could have its work message \
                 dropped as a duplicate; keep records at least that long",
                keep, config.streams.duplicate_window
            )));
        }
    }
    let subjects = Subjects::new(&config.prefix);
    let client =
        taskbus_runtime::nats::connect(&config.nats_url, &config.nats_auth, "taskbus-coordinator")
            .await?;
    let js = jetstream::new(client.clone());
    taskbus_runtime::nats::ensure_streams(&js, &subjects, &config.streams).await?;
    let db =
        taskbus_runtime::db::connect_and_migrate(&config.database_url, config.db_max_connections)
            .await?;
    store::start_incarnation(&db).await?;
    let db_admit = taskbus_runtime::db::connect_with(
        &config.database_url,
        config.admission_pipeline.max(1) as u32,
        taskbus_runtime::db::Plans::Cached,
        taskbus_runtime::db::Commit::Deferred,
    )
    .await?;

    let metrics = metrics::Metrics::default();
    let health = taskbus_runtime::http::Health::new(metrics.registry());
    health.watch_nats(&client);

    let tracker = TaskTracker::new();
    let kv = taskbus_runtime::nats::pools_bucket(&js, &subjects, config.streams.replicas).await?;
    let pools = pools::Pools::load(kv, js.clone(), subjects.clone(), &config.ensure_pools).await?;
    let schedules_kv =
        taskbus_runtime::nats::schedules_bucket(&js, &subjects, config.streams.replicas).await?;
    let registry =
        registry::Registry::new(&js, subjects.reputation_bucket(), config.streams.replicas).await?;

    let ctx = Arc::new(Ctx {
        subjects,
        js,
        client,
        db,
        db_admit,
        wal_flush: flush::WalFlush::default(),
        pools: pools.clone(),
        limits: config.limits.clone(),
        metrics,
        registry,
        batch_size: config.batch_size.max(1),
        admission_pipeline: config.admission_pipeline.max(1),
        publish_admitted: config.publish_admitted,
        retention: config.retention,
        lost_work_after: config.lost_work_after,
        outcome_progress: outcomes::Progress::default(),
        pending_starts: outcomes::PendingStarts::default(),
    });

    let submit = admission::consumer(&ctx).await?;
    let outcome = outcomes::consumer(&ctx).await?;
    let started = outcomes::started_subscription(&ctx).await?;
    let service = api::start(&ctx).await?;
    let heartbeats = registry::heartbeat_subscription(&ctx).await?;

    tracker.spawn(pools.watch(shutdown.clone()));
    tracker.spawn(admission::run(ctx.clone(), submit, shutdown.clone()));
    tracker.spawn(outcomes::run(ctx.clone(), outcome, shutdown.clone()));
    tracker.spawn(outcomes::run_started(
        ctx.clone(),
        started,
        shutdown.clone(),
    ));
    tracker.spawn(api::run(ctx.clone(), service, shutdown.clone()));
    tracker.spawn(registry::run_heartbeats(
        ctx.clone(),
        heartbeats,
        shutdown.clone(),
    ));
    tracker.spawn(maintenance::run(ctx.clone(), shutdown.clone()));
    tracker.spawn(schedules::run(ctx.clone(), schedules_kv, shutdown.clone()));

    let mut http_addr = None;
    if let Some(addr) = config.http_listen {
        let bound =
            taskbus_runtime::http::spawn_health(&tracker, addr, health.clone(), shutdown.clone())
                .await
                .map_err(|source| CoordinatorError::Http { addr, source })?;
        http_addr = Some(bound);
    }
    tracker.close();
    health.set_ready(true);
    info!(http = ?http_addr, "coordinator ready");
    Ok(Running {
        tracker,
        shutdown,
        http_addr,
    })
}

/// Start and run until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), CoordinatorError> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Back-off used by loops after a transient error (NATS or PostgreSQL briefly away).
pub(crate) async fn pause(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}
