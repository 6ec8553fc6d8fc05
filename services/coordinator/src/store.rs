//! PostgreSQL access for `coordinator.tasks`. Every write takes a whole batch in one statement
//! (`UNNEST` of arrays), and every state change is guarded by the attempt number and the
//! current status, so replaying an event or racing replicas changes nothing.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use taskbus_proto::api::TaskRecord;

pub type DbResult<T> = Result<T, sqlx::Error>;

/// An admitted task about to be recorded (status `queued`, attempt 1).
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: String,
    pub pool: String,
    pub kind: String,
    pub priority: String,
    pub max_attempts: i32,
    pub envelope: String,
    pub submit_seq: i64,
    pub payer: Option<String>,
}

/// Insert admitted tasks; returns the ids that were new. An id whose only record is a
/// rejection is taken over (a producer may fix a refused message and send it again).
/// `rows` must not repeat an id.
pub async fn insert_admitted(db: &PgPool, rows: &[NewTask]) -> DbResult<HashSet<String>> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let pools: Vec<&str> = rows.iter().map(|r| r.pool.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
    let prios: Vec<&str> = rows.iter().map(|r| r.priority.as_str()).collect();
    let maxes: Vec<i32> = rows.iter().map(|r| r.max_attempts).collect();
    let envs: Vec<&str> = rows.iter().map(|r| r.envelope.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.submit_seq).collect();
    let payers: Vec<Option<&str>> = rows.iter().map(|r| r.payer.as_deref()).collect();
    let inserted = sqlx::query(
        "INSERT INTO coordinator.tasks
             (task_id, pool, kind, priority, status, attempt, max_attempts, envelope, submit_seq, payer)
         SELECT t.id, t.pool, t.kind, t.prio, 'queued', 1, t.maxa, t.env::jsonb, t.seq, t.payer
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::int8[], $8::text[])
              AS t(id, pool, kind, prio, maxa, env, seq, payer)
         ON CONFLICT (task_id) DO UPDATE
         SET pool = EXCLUDED.pool, kind = EXCLUDED.kind, priority = EXCLUDED.priority, status = 'queued',
             attempt = 1, max_attempts = EXCLUDED.max_attempts, envelope = EXCLUDED.envelope,
             submit_seq = EXCLUDED.submit_seq, payer = EXCLUDED.payer, reason = NULL, reason_message = NULL,
             finished_at = NULL, created_at = now(), updated_at = now()
         WHERE coordinator.tasks.status = 'rejected'
         RETURNING task_id",
    )
    .bind(&ids)
    .bind(&pools)
    .bind(&kinds)
    .bind(&prios)
    .bind(&maxes)
    .bind(&envs)
    .bind(&seqs)
    .bind(&payers)
    .fetch_all(db)
    .await?;
    Ok(inserted
        .into_iter()
        .map(|r| r.get::<String, _>(0))
        .collect())
}

/// Submit sequence and status of existing tasks, to tell a redelivery from a duplicate.
pub async fn existing(db: &PgPool, ids: &[String]) -> DbResult<Vec<(String, Option<i64>, String)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT task_id, submit_seq, status FROM coordinator.tasks WHERE task_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// A refused message about to be recorded.
#[derive(Debug, Clone)]
pub struct NewRejection {
    pub id: String,
    pub pool: String,
    pub reason: String,
    pub message: String,
    pub submit_seq: i64,
}

/// Insert rejections; returns the ids that were new.
pub async fn insert_rejected(db: &PgPool, rows: &[NewRejection]) -> DbResult<HashSet<String>> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let pools: Vec<&str> = rows.iter().map(|r| r.pool.as_str()).collect();
    let reasons: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
    let msgs: Vec<&str> = rows.iter().map(|r| r.message.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.submit_seq).collect();
    let inserted = sqlx::query(
        "INSERT INTO coordinator.tasks
             (task_id, pool, status, attempt, max_attempts, reason, reason_message, submit_seq, finished_at)
         SELECT t.id, t.pool, 'rejected', 0, 0, t.reason, t.msg, t.seq, now()
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) AS t(id, pool, reason, msg, seq)
         ON CONFLICT (task_id) DO NOTHING
         RETURNING task_id",
    )
    .bind(&ids)
    .bind(&pools)
    .bind(&reasons)
    .bind(&msgs)
    .bind(&seqs)
    .fetch_all(db)
    .await?;
    Ok(inserted
        .into_iter()
        .map(|r| r.get::<String, _>(0))
        .collect())
}

/// `started` for `(id, attempt, agent, at)`: queued → running for that attempt only.
pub async fn record_started(
    db: &PgPool,
    rows: &[(String, i32, String, DateTime<Utc>)],
) -> DbResult<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let (ids, attempts, agents, ats) = unzip4(rows);
    let r = sqlx::query(
        "UPDATE coordinator.tasks t
         SET status = 'running', agent_id = u.agent, started_at = u.at, updated_at = now()
         FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::timestamptz[]) AS u(id, attempt, agent, at)
         WHERE t.task_id = u.id AND t.attempt = u.attempt AND t.status = 'queued'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .bind(&ats)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

fn unzip4<A: Clone, B: Clone, C: Clone, D: Clone>(
    rows: &[(A, B, C, D)],
) -> (Vec<A>, Vec<B>, Vec<C>, Vec<D>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (a, b, c, d) in rows {
        out.0.push(a.clone());
        out.1.push(b.clone());
        out.2.push(c.clone());
        out.3.push(d.clone());
    }
    out
}

/// A `succeeded` outcome to record.
#[derive(Debug, Clone)]
pub struct Success {
    pub id: String,
    pub attempt: i32,
    pub agent: String,
    pub result: String,
    pub at: DateTime<Utc>,
}

/// Record successes for the current attempt of non-terminal tasks; returns the ids recorded.
pub async fn record_succeeded(db: &PgPool, rows: &[Success]) -> DbResult<HashSet<String>> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
    let agents: Vec<&str> = rows.iter().map(|r| r.agent.as_str()).collect();
    let results: Vec<&str> = rows.iter().map(|r| r.result.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = rows.iter().map(|r| r.at).collect();
    let done = sqlx::query(
        "UPDATE coordinator.tasks t
         SET status = 'succeeded', result = u.result::jsonb, agent_id = u.agent, error = NULL,
             finished_at = u.at, started_at = COALESCE(t.started_at, u.at), updated_at = now()
         FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::timestamptz[]) AS u(id, attempt, agent, result, at)
         WHERE t.task_id = u.id AND t.attempt = u.attempt AND t.status IN ('queued', 'running')
         RETURNING t.task_id",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .bind(&results)
    .bind(&ats)
    .fetch_all(db)
    .await?;
    Ok(done.into_iter().map(|r| r.get::<String, _>(0)).collect())
}

/// A `failed` outcome to record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: String,
    pub attempt: i32,
    pub agent: String,
    pub error: String,
    pub retryable: bool,
    pub at: DateTime<Utc>,
}

/// What recording a failure led to.
#[derive(Debug, Clone)]
pub struct FailureOutcome {
    pub id: String,
    pub pool: String,
    /// `queued` (another attempt) or `dead`.
    pub status: String,
    /// The new attempt number when queued, the last attempt when dead.
    pub attempt: i32,
    pub envelope: Option<String>,
    pub error: String,
}

/// Record failures of the current attempt; requeue while attempts remain, else `dead`.
pub async fn record_failed(db: &PgPool, rows: &[Failure]) -> DbResult<Vec<FailureOutcome>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
    let agents: Vec<&str> = rows.iter().map(|r| r.agent.as_str()).collect();
    let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
    let retry: Vec<bool> = rows.iter().map(|r| r.retryable).collect();
    let ats: Vec<DateTime<Utc>> = rows.iter().map(|r| r.at).collect();
    // A replayed failure whose effect is already recorded (the task was requeued as the next
    // attempt, or is dead) matches too and changes nothing: its follow-up publishes are
    // repeated under the same message ids, so a crash between this write and those publishes
    // never strands a task.
    let out = sqlx::query(
        "UPDATE coordinator.tasks t
         SET status = CASE WHEN t.attempt <> u.attempt OR t.status = 'dead' THEN t.status
                           WHEN u.retry AND t.attempt < t.max_attempts THEN 'queued' ELSE 'dead' END,
             attempt = CASE WHEN t.attempt <> u.attempt OR t.status = 'dead' THEN t.attempt
                            WHEN u.retry AND t.attempt < t.max_attempts THEN t.attempt + 1 ELSE t.attempt END,
             finished_at = CASE WHEN t.attempt <> u.attempt OR t.status = 'dead' THEN t.finished_at
                                WHEN u.retry AND t.attempt < t.max_attempts THEN NULL ELSE u.at END,
             error = CASE WHEN t.attempt <> u.attempt OR t.status = 'dead' THEN t.error ELSE u.error END,
             agent_id = CASE WHEN t.attempt <> u.attempt OR t.status = 'dead' THEN t.agent_id ELSE u.agent END,
             updated_at = now()
         FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::bool[], $6::timestamptz[])
              AS u(id, attempt, agent, error, retry, at)
         WHERE t.task_id = u.id
           AND ((t.attempt = u.attempt AND t.status IN ('queued', 'running', 'dead'))
             OR (t.attempt = u.attempt + 1 AND t.status = 'queued'))
         RETURNING t.task_id, t.pool, t.status, t.attempt, t.envelope::text, t.error",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&agents)
    .bind(&errors)
    .bind(&retry)
    .bind(&ats)
    .fetch_all(db)
    .await?;
    Ok(out
        .into_iter()
        .map(|r| FailureOutcome {
            id: r.get(0),
            pool: r.get(1),
            status: r.get(2),
            attempt: r.get(3),
            envelope: r.get(4),
            error: r.get::<Option<String>, _>(5).unwrap_or_default(),
        })
        .collect())
}

const RECORD_COLUMNS: &str = "task_id, pool, kind, status, priority, attempt, max_attempts, agent_id, result,
     COALESCE(error, reason_message) AS error, reason, created_at, updated_at, started_at, finished_at";

fn record(r: sqlx::postgres::PgRow) -> TaskRecord {
    TaskRecord {
        id: r.get("task_id"),
        pool: r.get("pool"),
        kind: r.get("kind"),
        status: r.get("status"),
        priority: r.get("priority"),
        attempt: r.get("attempt"),
        max_attempts: r.get("max_attempts"),
        agent_id: r.get("agent_id"),
        result: r.get("result"),
        error: r.get("error"),
        reason: r.get("reason"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        started_at: r.get("started_at"),
        finished_at: r.get("finished_at"),
    }
}

/// One task by id.
pub async fn get(db: &PgPool, id: &str) -> DbResult<Option<TaskRecord>> {
    let q = format!("SELECT {RECORD_COLUMNS} FROM coordinator.tasks WHERE task_id = $1");
    Ok(sqlx::query(&q)
        .bind(id)
        .fetch_optional(db)
        .await?
        .map(record))
}

/// Newest tasks first, optionally filtered by pool and status.
pub async fn list(
    db: &PgPool,
    pool: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> DbResult<Vec<TaskRecord>> {
    let q = format!(
        "SELECT {RECORD_COLUMNS} FROM coordinator.tasks
         WHERE ($1::text IS NULL OR pool = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, task_id DESC LIMIT $3"
    );
    Ok(sqlx::query(&q)
        .bind(pool)
        .bind(status)
        .bind(limit)
        .fetch_all(db)
        .await?
        .into_iter()
        .map(record)
        .collect())
}

/// Task counts per pool and status (for `taskbus dev`'s status line and the scaler).
pub async fn counts(db: &PgPool) -> DbResult<Vec<(String, String, i64)>> {
    let rows =
        sqlx::query("SELECT pool, status, count(*) FROM coordinator.tasks GROUP BY pool, status")
            .fetch_all(db)
            .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Every task status name.
pub const STATUSES: [&str; 10] = [
    "admitted",
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "dead",
    "cancelled",
    "expired",
    "rejected",
];
