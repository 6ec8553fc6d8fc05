//! Prometheus metrics: every lag figure per pool (`taskbus_scaler_<figure>{pool="…"}`), plus
//! the scaler's own counters.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::lag::PoolLag;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabel {
    pub rpc: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabel {
    pub pool: String,
    pub outcome: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The scaler's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    pub backlog: Family<PoolLabel, FGauge>,
    pub in_flight: Family<PoolLabel, FGauge>,
    pub oldest_age: Family<PoolLabel, FGauge>,
    pub delayed: Family<PoolLabel, FGauge>,
    pub agents: Family<PoolLabel, FGauge>,
    pub arrival_rate: Family<PoolLabel, FGauge>,
    pub completion_rate: Family<PoolLabel, FGauge>,
    pub service_time: Family<PoolLabel, FGauge>,
    pub desired: Family<PoolLabel, FGauge>,
    pub published: Family<PoolLabel, FGauge>,
    pub frozen: Family<PoolLabel, FGauge>,
    pub last_refresh: Family<PoolLabel, FGauge>,
    pub refresh_errors: Family<PoolLabel, Counter>,
    pub rpcs: Family<RpcLabel, Counter>,
    pub scale_actions: Family<ScaleLabel, Counter>,
}

impl Metrics {
    /// The service's registry: every family under the prefix `taskbus_scaler_`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("taskbus_scaler");
        self.register(&mut r);
        r
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "backlog",
            "Tasks waiting on the pool's work consumer (num_pending)",
            self.backlog.clone(),
        );
        r.register(
            "in_flight",
            "Tasks delivered to agents and not yet acknowledged (num_ack_pending)",
            self.in_flight.clone(),
        );
        r.register(
            "agents",
            "Agents heard from (heartbeats) within the last 15 s",
            self.agents.clone(),
        );
        r.register(
            "delayed",
            "Attempts waiting out a retry backoff (JetStream message schedules)",
            self.delayed.clone(),
        );
        r.register(
            "oldest_age_seconds",
            "Age of the oldest task not yet delivered",
            self.oldest_age.clone(),
        );
        r.register(
            "arrival_rate",
            "Tasks arriving per second (smoothed)",
            self.arrival_rate.clone(),
        );
        r.register(
            "completion_rate",
            "Tasks completing per second (smoothed)",
            self.completion_rate.clone(),
        );
        r.register(
            "service_time_seconds",
            "Measured seconds per task (Little's law)",
            self.service_time.clone(),
        );
        r.register(
            "desired_replicas",
            "Agents needed to meet the pool's target latency, within min/max",
            self.desired.clone(),
        );
        r.register(
            "published_replicas",
            "Replica count the published KEDA/HPA metrics stand for (held during a freeze)",
            self.published.clone(),
        );
        r.register(
            "frozen",
            "1 while the pool is inside a freeze window",
            self.frozen.clone(),
        );
        r.register(
            "last_refresh_timestamp_seconds",
            "When the pool's figures were last refreshed",
            self.last_refresh.clone(),
        );
        r.register(
            "refresh_errors",
            "Failed consumer-info reads",
            self.refresh_errors.clone(),
        );
        r.register(
            "grpc_requests",
            "External scaler gRPC requests by method and status code",
            self.rpcs.clone(),
        );
        r.register(
            "scale_actions",
            "Direct-mode scale decisions applied or failed",
            self.scale_actions.clone(),
        );
    }

    /// Publish one pool's figures.
    pub fn set(&self, lag: &PoolLag) {
        let l = PoolLabel {
            pool: lag.pool.clone(),
        };
        self.backlog.get_or_create(&l).set(lag.backlog as f64);
        self.in_flight.get_or_create(&l).set(lag.in_flight as f64);
        self.delayed.get_or_create(&l).set(lag.delayed as f64);
        self.agents.get_or_create(&l).set(f64::from(lag.agents));
        self.oldest_age
            .get_or_create(&l)
            .set(lag.oldest_age_seconds);
        self.arrival_rate.get_or_create(&l).set(lag.arrival_rate);
        self.completion_rate
            .get_or_create(&l)
            .set(lag.completion_rate);
        self.service_time
            .get_or_create(&l)
            .set(lag.service_time_seconds);
        self.desired
            .get_or_create(&l)
            .set(f64::from(lag.desired_replicas));
        self.published
            .get_or_create(&l)
            .set(f64::from(lag.published_replicas));
        self.frozen
            .get_or_create(&l)
            .set(if lag.frozen { 1.0 } else { 0.0 });
        self.last_refresh
            .get_or_create(&l)
            .set(lag.updated_at.timestamp_millis() as f64 / 1000.0);
    }

    /// Forget a pool that was deleted.
    pub fn remove(&self, pool: &str) {
        let l = PoolLabel {
            pool: pool.to_string(),
        };
        for f in [
            &self.backlog,
            &self.in_flight,
            &self.oldest_age,
            &self.delayed,
            &self.agents,
            &self.arrival_rate,
            &self.completion_rate,
            &self.service_time,
            &self.desired,
            &self.published,
            &self.frozen,
            &self.last_refresh,
        ] {
            f.remove(&l);
        }
    }

    pub fn rpc(&self, rpc: &str, code: tonic::Code) {
        self.rpcs
            .get_or_create(&RpcLabel {
                rpc: rpc.into(),
                code: format!("{code:?}"),
            })
            .inc();
    }
}
