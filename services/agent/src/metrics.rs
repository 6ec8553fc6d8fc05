//! What an agent serves on its HTTP port when `AgentConfig::http_listen` is set: `/healthz`
//! (the process answers), `/readyz` (bound to the pool's consumers, connected to NATS and not
//! draining) and `/metrics`, every series labelled with the pool:
//!
//! - `taskbus_agent_tasks_total{outcome}`: tasks this agent finished, by outcome
//!   (`succeeded`, `failed` — timeouts included —, `handed_back`, `cancelled`, `expired`);
//! - `taskbus_agent_in_flight`: tasks held now (running, or waiting for a placement);
//! - `taskbus_agent_waiting`: tasks waiting for a placement (GPU dispatcher; 0 otherwise);
//! - `taskbus_agent_task_duration_seconds`: how long handlers ran (successes, failures and
//!   timeouts).
//!
//! The counters are read from [`AgentStats`] at each scrape, so they agree with
//! `Agent::stats()` to the task.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::AgentStats;

/// Handler run times: 1 ms to about 9 minutes.
pub(crate) fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// The agent's registry: its counters, in-flight gauge and `durations`, labelled with `pool`.
pub(crate) fn registry(pool: &str, stats: Arc<AgentStats>, durations: Histogram) -> Registry {
    let labels = [(Cow::Borrowed("pool"), Cow::Owned(pool.to_string()))];
    let mut r = Registry::with_prefix_and_labels("taskbus_agent", labels.into_iter());
    r.register_collector(stats_collector(stats));
    r.register(
        "task_duration_seconds",
        "How long handlers ran (successes, failures and timeouts)",
        durations,
    );
    r
}

/// The counters and gauges of one agent, for a registry labelled with its pool (processes that
/// run several agents, like the GPU dispatcher, register one per pool).
pub fn stats_collector(stats: Arc<AgentStats>) -> Box<dyn Collector> {
    Box::new(StatsCollector(stats))
}

#[derive(Debug)]
struct StatsCollector(Arc<AgentStats>);

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let mut tasks = encoder.encode_descriptor(
            "tasks",
            "Tasks this agent finished, by outcome (timeouts count as failed)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [
            ("succeeded", &s.succeeded),
            ("failed", &s.failed),
            ("handed_back", &s.handed_back),
            ("cancelled", &s.cancelled),
            ("expired", &s.expired),
        ] {
            let labels = [("outcome", outcome)];
            let family = tasks.encode_family(&labels)?;
            ConstCounter::new(n.load(Ordering::Relaxed)).encode(family)?;
        }
        for (name, help, n) in [
            (
                "in_flight",
                "Tasks held by this agent now (running, or waiting for a placement)",
                &s.in_flight,
            ),
            (
                "waiting",
                "Tasks pulled and waiting for a placement (e.g. free GPUs)",
                &s.waiting,
            ),
        ] {
            let gauge = ConstGauge::new(i64::from(n.load(Ordering::Relaxed)));
            let enc = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(enc)?;
        }
        Ok(())
    }
}
