//! PostgreSQL pool and migrations (schemas `coordinator` and `ledger`, files in `migrations/`).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Errors while setting up the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL is not valid: {0}")]
    Url(#[source] sqlx::Error),
    #[error("cannot connect to PostgreSQL: {0}; check --database-url / TASKBUS_DATABASE_URL and that the server is up")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The embedded migrations of every taskbus schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How PostgreSQL plans the pool's prepared statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plans {
    /// Plan each statement for its own arguments. A plan PostgreSQL caches for a prepared
    /// statement is kept as the table grows; one cached while `coordinator.tasks` was small
    /// (a fresh install, the first seconds of load) scanned the whole table for every batch of
    /// outcomes. The default.
    PerExecution,
    /// Plan once per connection and reuse the plan: only for statements whose plan cannot
    /// depend on what the tables hold (`INSERT ... SELECT FROM UNNEST(...) ON CONFLICT`), where
    /// planning every time is pure cost (about 0.07 ms per admission batch).
    Cached,
}

/// Connect a pool of `max` connections whose statements are planned per execution.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, DbError> {
    connect_with(url, max, Plans::PerExecution).await
}

/// Connect a pool of `max` connections.
pub async fn connect_with(url: &str, max: u32, plans: Plans) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url.parse().map_err(DbError::Url)?;
    let mode = match plans {
        Plans::PerExecution => "force_custom_plan",
        Plans::Cached => "force_generic_plan",
    };
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // No ping before every statement: a connection that broke shows up as that
        // statement's error, and every caller already retries a failed batch.
        .test_before_acquire(false)
        .connect_with(
            opts.application_name("taskbus")
                .options([("plan_cache_mode", mode)]),
        )
        .await
        .map_err(DbError::Connect)
}

/// Connect and run migrations (idempotent; safe from several replicas at once since sqlx
/// takes an advisory lock).
pub async fn connect_and_migrate(url: &str, max: u32) -> Result<PgPool, DbError> {
    let pool = connect(url, max).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
