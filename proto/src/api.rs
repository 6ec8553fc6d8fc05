//! Request/reply API bodies of the coordinator's NATS service (`taskbus.api.*`).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Service name under `$SRV.PING.<name>`.
pub const COORDINATOR_SERVICE: &str = "taskbus-coordinator";

/// `taskbus.api.task.get`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskGet {
    pub id: String,
}

/// `taskbus.api.tasks.list`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TaskList {
    pub pool: Option<String>,
    pub status: Option<String>,
    /// 1–1000, default 50.
    pub limit: Option<u32>,
}

/// One task as stored by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskRecord {
    pub id: String,
    pub pool: String,
    pub kind: Option<String>,
    pub status: String,
    pub priority: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub agent_id: Option<String>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` the task was submitted with, if a valid one (to find its trace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Error body of every endpoint (also signalled through the services framework's error headers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    pub code: u16,
    pub error: String,
}

/// An [`ApiError`] with `code` and a sentence.
pub fn bad(code: u16, msg: impl Into<String>) -> ApiError {
    ApiError {
        code,
        error: msg.into(),
    }
}

/// The JSON body of a reply: `{"ok": …}` or `{"error": …}`.
pub fn reply_body<T: Serialize>(r: Result<T, ApiError>) -> Vec<u8> {
    let r = match r {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e),
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// Parse a request body; an empty body means `{}`. Errors are 400s that quote serde's reason.
pub fn parse_request<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| bad(400, format!("bad request body: {e}")))
}

/// Reply envelope: either `{"ok": …}` or `{"error": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(ApiError),
}

/// Service name of the payment ledger under `$SRV.PING.<name>`.
pub const LEDGER_SERVICE: &str = "taskbus-ledger";

/// Subject of the ledger's batch hold endpoint, used by the coordinator at admission:
/// `<prefix>.ledger.hold`.
pub fn ledger_hold_subject(prefix: &str) -> String {
    format!("{prefix}.ledger.hold")
}

/// `taskbus.ledger.hold`: put the price of each task on hold, payer → escrow. Idempotent per
/// task id: repeating a hold with the same content returns the first result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    pub holds: Vec<Hold>,
}

/// One hold of a [`HoldRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub task_id: String,
    pub pool: String,
    pub payer: String,
    /// Decimal string.
    pub amount: String,
    /// `None`: the ledger's default currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// Reply to a [`HoldRequest`]: one result per hold, same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HoldResponse {
    pub results: Vec<HoldResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HoldResult {
    pub task_id: String,
    pub status: HoldStatus,
    /// Human sentence when not held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    /// The hold is (or already was) posted as pending.
    Held,
    /// The payer's available balance does not cover the amount: reject the task.
    InsufficientFunds,
    /// The hold cannot be made as asked (unknown currency, amount out of the currency's scale,
    /// same task id with different content): reject the task with `invalid_value`.
    Invalid,
}

/// `taskbus.api.task.cancel`: cancel a queued or running task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskCancel {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `taskbus.api.dlq.replay`: re-admit dead tasks with a fresh set of attempts. With `ids`,
/// those tasks (each must be dead); otherwise every dead task (of `pool`, if given), oldest
/// first, at most `limit` (default 1000).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DlqReplay {
    pub pool: Option<String>,
    pub ids: Vec<String>,
    pub limit: Option<u32>,
}

/// Reply of `dlq.replay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ReplayResult {
    /// Re-admitted task ids.
    pub replayed: Vec<String>,
    /// Ids that were not dead, unknown, or priced (a priced task's hold was voided when it
    /// died; resubmit it with a new id), left alone.
    pub skipped: Vec<String>,
}

/// Heartbeat an agent sends every few seconds on `taskbus.agents.<pool>.<agent>.heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Heartbeat {
    pub agent_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    /// Tasks it may run at once.
    pub capacity: u32,
    pub in_flight: u32,
    pub version: String,
    /// Circuit breaker: `closed` (pulling), `open` (paused after failures), `half_open`.
    pub breaker: String,
    pub consecutive_failures: u32,
}

/// One agent as the coordinator sees it (`taskbus.api.agents.list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentInfo {
    pub agent_id: String,
    pub pool: String,
    /// `healthy` (heartbeat within 15 s), `paused` (breaker open), `stale` (15–60 s), `gone`.
    pub health: String,
    pub last_seen: Option<DateTime<Utc>>,
    pub capacity: u32,
    pub in_flight: u32,
    pub version: String,
    pub breaker: String,
    pub successes: i64,
    pub failures: i64,
    /// EWMA of success (1) / failure (0), α = 0.1.
    pub success_rate: f64,
    /// EWMA of handler wall time, ms.
    pub latency_ms: Option<f64>,
    /// Payout multiplier the ledger applies (decimal string), see docs/PROTOCOL.md.
    pub reputation: String,
}
