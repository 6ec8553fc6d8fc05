//! PostgreSQL pool and migrations (schemas `coordinator` and `ledger`, files in `migrations/`).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Errors while setting up the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL is not valid: {0}")]
    Url(#[source] sqlx::Error),
    /// The driver's error is part of the message (and not a `source`, so that printing the
    /// error chain does not repeat it).
    #[error("cannot connect to PostgreSQL: {cause}; {}", connect_hint(.cause))]
    Connect { cause: sqlx::Error },
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

/// When a commit on the pool's connections returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Once the commit's WAL is flushed to disk (`synchronous_commit = on`). The default.
    Flushed,
    /// As soon as the transaction is visible, before its WAL is on disk (`synchronous_commit =
    /// off`): a PostgreSQL crash can lose the last commits. Only for writes whose caller makes
    /// them durable itself before it relies on them, with a synchronous commit of its own on
    /// another connection (WAL is flushed in order, so that flush covers every earlier commit).
    /// The coordinator's admission does this: it starts a task's work as soon as the row is
    /// written and acks the submit message only after such a flush.
    Deferred,
}

/// Connect a pool of `max` connections whose statements are planned per execution.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, DbError> {
    connect_with(url, max, Plans::PerExecution, Commit::Flushed).await
}

/// Connect a pool of `max` connections.
pub async fn connect_with(
    url: &str,
    max: u32,
    plans: Plans,
    commit: Commit,
) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url.parse().map_err(DbError::Url)?;
    let mode = match plans {
        Plans::PerExecution => "force_custom_plan",
        Plans::Cached => "force_generic_plan",
    };
    let synchronous_commit = match commit {
        Commit::Flushed => "on",
        Commit::Deferred => "off",
    };
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // No ping before every statement: a connection that broke shows up as that
        // statement's error, and every caller already retries a failed batch.
        .test_before_acquire(false)
        .connect_with(opts.application_name("taskbus").options([
            ("plan_cache_mode", mode),
            ("synchronous_commit", synchronous_commit),
        ]))
        .await
        .map_err(|cause| DbError::Connect { cause })
}

const TLS_FAILED: &str = "the TLS handshake failed: with `sslmode=verify-ca`/`verify-full` the \
     server's certificate must chain to a CA in `sslrootcert=` or the system's CA store, and for \
     `verify-full` name the URL's host; a client certificate goes in `sslcert=` and `sslkey=` \
     (docs/DEPLOY.md, PostgreSQL over TLS)";

/// What to check after a failed connection, by what failed.
fn connect_hint(e: &sqlx::Error) -> &'static str {
    let text = e.to_string();
    match e {
        sqlx::Error::Tls(_) if text.contains("does not support TLS") => {
            "the server offers no TLS: drop `sslmode=require`/`verify-ca`/`verify-full` from the \
             URL or turn on `ssl` in the server"
        }
        // rustls reports a failed handshake (a certificate it does not trust, an alert from
        // the server) as an I/O error of kind `InvalidData` carrying its own error.
        sqlx::Error::Tls(_) => TLS_FAILED,
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => TLS_FAILED,
        sqlx::Error::Database(d) => {
            let m = d.message();
            if m.contains("no encryption") || m.contains("SSL off") {
                // pg_hba.conf has `hostssl` lines only (or rejects plain `host` connections).
                "the server accepts only TLS connections: add `sslmode=require` to the URL, or \
                 `sslmode=verify-full&sslrootcert=/path/to/ca.pem` to check its certificate too"
            } else if m.contains("certificate") {
                "the server wants a client certificate signed by a CA it trusts: add \
                 `sslcert=/path/to/client.pem&sslkey=/path/to/client.key` to the URL"
            } else {
                "check --database-url / TASKBUS_DATABASE_URL"
            }
        }
        sqlx::Error::Configuration(_) if text.contains("key") => {
            "check `sslcert=` and `sslkey=`: both or neither, PEM certificates and a PEM private \
             key (PKCS#8, SEC1 or PKCS#1)"
        }
        _ => "check --database-url / TASKBUS_DATABASE_URL and that the server is up",
    }
}

/// Connect and run migrations (idempotent; safe from several replicas at once since sqlx
/// takes an advisory lock).
pub async fn connect_and_migrate(url: &str, max: u32) -> Result<PgPool, DbError> {
    let pool = connect(url, max).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
