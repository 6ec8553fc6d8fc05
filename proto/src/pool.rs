//! Pool settings, stored as JSON in the JetStream KV bucket `taskbus_pools` (key = pool name).
//! Every service watches the bucket, so `taskbus pools set` takes effect without a restart.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Settings of one pool. Every field has a default, so `{}` is a valid pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[schemars(title = "taskbus pool settings")]
pub struct PoolSettings {
    /// Tasks one agent replica should carry (in flight plus its share of backlog).
    pub target_per_replica: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Backlog latency the scaler aims for, seconds.
    pub target_latency_s: f64,
    /// Lease (JetStream ack wait) of a work message, ms. Agents extend it while working.
    pub ack_wait_ms: u64,
    /// Default attempts for tasks that do not say.
    pub max_attempts: u32,
    /// Retry backoff: first delay, multiplier cap.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Consecutive failures before an agent is paused, and the pause.
    pub breaker_threshold: u32,
    pub breaker_cooldown_ms: u64,
    /// Most running tasks per payer (0 = unlimited).
    pub fairness_limit: u32,
    /// Freeze windows: `HH:MM-HH:MM` in `tz` on `weekdays` (1 = Monday … 7 = Sunday).
    pub freeze_windows: Vec<FreezeWindow>,
    /// GPUs every task of the pool needs by default (0 = CPU pool).
    pub gpus: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            target_per_replica: 10,
            min_replicas: 0,
            max_replicas: 10,
            target_latency_s: 5.0,
            ack_wait_ms: 30_000,
            max_attempts: 3,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            breaker_threshold: 5,
            breaker_cooldown_ms: 30_000,
            fairness_limit: 0,
            freeze_windows: Vec::new(),
            gpus: 0,
            gpu_product: None,
        }
    }
}

/// A period in which the scaler does not change a pool's replica count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeWindow {
    /// `HH:MM`
    pub from: String,
    /// `HH:MM`; earlier than `from` means the window crosses midnight.
    pub to: String,
    /// IANA time zone, e.g. `Europe/Berlin`. Default UTC.
    #[serde(default = "utc")]
    pub tz: String,
    /// ISO weekdays the window starts on (1 = Monday). Empty = every day.
    #[serde(default)]
    pub weekdays: Vec<u8>,
}

fn utc() -> String {
    "UTC".into()
}

impl PoolSettings {
    /// Check the settings make sense; the message says which field is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_replicas < self.min_replicas {
            return Err(format!(
                "max_replicas ({}) is below min_replicas ({})",
                self.max_replicas, self.min_replicas
            ));
        }
        if self.target_per_replica == 0 {
            return Err("target_per_replica must be at least 1".into());
        }
        if !(self.target_latency_s.is_finite() && self.target_latency_s > 0.0) {
            return Err("target_latency_s must be a positive number".into());
        }
        if self.ack_wait_ms < 100 {
            return Err("ack_wait_ms must be at least 100".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err("max_attempts must be between 1 and 100".into());
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err("retry_max_ms must not be below retry_base_ms".into());
        }
        for w in &self.freeze_windows {
            for t in [&w.from, &w.to] {
                if parse_hhmm(t).is_none() {
                    return Err(format!("freeze window time {t:?} is not HH:MM"));
                }
            }
            if let Some(d) = w.weekdays.iter().find(|d| !(1..=7).contains(*d)) {
                return Err(format!("weekday {d} is not 1 (Monday) to 7 (Sunday)"));
            }
        }
        Ok(())
    }
}

/// `HH:MM` → minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_is_default() {
        let p: PoolSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(p, PoolSettings::default());
        p.validate().unwrap();
    }

    #[test]
    fn bad_settings() {
        assert!(serde_json::from_str::<PoolSettings>(r#"{"nope":1}"#).is_err());
        let p = PoolSettings {
            min_replicas: 5,
            max_replicas: 2,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("max_replicas"));
        let p = PoolSettings {
            freeze_windows: vec![FreezeWindow {
                from: "25:00".into(),
                to: "01:00".into(),
                tz: "UTC".into(),
                weekdays: vec![],
            }],
            ..Default::default()
        };
        assert!(p.validate().is_err());
        assert_eq!(parse_hhmm("23:59"), Some(1439));
        assert_eq!(parse_hhmm("7:00"), None);
    }
}
