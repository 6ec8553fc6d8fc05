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

/// Connect a pool of `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url.parse().map_err(DbError::Url)?;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // No ping before every statement: a connection that broke shows up as that
        // statement's error, and every caller already retries a failed batch.
        .test_before_acquire(false)
        .connect_with(
            opts.application_name("taskbus")
                // Plan each statement for its own arguments. A plan PostgreSQL caches for a
                // prepared statement is kept as the table grows; one cached while
                // `coordinator.tasks` was small (a fresh install, the first seconds of load)
                // scanned the whole table for every batch of outcomes.
                .options([("plan_cache_mode", "force_custom_plan")]),
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
