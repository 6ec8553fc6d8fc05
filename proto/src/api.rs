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
}

/// Error body of every endpoint (also signalled through the services framework's error headers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiError {
    pub code: u16,
    pub error: String,
}

/// Reply envelope: either `{"ok": …}` or `{"error": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(ApiError),
}
