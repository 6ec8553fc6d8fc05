//! What the scaler knows: the configured pools (from the KV bucket) and their latest lag, shared
//! by the collector (writer) and the gRPC, HTTP and direct-mode readers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use taskbus_proto::PoolSettings;
use tokio::sync::watch;

use crate::freeze::{self, Window};
use crate::lag::PoolLag;
use crate::metrics::Metrics;

/// One configured pool.
#[derive(Debug, Clone)]
pub struct Pool {
    pub settings: PoolSettings,
    pub windows: Vec<Window>,
}

/// A pool as read from the bucket: usable, or the reason it is not.
pub type PoolEntry = Result<Pool, String>;

/// Parse and check a bucket value.
pub fn parse_pool(bytes: &[u8]) -> PoolEntry {
    let settings: PoolSettings = serde_json::from_slice(bytes)
        .map_err(|e| format!("pool settings are not valid JSON for taskbus: {e}"))?;
    settings.validate()?;
    let windows = freeze::parse_all(&settings.freeze_windows).map_err(|e| e.to_string())?;
    Ok(Pool { settings, windows })
}

/// Which figure a KEDA trigger or HPA metric scales on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Unfinished tasks (backlog + in flight); target = the pool's `target_per_replica`.
    Backlog,
    /// The scaler's desired replica count; target = 1.
    Desired,
}

impl MetricKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "backlog" => Some(Self::Backlog),
            "desired" => Some(Self::Desired),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::Desired => "desired",
        }
    }
    /// The per-replica target KEDA/HPA divides the value by.
    pub fn target(self, settings: &PoolSettings) -> u32 {
        match self {
            Self::Backlog => settings.target_per_replica.max(1),
            Self::Desired => 1,
        }
    }
    /// The published value: during a freeze, the value that keeps the held replica count
    /// (`held × target`), else the live figure.
    pub fn value(self, lag: &PoolLag, settings: &PoolSettings) -> u64 {
        if lag.frozen {
            return u64::from(lag.published_replicas) * u64::from(self.target(settings));
        }
        match self {
            Self::Backlog => lag.backlog + lag.in_flight,
            Self::Desired => u64::from(lag.published_replicas),
        }
    }
}

/// Why a pool cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not in the bucket.
    Unknown,
    /// In the bucket with settings that cannot be used.
    Invalid(String),
}

/// State shared by every part of the scaler.
pub struct Shared {
    pools: RwLock<HashMap<String, PoolEntry>>,
    lags: RwLock<HashMap<String, PoolLag>>,
    tick: watch::Sender<u64>,
    pub metrics: Metrics,
    /// Live agents per pool, from heartbeats.
    pub agents: crate::agents::AgentBook,
}

impl Shared {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            pools: RwLock::default(),
            lags: RwLock::default(),
            tick: watch::Sender::new(0),
            metrics,
            agents: crate::agents::AgentBook::new(std::time::Duration::from_secs(15)),
        })
    }

    pub fn set_pool(&self, name: &str, entry: PoolEntry) {
        write(&self.pools).insert(name.to_string(), entry);
    }

    pub fn remove_pool(&self, name: &str) {
        write(&self.pools).remove(name);
        write(&self.lags).remove(name);
        self.metrics.remove(name);
    }

    /// Every pool with usable settings.
    pub fn pools(&self) -> Vec<(String, Pool)> {
        let g = read(&self.pools);
        let mut v: Vec<_> = g
            .iter()
            .filter_map(|(k, e)| e.as_ref().ok().map(|p| (k.clone(), p.clone())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A pool's settings and latest lag.
    pub fn lookup(&self, name: &str) -> Result<(Pool, PoolLag), Lookup> {
        let pool = match read(&self.pools).get(name) {
            None => return Err(Lookup::Unknown),
            Some(Err(e)) => return Err(Lookup::Invalid(e.clone())),
            Some(Ok(p)) => p.clone(),
        };
        let lag = read(&self.lags).get(name).cloned().unwrap_or_else(|| {
            // Not refreshed yet (just added): zero lag, frozen as its windows say.
            let now = chrono::Utc::now();
            let mut lag = PoolLag::empty(name, 0.0, pool.settings.min_replicas, now);
            lag.frozen = freeze::frozen(&pool.windows, now);
            lag
        });
        Ok((pool, lag))
    }

    /// A pool's lag once the refresh loop has measured it.
    pub fn measured(&self, name: &str) -> Option<PoolLag> {
        read(&self.lags).get(name).cloned()
    }

    /// Store a refreshed lag (the caller ticks once per round).
    pub fn set_lag(&self, lag: PoolLag) {
        self.metrics.set(&lag);
        write(&self.lags).insert(lag.pool.clone(), lag);
    }

    /// Every known lag, sorted by pool.
    pub fn lags(&self) -> Vec<PoolLag> {
        let mut v: Vec<_> = read(&self.lags).values().cloned().collect();
        v.sort_by(|a, b| a.pool.cmp(&b.pool));
        v
    }

    /// Tell watchers (StreamIsActive) that a refresh round finished.
    pub fn tick(&self) {
        self.tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tick.subscribe()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_pool_reports_what_is_wrong() {
        assert!(parse_pool(b"{}").is_ok());
        assert!(parse_pool(b"not json")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_pool(br#"{"min_replicas": 5, "max_replicas": 1}"#)
            .unwrap_err()
            .contains("max_replicas"));
        let tz = parse_pool(
            br#"{"freeze_windows":[{"from":"01:00","to":"02:00","tz":"Nowhere/Land"}]}"#,
        );
        assert!(tz.unwrap_err().contains("Nowhere/Land"));
        assert!(parse_pool(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn metric_values_and_freeze_hold() {
        let settings = PoolSettings {
            target_per_replica: 5,
            ..Default::default()
        };
        let mut lag = PoolLag::empty("p", 1.0, 0, chrono::Utc::now());
        lag.backlog = 12;
        lag.in_flight = 3;
        lag.desired_replicas = 4;
        lag.published_replicas = 4;
        assert_eq!(MetricKind::Backlog.value(&lag, &settings), 15);
        assert_eq!(MetricKind::Desired.value(&lag, &settings), 4);
        // Frozen with 2 replicas held: the values that make the HPA keep 2.
        lag.frozen = true;
        lag.published_replicas = 2;
        assert_eq!(MetricKind::Backlog.value(&lag, &settings), 10);
        assert_eq!(MetricKind::Desired.value(&lag, &settings), 2);
        assert_eq!(MetricKind::parse("backlog"), Some(MetricKind::Backlog));
        assert_eq!(MetricKind::parse("Backlog"), None);
        assert_eq!(MetricKind::parse(""), None);
    }
}
