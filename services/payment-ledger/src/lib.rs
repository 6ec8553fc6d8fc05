//! The taskbus payment ledger: double-entry accounts in PostgreSQL, two-phase holds for priced
//! tasks, reputation-scaled payouts, exactly once.
//!
//! A ledger replica runs two loops under one shutdown token:
//! - the **API** ([`service`]): a NATS services-framework service (`taskbus-ledger`) with the
//!   coordinator's batch `hold` endpoint and the operator endpoints (deposit, withdraw, balance,
//!   statement, transfers, accounts, audit), see [`api`];
//! - **settlement** ([`settle`]): a durable consumer of the coordinator's `closed` and
//!   `rejected` events (and `held`, when rebuilding from the stream) on
//!   `TASKBUS_EVENTS` that posts or voids holds in batches (one transaction per batch) and
//!   publishes `settled`.
//!
//! The money logic lives in [`store::Ledger`], usable without NATS (tests, benchmarks,
//! `taskbus dev`). Any number of replicas may run against one NATS and one PostgreSQL: they
//! share the durable consumer, and every write is idempotent and guarded by row locks taken in
//! one order. docs/LEDGER.md explains the model, the formula and the guarantees.

pub mod api;
pub mod audit;
pub mod metrics;
pub mod money;
pub mod service;
pub mod settle;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use taskbus_proto::streams::StreamOptions;
use taskbus_proto::Subjects;
use taskbus_runtime::{CancellationToken, TaskTracker};
use tracing::info;

pub use store::{HoldInput, HoldOutcome, Ledger, LedgerOptions, Resolution, TaskResolution};

/// Ledger service settings (the binary fills them from flags and `TASKBUS_*` variables).
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// NATS credentials and TLS settings.
    pub nats_auth: taskbus_runtime::nats::NatsAuth,
    pub database_url: String,
    pub prefix: String,
    pub streams: StreamOptions,
    pub db_max_connections: u32,
    /// `/healthz`, `/readyz`, `/metrics`; `None` serves nothing.
    pub http_listen: Option<SocketAddr>,
    pub ledger: LedgerOptions,
    /// Most events settled in one transaction.
    pub batch_size: usize,
    /// Durable consumer name on the events stream (shared by every replica).
    pub consumer: String,
    /// How long an unacknowledged event waits before redelivery (set when the consumer is
    /// created).
    pub ack_wait: Duration,
    /// API requests handled at once.
    pub api_concurrency: usize,
    /// Also read `held` events and re-apply their holds: for a ledger rebuilding its database
    /// from the events stream (with a fresh consumer). A live ledger made its holds itself
    /// and leaves them out (set when the consumer is created).
    pub replay_held: bool,
    /// Hourly spend per currency exported for the `TaskbusSpendOverBudget` alert.
    pub spend_budgets: Vec<money::SpendBudget>,
}

impl Config {
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_auth: Default::default(),
            database_url: database_url.into(),
            prefix: taskbus_proto::subjects::DEFAULT_PREFIX.into(),
            streams: StreamOptions::default(),
            db_max_connections: 8,
            http_listen: None,
            ledger: LedgerOptions::default(),
            batch_size: 2000,
            consumer: "ledger".into(),
            ack_wait: Duration::from_secs(10),
            api_concurrency: 8,
            replay_held: false,
            spend_budgets: Vec::new(),
        }
    }
}

/// Errors that stop the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Nats(#[from] taskbus_runtime::nats::NatsError),
    #[error(transparent)]
    Db(#[from] taskbus_runtime::db::DbError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl LedgerError {
    pub(crate) fn js(e: impl std::fmt::Display) -> Self {
        LedgerError::JetStream(e.to_string())
    }
}

/// Shared state of one replica.
pub(crate) struct Ctx {
    pub subjects: Subjects,
    pub js: jetstream::Context,
    pub ledger: Ledger,
    pub metrics: metrics::Metrics,
    pub batch_size: usize,
    pub api_concurrency: usize,
    pub replay_held: bool,
}

/// A started ledger; [`Running::wait`] returns once every loop has stopped.
pub struct Running {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    ledger: Ledger,
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
    /// The ledger itself, e.g. to fund a demo payer in `taskbus dev`.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

/// Connect, migrate, open the ledger, create the consumer and the API, then start the loops.
/// Returns when the ledger is ready (its API answers and its consumer exists).
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, LedgerError> {
    money::check_budgets(&config.spend_budgets, &config.ledger.currencies)
        .map_err(LedgerError::Config)?;
    let subjects = Subjects::new(&config.prefix);
    let client =
        taskbus_runtime::nats::connect(&config.nats_url, &config.nats_auth, "taskbus-ledger")
            .await?;
    let js = jetstream::new(client.clone());
    taskbus_runtime::nats::ensure_streams(&js, &subjects, &config.streams).await?;
    let db =
        taskbus_runtime::db::connect_and_migrate(&config.database_url, config.db_max_connections)
            .await?;
    let ledger = Ledger::open(db, &config.ledger).await?;

    let metrics = metrics::Metrics::default();
    for b in &config.spend_budgets {
        let v = rust_decimal::prelude::ToPrimitive::to_f64(&b.per_hour).unwrap_or(f64::MAX);
        metrics
            .spend_budget
            .get_or_create(&b.currency.as_str().into())
            .set(v);
    }
    let health = taskbus_runtime::http::Health::new(metrics.registry());
    health.watch_nats(&client);

    let ctx = Arc::new(Ctx {
        subjects,
        js,
        ledger: ledger.clone(),
        metrics,
        batch_size: config.batch_size.max(1),
        api_concurrency: config.api_concurrency.max(1),
        replay_held: config.replay_held,
    });
    let consumer = settle::consumer(&ctx, &config.consumer, config.ack_wait).await?;
    let endpoints = service::start(&ctx, &client).await?;

    let tracker = TaskTracker::new();
    tracker.spawn(settle::run(
        ctx.clone(),
        consumer,
        config.ack_wait,
        shutdown.clone(),
    ));
    tracker.spawn(service::run(ctx.clone(), endpoints, shutdown.clone()));

    let mut http_addr = None;
    if let Some(addr) = config.http_listen {
        let bound =
            taskbus_runtime::http::spawn_health(&tracker, addr, health.clone(), shutdown.clone())
                .await
                .map_err(|source| LedgerError::Http { addr, source })?;
        http_addr = Some(bound);
    }
    tracker.close();
    health.set_ready(true);
    info!(http = ?http_addr, "ledger ready");
    Ok(Running {
        tracker,
        shutdown,
        ledger,
        http_addr,
    })
}

/// Start and run until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), LedgerError> {
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
