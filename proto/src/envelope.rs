//! The task envelope (schema version 1) a producer publishes to `taskbus.submit.<pool>`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Current envelope schema version.
pub const SCHEMA_VERSION: u32 = 1;

/// Priority band. `high` is handed out before `normal` before `low` within a pool.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!(
                "unknown priority {other:?} (use high, normal or low)"
            )),
        }
    }
}

/// GPU needs of a task (used by the GPU dispatcher and the scaler).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Number of whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Minimum memory per GPU, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mib: Option<u64>,
    /// GPU Feature Discovery product name, e.g. `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,
}

/// A task as published by a producer. Only `kind` is required; unknown fields are rejected.
///
/// After admission the coordinator forwards the same shape, with `id`, `priority`,
/// `max_attempts` and `timeout_ms` filled in, inside a [`WorkItem`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "taskbus task envelope (v1)")]
pub struct TaskEnvelope {
    /// Schema version; only `1` exists. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    /// What to do; agents dispatch on it. 1–128 printable characters.
    pub kind: String,
    /// Arbitrary JSON handed to the handler.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Task id and idempotency key, `[A-Za-z0-9_-]{1,128}`. Generated (ULID) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Attempts before the task is dead (1–100). Pool default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// RFC 3339; a task not started by then is `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// RFC 3339; the task is not handed to an agent before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// Decimal string, e.g. `"0.25"`; requires `payer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub price: Option<String>,
    /// Ledger account paying for the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// Currency code of `price` (default: the ledger's default currency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Retry backoff for this task, overriding the pool's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// Exponential backoff between attempts: the n-th retry waits
/// `min(max_ms, base_ms × 2^(n-1))`, scaled by a random factor in [0.5, 1] (jitter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl RetryPolicy {
    /// Delay before attempt `next_attempt` (≥ 2), given a jitter factor in [0, 1].
    pub fn delay_ms(&self, next_attempt: u32, jitter: f64) -> u64 {
        let exp = next_attempt.saturating_sub(2).min(40);
        let raw = self.base_ms.saturating_mul(1u64 << exp).min(self.max_ms);
        let j = 0.5 + 0.5 * jitter.clamp(0.0, 1.0);
        (raw as f64 * j) as u64
    }
}

/// Body of a message on `taskbus.work.<pool>.<priority>`: one attempt of an admitted task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "taskbus work item")]
pub struct WorkItem {
    /// 1-based attempt number; outcomes must echo it.
    pub attempt: u32,
    pub pool: String,
    /// The admitted envelope with `id`, `priority`, `max_attempts`, `timeout_ms` filled in.
    pub task: TaskEnvelope,
}

impl WorkItem {
    /// The task id (always present on admitted tasks).
    pub fn task_id(&self) -> &str {
        self.task.id.as_deref().unwrap_or_default()
    }
}

/// Build the JSON body of a [`WorkItem`] around an already-serialised envelope, without
/// re-parsing it (the coordinator's hot path and retries from the stored envelope use this).
pub fn work_item_json(attempt: u32, pool: &str, envelope_json: &str) -> String {
    let pool = serde_json::to_string(pool).unwrap_or_else(|_| "\"\"".into());
    format!(r#"{{"attempt":{attempt},"pool":{pool},"task":{envelope_json}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_item_json_round_trips() {
        let env = TaskEnvelope {
            v: Some(1),
            kind: "k".into(),
            payload: serde_json::json!({"a": [1, 2]}),
            id: Some("t".into()),
            priority: Some(Priority::Low),
            max_attempts: Some(2),
            timeout_ms: Some(5),
            deadline: None,
            not_before: None,
            price: None,
            payer: None,
            currency: None,
            resources: None,
            labels: None,
            retry: None,
        };
        let s = work_item_json(3, "p\"q", &serde_json::to_string(&env).unwrap());
        let w: WorkItem = serde_json::from_str(&s).unwrap();
        assert_eq!(w.attempt, 3);
        assert_eq!(w.pool, "p\"q");
        assert_eq!(w.task, env);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            base_ms: 1000,
            max_ms: 10_000,
        };
        assert_eq!(p.delay_ms(2, 1.0), 1000);
        assert_eq!(p.delay_ms(3, 1.0), 2000);
        assert_eq!(p.delay_ms(4, 1.0), 4000);
        assert_eq!(p.delay_ms(9, 1.0), 10_000);
        assert_eq!(p.delay_ms(200, 1.0), 10_000);
        assert_eq!(p.delay_ms(3, 0.0), 1000);
    }
}
