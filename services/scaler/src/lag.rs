//! Lag figures of one pool and how they are estimated from JetStream consumer samples.
//!
//! JetStream tells us, per durable consumer (`work-<pool>`): `num_pending` (messages not yet
//! delivered = the backlog), `num_ack_pending` (delivered, not yet acked = in flight) and
//! `delivered.consumer_seq` (deliveries so far). Between two samples `dt` apart:
//!
//! - deliveries `ΔD = Δdelivered.consumer_seq`
//! - arrivals `A = Δnum_pending + ΔD` (every new message is either still pending or was delivered)
//! - completions `C = ΔD − Δnum_ack_pending` (every delivery is either still in flight or acked)
//!
//! Negative deltas (a consumer that was deleted and recreated) reset the baseline. Rates are
//! exponentially weighted moving averages with time constant `tau`. The measured service time
//! follows from Little's law applied to the agents: `S = L / λ` where `L` is the average number of
//! tasks in flight and `λ` the completion rate (both smoothed the same way). Until some
//! completions were seen, `S` is the configured default.
//!
//! `desired_replicas` is the number of agents needed to finish the backlog within the pool's
//! target latency `T` while keeping up with arrivals, each agent running `c` tasks at a time
//! (`target_per_replica`) at the measured service time `S` (Little's law again: a throughput of
//! `X` tasks/s at `S` s each keeps `X·S` tasks in flight, which needs `X·S/c` agents):
//!
//! ```text
//! X        = backlog / T + arrival_rate
//! by_rate  = ceil(X · S / c − 0.1)        0.1 = tolerance, so a decaying rate lets go
//! by_work  = ceil(in_flight / c)          agents busy right now are still needed
//! by_count = ceil((backlog + in_flight) / c), only while S is not measured yet
//! desired  = clamp(max(by_rate, by_work, by_count, 1 if backlog + in_flight > 0), min, max)
//! ```
//!
//! Until the pool's first completions give a measured `S`, the default service time may be far
//! off (a GPU task of minutes), so the scaler also gives each unfinished task its share of an
//! agent (`target_per_replica` tasks per agent), the rule KEDA's queue-length scalers use.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Every figure the scaler publishes for one pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolLag {
    pub pool: String,
    /// Messages waiting on the pool's work consumer (`num_pending`).
    pub backlog: u64,
    /// Messages delivered and not yet acknowledged (`num_ack_pending`).
    pub in_flight: u64,
    /// Attempts waiting out a retry backoff: JetStream message schedules on
    /// `taskbus.sched.<pool>.>` that the server moves to the work subject when due. Not in the
    /// consumer yet, so not in `backlog`; not counted in `desired_replicas`.
    pub delayed: u64,
    /// Agents heard from (heartbeats) within the last 15 s: the pool's live replicas.
    pub agents: u32,
    /// Age of the oldest message not yet delivered, seconds (0 when none waits).
    pub oldest_age_seconds: f64,
    /// Tasks arriving per second (smoothed).
    pub arrival_rate: f64,
    /// Tasks completing per second (smoothed).
    pub completion_rate: f64,
    /// Seconds one task takes, measured by Little's law (or the default until measured).
    pub service_time_seconds: f64,
    /// Whether `service_time_seconds` is measured rather than the default.
    pub service_time_measured: bool,
    /// Agents the pool needs (formula in the module docs), within min/max.
    pub desired_replicas: u32,
    /// The pool is inside one of its freeze windows now.
    pub frozen: bool,
    /// The replica count the published metrics stand for: `desired_replicas`, or during a
    /// freeze the count held since the freeze began.
    pub published_replicas: u32,
    /// Whether the pool's work consumer exists yet (zero lag when it does not).
    pub consumer_found: bool,
    pub updated_at: DateTime<Utc>,
}

impl PoolLag {
    /// An idle pool with nothing measured yet.
    pub fn empty(pool: &str, service_time_s: f64, min_replicas: u32, now: DateTime<Utc>) -> Self {
        Self {
            pool: pool.to_string(),
            backlog: 0,
            in_flight: 0,
            delayed: 0,
            agents: 0,
            oldest_age_seconds: 0.0,
            arrival_rate: 0.0,
            completion_rate: 0.0,
            service_time_seconds: service_time_s,
            service_time_measured: false,
            desired_replicas: min_replicas,
            frozen: false,
            published_replicas: min_replicas,
            consumer_found: false,
            updated_at: now,
        }
    }

    /// Work exists for the pool (KEDA's "active").
    pub fn is_active(&self) -> bool {
        if self.frozen {
            return self.published_replicas > 0;
        }
        self.backlog + self.in_flight > 0
    }
}

/// Inputs of the desired-replicas formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DesiredInput {
    pub backlog: u64,
    pub in_flight: u64,
    pub arrival_rate: f64,
    pub service_time_s: f64,
    /// Whether `service_time_s` was measured (else the `by_count` rule applies too).
    pub service_time_measured: bool,
    /// Tasks one agent runs at a time (`target_per_replica`, at least 1).
    pub per_replica: u32,
    pub target_latency_s: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
}

/// Agents needed (see the module docs for the formula).
pub fn desired_replicas(i: &DesiredInput) -> u32 {
    let c = f64::from(i.per_replica.max(1));
    let t = if i.target_latency_s.is_finite() && i.target_latency_s > 0.0 {
        i.target_latency_s
    } else {
        1.0
    };
    let s = if i.service_time_s.is_finite() && i.service_time_s > 0.0 {
        i.service_time_s
    } else {
        0.0
    };
    let lambda = if i.arrival_rate.is_finite() && i.arrival_rate > 0.0 {
        i.arrival_rate
    } else {
        0.0
    };
    let throughput = i.backlog as f64 / t + lambda;
    // A 10 % tolerance (as the HPA's) lets a decaying rate estimate release an idle pool.
    let by_rate = ceil_u32(throughput * s / c - RATE_TOLERANCE);
    let by_work = ceil_u32(i.in_flight as f64 / c);
    let by_count = if i.service_time_measured {
        0
    } else {
        ceil_u32((i.backlog + i.in_flight) as f64 / c)
    };
    let any = u32::from(i.backlog + i.in_flight > 0);
    let max = i.max_replicas.max(i.min_replicas);
    by_rate
        .max(by_work)
        .max(by_count)
        .max(any)
        .clamp(i.min_replicas, max)
}

/// Replicas the rate term may fall short by before it asks for one more.
pub const RATE_TOLERANCE: f64 = 0.1;

fn ceil_u32(x: f64) -> u32 {
    if !x.is_finite() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // Tolerate float noise such as 2.0000000001 from 0.1-based arithmetic.
        (x - 1e-9).ceil().max(0.0) as u32
    }
}

/// One consumer sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds on a monotonic clock.
    pub at_s: f64,
    pub pending: u64,
    pub ack_pending: u64,
    pub delivered: u64,
}

/// Smoothed rates and service time from successive samples.
#[derive(Debug, Clone)]
pub struct Estimator {
    tau_s: f64,
    default_service_s: f64,
    last: Option<Sample>,
    arrival_rate: f64,
    completion_rate: f64,
    in_flight_avg: f64,
    completions_seen: f64,
}

impl Estimator {
    /// `tau_s`: smoothing time constant; `default_service_s`: service time until measured.
    pub fn new(tau_s: f64, default_service_s: f64) -> Self {
        Self {
            tau_s: if tau_s.is_finite() && tau_s > 0.0 {
                tau_s
            } else {
                10.0
            },
            default_service_s,
            last: None,
            arrival_rate: 0.0,
            completion_rate: 0.0,
            in_flight_avg: 0.0,
            completions_seen: 0.0,
        }
    }

    /// Feed a sample.
    pub fn observe(&mut self, s: Sample) {
        let Some(prev) = self.last.replace(s) else {
            self.in_flight_avg = s.ack_pending as f64;
            return;
        };
        let dt = s.at_s - prev.at_s;
        if dt.is_nan() || dt <= 0.0 {
            return;
        }
        if s.delivered < prev.delivered {
            // The consumer was recreated: its counters restarted. Keep the rates, new baseline.
            return;
        }
        let d_delivered = (s.delivered - prev.delivered) as f64;
        let arrivals = (s.pending as f64 - prev.pending as f64 + d_delivered).max(0.0);
        let completions = (d_delivered - (s.ack_pending as f64 - prev.ack_pending as f64)).max(0.0);
        let alpha = 1.0 - (-dt / self.tau_s).exp();
        self.arrival_rate += alpha * (arrivals / dt - self.arrival_rate);
        self.completion_rate += alpha * (completions / dt - self.completion_rate);
        self.in_flight_avg += alpha * (s.ack_pending as f64 - self.in_flight_avg);
        self.completions_seen += completions;
    }

    pub fn arrival_rate(&self) -> f64 {
        self.arrival_rate
    }
    pub fn completion_rate(&self) -> f64 {
        self.completion_rate
    }

    /// Little's law `S = L / λ` once completions were seen, else the default.
    pub fn service_time(&self) -> (f64, bool) {
        if self.completions_seen >= 1.0 && self.completion_rate > 1e-6 && self.in_flight_avg > 0.0 {
            (self.in_flight_avg / self.completion_rate, true)
        } else {
            (self.default_service_s, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(backlog: u64, in_flight: u64, rate: f64, s: f64) -> DesiredInput {
        DesiredInput {
            backlog,
            in_flight,
            arrival_rate: rate,
            service_time_s: s,
            service_time_measured: true,
            per_replica: 10,
            target_latency_s: 5.0,
            min_replicas: 0,
            max_replicas: 100,
        }
    }

    #[test]
    fn desired_table() {
        // (backlog, in_flight, arrival/s, service s, expected)
        let table = [
            (0, 0, 0.0, 1.0, 0),
            (1, 0, 0.0, 1.0, 1),     // any work wakes the pool
            (0, 1, 0.0, 1.0, 1),     // in-flight work keeps an agent
            (500, 0, 0.0, 1.0, 10),  // 100/s for 1 s each = 100 in flight = 10 agents
            (500, 0, 0.0, 2.0, 20),  // twice the service time, twice the agents
            (0, 0, 50.0, 2.0, 10),   // steady 50/s × 2 s = 100 in flight
            (100, 0, 50.0, 2.0, 14), // (20 + 50) × 2 / 10 = 14
            (0, 95, 0.0, 0.1, 10),   // busy agents are kept even when the rate formula is low
        ];
        for (b, f, r, s, want) in table {
            assert_eq!(
                desired_replicas(&input(b, f, r, s)),
                want,
                "backlog {b} in_flight {f} rate {r} s {s}"
            );
        }
    }

    #[test]
    fn desired_bounds_and_hostile_numbers() {
        let mut i = input(1_000_000, 0, 0.0, 1.0);
        assert_eq!(desired_replicas(&i), 100);
        i.min_replicas = 3;
        i.backlog = 0;
        assert_eq!(desired_replicas(&i), 3);
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            let j = DesiredInput {
                service_time_s: bad,
                arrival_rate: bad,
                target_latency_s: bad,
                ..input(5, 0, 0.0, 1.0)
            };
            let d = desired_replicas(&j);
            assert!(d <= 100, "{bad}: {d}");
            assert_eq!(d, 1, "{bad}");
        }
        // max below min: min wins rather than panicking in clamp.
        let j = DesiredInput {
            min_replicas: 5,
            max_replicas: 2,
            ..input(0, 0, 0.0, 1.0)
        };
        assert_eq!(desired_replicas(&j), 5);
        let j = DesiredInput {
            per_replica: 0,
            ..input(10, 0, 0.0, 1.0)
        };
        assert_eq!(desired_replicas(&j), 2); // c treated as 1: 10/5 × 1 = 2
    }

    #[test]
    fn unmeasured_service_time_counts_tasks() {
        // 6 GPU tasks, service time unknown (default 1 s): one agent per 4 tasks until measured.
        let i = DesiredInput {
            per_replica: 4,
            service_time_measured: false,
            ..input(6, 0, 0.0, 1.0)
        };
        assert_eq!(desired_replicas(&i), 2);
        assert_eq!(
            desired_replicas(&DesiredInput {
                service_time_measured: true,
                ..i
            }),
            1
        );
        // With a long measured time the rate rule takes over: 6/5 × 60 / 4 = 18.
        let j = DesiredInput {
            service_time_s: 60.0,
            service_time_measured: true,
            ..i
        };
        assert_eq!(desired_replicas(&j), 18);
    }

    #[test]
    fn estimator_measures_rates_and_service_time() {
        // Steady state: 20 tasks/s arrive and complete, 2 s each ⇒ 40 in flight.
        let mut e = Estimator::new(2.0, 1.0);
        assert_eq!(e.service_time(), (1.0, false));
        let mut delivered = 0;
        for k in 0..200 {
            e.observe(Sample {
                at_s: k as f64 * 0.5,
                pending: 5,
                ack_pending: 40,
                delivered,
            });
            delivered += 10;
        }
        assert!(
            (e.arrival_rate() - 20.0).abs() < 0.1,
            "{}",
            e.arrival_rate()
        );
        assert!(
            (e.completion_rate() - 20.0).abs() < 0.1,
            "{}",
            e.completion_rate()
        );
        let (s, measured) = e.service_time();
        assert!(measured);
        assert!((s - 2.0).abs() < 0.05, "{s}");
    }

    #[test]
    fn estimator_survives_counter_reset_and_clock_glitches() {
        let mut e = Estimator::new(2.0, 1.0);
        e.observe(Sample {
            at_s: 0.0,
            pending: 0,
            ack_pending: 0,
            delivered: 1000,
        });
        e.observe(Sample {
            at_s: 1.0,
            pending: 0,
            ack_pending: 0,
            delivered: 10,
        });
        e.observe(Sample {
            at_s: 1.0,
            pending: 50,
            ack_pending: 0,
            delivered: 10,
        });
        e.observe(Sample {
            at_s: 0.5,
            pending: 50,
            ack_pending: 0,
            delivered: 10,
        });
        assert_eq!(e.arrival_rate(), 0.0);
        assert_eq!(e.completion_rate(), 0.0);
        e.observe(Sample {
            at_s: 2.0,
            pending: 60,
            ack_pending: 0,
            delivered: 10,
        });
        assert!(e.arrival_rate() > 0.0);
    }
}
