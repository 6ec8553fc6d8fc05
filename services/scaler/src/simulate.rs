//! `taskbus-scaler simulate --trace FILE`: replay an arrival trace through the scaler's own
//! policy (direct mode: the lag estimator, the desired-replicas formula and [`DirectPolicy`])
//! and through a model of KEDA's defaults, and compare replica-seconds, queueing delay and time
//! to first replica.
//!
//! Trace: CSV with the header `time,pool,tasks,service_ms`; `time` in seconds from the start,
//! `tasks` tasks of `service_ms` each arrive at that moment. Blank lines and lines starting with
//! `#` are ignored; rows may come in any order.
//!
//! Shared model: each replica runs `per_replica` tasks at a time, FIFO; a new replica serves
//! after `startup` seconds; a removed replica finishes what it runs but takes nothing new; the
//! clock advances in 100 ms steps.
//!
//! - **taskbus**: the estimator samples the queue every 250 ms; every 2 s direct mode computes
//!   desired replicas and applies the policy (no step limits, 60 s scale-down cool-down).
//! - **KEDA default**: KEDA polls every 30 s (first poll 15 s in) — activates 0 → 1 when work exists, deactivates
//!   to 0 after 300 s without work (cooldownPeriod); the HPA syncs every 15 s on
//!   backlog + in flight with target `per_replica` per replica (AverageValue), ignores changes
//!   within 10 % tolerance, scales up at most max(4 pods, 100 %) per sync and scales down to the
//!   highest recommendation of the last 300 s (stabilisation window).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use crate::lag::{desired_replicas, DesiredInput, Estimator, Sample};
use crate::policy::{Decision, DirectPolicy, PoolState};

/// Largest number of tasks a trace may hold in total.
pub const MAX_TASKS: u64 = 5_000_000;
/// Latest arrival time accepted, seconds (a week).
pub const MAX_TIME_S: f64 = 7.0 * 86_400.0;
/// Longest service time accepted, ms (a day).
pub const MAX_SERVICE_MS: f64 = 86_400_000.0;

/// One trace row.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub time_ms: u64,
    pub pool: String,
    pub tasks: u64,
    pub service_ms: u64,
}

/// A bad trace, with the line that is wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TraceError {
    #[error(
        "trace is empty: expected the header `time,pool,tasks,service_ms` and at least one row"
    )]
    Empty,
    #[error("line 1: header must be `time,pool,tasks,service_ms`, got {0:?}")]
    Header(String),
    #[error("line {line}: {message}")]
    Row { line: usize, message: String },
    #[error("trace holds more than {MAX_TASKS} tasks")]
    TooMany,
}

/// Parse a trace.
pub fn parse_trace(text: &str) -> Result<Vec<Arrival>, TraceError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#')
    });
    let (_, header) = lines.next().ok_or(TraceError::Empty)?;
    let cols: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    if cols != ["time", "pool", "tasks", "service_ms"] {
        return Err(TraceError::Header(header.chars().take(80).collect()));
    }
    let mut out = Vec::new();
    let mut total = 0u64;
    for (i, line) in lines {
        let line_no = i + 1;
        let err = |message: String| TraceError::Row {
            line: line_no,
            message,
        };
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 4 {
            return Err(err(format!(
                "expected 4 fields (time,pool,tasks,service_ms), got {}",
                f.len()
            )));
        }
        let time: f64 = f[0]
            .parse()
            .map_err(|_| err(format!("time {:?} is not a number", short(f[0]))))?;
        if !(time.is_finite() && (0.0..=MAX_TIME_S).contains(&time)) {
            return Err(err(format!(
                "time {time} must be between 0 and {MAX_TIME_S} seconds"
            )));
        }
        if !taskbus_proto::ids::is_valid_pool(f[1]) {
            return Err(err(format!(
                "pool {:?} is not a valid pool name (a DNS label)",
                short(f[1])
            )));
        }
        let tasks: u64 = f[2]
            .parse()
            .map_err(|_| err(format!("tasks {:?} is not a whole number", short(f[2]))))?;
        let service: f64 = f[3]
            .parse()
            .map_err(|_| err(format!("service_ms {:?} is not a number", short(f[3]))))?;
        if !(service.is_finite() && service > 0.0 && service <= MAX_SERVICE_MS) {
            return Err(err(format!(
                "service_ms {service} must be above 0 and at most {MAX_SERVICE_MS}"
            )));
        }
        total = total.saturating_add(tasks);
        if total > MAX_TASKS {
            return Err(TraceError::TooMany);
        }
        out.push(Arrival {
            time_ms: (time * 1000.0).round() as u64,
            pool: f[1].to_string(),
            tasks,
            service_ms: service.round().max(1.0) as u64,
        });
    }
    if out.is_empty() {
        return Err(TraceError::Empty);
    }
    out.sort_by_key(|a| a.time_ms);
    Ok(out)
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Simulation knobs (pool settings plus the cluster model).
#[derive(Debug, Clone)]
pub struct SimParams {
    pub per_replica: u32,
    pub target_latency_s: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Seconds from a replica being requested to it serving.
    pub startup: Duration,
    /// taskbus direct-mode policy.
    pub policy: DirectPolicy,
    pub default_service_time: Duration,
    /// When KEDA's first 30 s poll happens after the trace starts (its phase is arbitrary; the
    /// default, half an interval, is the mean wait of a random phase).
    pub keda_phase: Duration,
}

impl Default for SimParams {
    fn default() -> Self {
        Self {
            per_replica: 4,
            target_latency_s: 10.0,
            min_replicas: 0,
            max_replicas: 50,
            startup: Duration::from_secs(5),
            policy: DirectPolicy::default(),
            default_service_time: Duration::from_secs(1),
            keda_phase: Duration::from_secs(15),
        }
    }
}

/// Which autoscaler drives the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    Taskbus,
    KedaDefault,
}

impl Model {
    pub fn name(self) -> &'static str {
        match self {
            Model::Taskbus => "taskbus",
            Model::KedaDefault => "keda-default",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub pool: String,
    pub model: Model,
    pub tasks: u64,
    pub replica_seconds: f64,
    pub p50_delay_s: f64,
    pub p99_delay_s: f64,
    pub max_delay_s: f64,
    /// Mean time from the first task of an idle (zero-replica) pool to its first serving replica.
    pub time_to_first_replica_s: Option<f64>,
    pub cold_starts: u32,
    pub max_replicas: u32,
    /// Simulated seconds until the last task finished.
    pub drained_at_s: f64,
}

const STEP_MS: u64 = 100;
const SAMPLE_MS: u64 = 250;
const DIRECT_MS: u64 = 2_000;
const KEDA_POLL_MS: u64 = 30_000;
const HPA_SYNC_MS: u64 = 15_000;
const KEDA_COOLDOWN_MS: u64 = 300_000;
const HPA_WINDOW_MS: u64 = 300_000;
const HPA_TOLERANCE: f64 = 0.1;
/// Simulated time after the last arrival before giving up (scale-down tails included).
const TAIL_MS: u64 = 3_600_000;

struct Sim<'a> {
    p: &'a SimParams,
    now: u64,
    queue: VecDeque<(u64, u64)>,
    running: BinaryHeap<Reverse<u64>>,
    /// Ready-at times of the current replicas.
    pods: Vec<u64>,
    delivered: u64,
    delays: Vec<u64>,
    replica_ms: u128,
    cold_since: Option<u64>,
    cold: Vec<u64>,
    max_pods: u32,
    last_done: u64,
}

impl Sim<'_> {
    fn ready(&self) -> usize {
        self.pods.iter().filter(|&&r| r <= self.now).count()
    }

    fn set_replicas(&mut self, n: u32) {
        let n = n as usize;
        if n > self.pods.len() {
            let at = self.now + self.p.startup.as_millis() as u64;
            self.pods.resize(n, at);
        } else {
            // Remove the youngest first (those still starting).
            self.pods.sort_unstable();
            self.pods.truncate(n);
        }
        self.max_pods = self.max_pods.max(n as u32);
    }

    fn step(&mut self) {
        while let Some(&Reverse(t)) = self.running.peek() {
            if t > self.now {
                break;
            }
            self.running.pop();
            self.last_done = self.last_done.max(t);
        }
        let ready = self.ready();
        if let Some(since) = self.cold_since {
            if ready > 0 {
                self.cold.push(self.now - since);
                self.cold_since = None;
            }
        }
        let slots = ready * self.p.per_replica.max(1) as usize;
        while self.running.len() < slots {
            let Some((arrived, service)) = self.queue.pop_front() else {
                break;
            };
            self.delays.push(self.now - arrived);
            self.running.push(Reverse(self.now + service));
            self.delivered += 1;
        }
        self.replica_ms += self.pods.len() as u128 * u128::from(STEP_MS);
    }
}

/// Run one model over one pool's arrivals (sorted by time).
pub fn run_model(pool: &str, arrivals: &[Arrival], p: &SimParams, model: Model) -> Outcome {
    let mut sim = Sim {
        p,
        now: 0,
        queue: VecDeque::new(),
        running: BinaryHeap::new(),
        pods: Vec::new(),
        delivered: 0,
        delays: Vec::new(),
        replica_ms: 0,
        cold_since: None,
        cold: Vec::new(),
        max_pods: 0,
        last_done: 0,
    };
    sim.set_replicas(p.min_replicas);
    sim.pods.iter_mut().for_each(|r| *r = 0);
    let last_arrival = arrivals.last().map_or(0, |a| a.time_ms);
    let total: u64 = arrivals.iter().map(|a| a.tasks).sum();
    let mut next = 0;
    // taskbus state
    let mut est = Estimator::new(10.0, p.default_service_time.as_secs_f64());
    let mut pstate = PoolState::default();
    // KEDA state
    let mut last_active_ms: Option<u64> = None;
    let mut recs: VecDeque<(u64, u32)> = VecDeque::new();

    loop {
        while next < arrivals.len() && arrivals[next].time_ms <= sim.now {
            let a = &arrivals[next];
            for _ in 0..a.tasks {
                sim.queue.push_back((a.time_ms, a.service_ms));
            }
            next += 1;
        }
        if sim.cold_since.is_none() && !sim.queue.is_empty() && sim.ready() == 0 {
            sim.cold_since = Some(sim.queue.front().map_or(sim.now, |q| q.0));
        }
        let work = (sim.queue.len() + sim.running.len()) as u64;
        let current = sim.pods.len() as u32;
        match model {
            Model::Taskbus => {
                if sim.now % SAMPLE_MS == 0 {
                    est.observe(Sample {
                        at_s: sim.now as f64 / 1000.0,
                        pending: sim.queue.len() as u64,
                        ack_pending: sim.running.len() as u64,
                        delivered: sim.delivered,
                    });
                }
                if sim.now % DIRECT_MS == 0 {
                    let desired = desired_replicas(&DesiredInput {
                        backlog: sim.queue.len() as u64,
                        in_flight: sim.running.len() as u64,
                        arrival_rate: est.arrival_rate(),
                        service_time_s: est.service_time().0,
                        service_time_measured: est.service_time().1,
                        per_replica: p.per_replica,
                        target_latency_s: p.target_latency_s,
                        min_replicas: p.min_replicas,
                        max_replicas: p.max_replicas,
                    });
                    let now_s = sim.now as f64 / 1000.0;
                    if let Decision::Scale { to, .. } = p.policy.decide(
                        &mut pstate,
                        current,
                        desired,
                        (p.min_replicas, p.max_replicas),
                        false,
                        now_s,
                    ) {
                        sim.set_replicas(to);
                        pstate.applied(now_s);
                    }
                }
            }
            Model::KedaDefault => {
                if work > 0 {
                    last_active_ms = Some(sim.now);
                }
                let phase = p.keda_phase.as_millis() as u64 % KEDA_POLL_MS;
                if sim.now >= phase && (sim.now - phase) % KEDA_POLL_MS == 0 {
                    if current == 0 && work > 0 {
                        sim.set_replicas(1.max(p.min_replicas));
                    } else if current > 0 && p.min_replicas == 0 && work == 0 {
                        let idle_for = last_active_ms.map_or(u64::MAX, |t| sim.now - t);
                        if idle_for >= KEDA_COOLDOWN_MS {
                            sim.set_replicas(0);
                            recs.clear();
                        }
                    }
                }
                let current = sim.pods.len() as u32;
                if sim.now % HPA_SYNC_MS == 0 && current > 0 {
                    let c = f64::from(p.per_replica.max(1));
                    let ratio = work as f64 / (f64::from(current) * c);
                    let mut rec = if (ratio - 1.0).abs() <= HPA_TOLERANCE {
                        current
                    } else {
                        (work as f64 / c).ceil() as u32
                    };
                    let hpa_min = p.min_replicas.max(1);
                    rec = rec.clamp(hpa_min, p.max_replicas.max(hpa_min));
                    recs.push_back((sim.now, rec));
                    while recs
                        .front()
                        .is_some_and(|(t, _)| sim.now - t > HPA_WINDOW_MS)
                    {
                        recs.pop_front();
                    }
                    let target = if rec > current {
                        rec.min(current + 4.max(current))
                    } else {
                        // Scale down to the highest recommendation in the window.
                        recs.iter().map(|r| r.1).max().unwrap_or(rec).min(current)
                    };
                    if target != current {
                        sim.set_replicas(target);
                    }
                }
            }
        }
        sim.step();
        sim.now += STEP_MS;
        let idle = next >= arrivals.len() && sim.queue.is_empty() && sim.running.is_empty();
        if (idle && sim.pods.len() as u32 <= p.min_replicas) || sim.now > last_arrival + TAIL_MS {
            break;
        }
    }
    let mut d = sim.delays.clone();
    d.sort_unstable();
    let pct = |q: f64| -> f64 {
        if d.is_empty() {
            return 0.0;
        }
        let i = ((q * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1;
        d[i] as f64 / 1000.0
    };
    Outcome {
        pool: pool.to_string(),
        model,
        tasks: total,
        replica_seconds: sim.replica_ms as f64 / 1000.0,
        p50_delay_s: pct(0.50),
        p99_delay_s: pct(0.99),
        max_delay_s: d.last().map_or(0.0, |&x| x as f64 / 1000.0),
        time_to_first_replica_s: (!sim.cold.is_empty())
            .then(|| sim.cold.iter().sum::<u64>() as f64 / sim.cold.len() as f64 / 1000.0),
        cold_starts: sim.cold.len() as u32,
        max_replicas: sim.max_pods,
        drained_at_s: sim.last_done as f64 / 1000.0,
    }
}

/// Run both models for every pool of the trace.
pub fn simulate(arrivals: &[Arrival], p: &SimParams) -> Vec<Outcome> {
    let mut pools: Vec<&str> = arrivals.iter().map(|a| a.pool.as_str()).collect();
    pools.sort_unstable();
    pools.dedup();
    let mut out = Vec::new();
    for pool in pools {
        let mine: Vec<Arrival> = arrivals
            .iter()
            .filter(|a| a.pool == pool)
            .cloned()
            .collect();
        for m in [Model::Taskbus, Model::KedaDefault] {
            out.push(run_model(pool, &mine, p, m));
        }
    }
    out
}

/// A Markdown table of outcomes.
pub fn render(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| pool | model | tasks | replica-seconds | p50 delay s | p99 delay s | max delay s | time to first replica s (cold starts) | max replicas |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in outcomes {
        let ttfr = o
            .time_to_first_replica_s
            .map_or("-".to_string(), |t| format!("{t:.1} ({})", o.cold_starts));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} |",
            o.pool,
            o.model.name(),
            o.tasks,
            o.replica_seconds,
            o.p50_delay_s,
            o.p99_delay_s,
            o.max_delay_s,
            ttfr,
            o.max_replicas
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_traces() {
        let t = parse_trace(
            "# comment\ntime,pool,tasks,service_ms\n\n2,cpu,3,500\n0.5, gpu ,1,1000.4\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            Arrival {
                time_ms: 500,
                pool: "gpu".into(),
                tasks: 1,
                service_ms: 1000
            }
        );
        assert_eq!(t[1].time_ms, 2000);
    }

    #[test]
    fn hostile_traces() {
        let h = "time,pool,tasks,service_ms\n";
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "empty"),
            ("time,pool\n".into(), "header"),
            (h.into(), "empty"),
            (format!("{h}1,cpu,3\n"), "line 2: expected 4 fields"),
            (format!("{h}x,cpu,3,5\n"), "line 2: time \"x\""),
            (format!("{h}NaN,cpu,3,5\n"), "must be between"),
            (format!("{h}-1,cpu,3,5\n"), "must be between"),
            (format!("{h}1e12,cpu,3,5\n"), "must be between"),
            (format!("{h}1,CPU!,3,5\n"), "not a valid pool name"),
            (format!("{h}1,cpu,-3,5\n"), "not a whole number"),
            (format!("{h}1,cpu,2.5,5\n"), "not a whole number"),
            (format!("{h}1,cpu,3,0\n"), "must be above 0"),
            (format!("{h}1,cpu,3,inf\n"), "must be above 0"),
            (format!("{h}1,cpu,3,1e99\n"), "must be above 0"),
            (format!("{h}1,cpu,99999999999,5\n"), "more than"),
            (format!("{h}1,cpu,3,5,6\n"), "expected 4 fields"),
        ];
        for (text, want) in cases {
            let e = parse_trace(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    fn steady(secs: u64, per_s: u64, service_ms: u64) -> Vec<Arrival> {
        (0..secs)
            .map(|t| Arrival {
                time_ms: t * 1000,
                pool: "p".into(),
                tasks: per_s,
                service_ms,
            })
            .collect()
    }

    #[test]
    fn every_task_runs_and_capacity_matches_load() {
        // 8 tasks/s × 2 s = 16 in flight = 4 replicas of 4 at steady state.
        let a = steady(600, 8, 2000);
        for m in [Model::Taskbus, Model::KedaDefault] {
            let o = run_model("p", &a, &SimParams::default(), m);
            assert_eq!(o.tasks, 4800);
            assert!(o.max_replicas >= 4, "{m:?}: {o:?}");
            assert!(o.drained_at_s >= 600.0, "{m:?}: {o:?}");
            assert_eq!(o.cold_starts, 1, "{m:?}: {o:?}");
        }
    }

    #[test]
    fn taskbus_starts_faster_than_keda_polling() {
        let mut a = steady(120, 2, 1000);
        a.iter_mut().for_each(|x| x.time_ms += 46_000);
        let p = SimParams::default();
        let t = run_model("p", &a, &p, Model::Taskbus);
        let k = run_model("p", &a, &p, Model::KedaDefault);
        let (tt, kt) = (
            t.time_to_first_replica_s.unwrap(),
            k.time_to_first_replica_s.unwrap(),
        );
        // taskbus: ≤ 2 s decision + 5 s start-up; KEDA: up to 30 s poll + 5 s.
        assert!(tt <= 7.5, "{tt}");
        assert!(kt > tt + 10.0, "{kt} vs {tt}");
        assert!(t.p99_delay_s < k.p99_delay_s, "{t:?} {k:?}");
    }

    #[test]
    fn render_has_a_row_per_pool_and_model() {
        let mut a = steady(10, 1, 100);
        a.extend(steady(10, 1, 100).into_iter().map(|mut x| {
            x.pool = "q".into();
            x
        }));
        let out = simulate(&a, &SimParams::default());
        assert_eq!(out.len(), 4);
        let table = render(&out);
        assert_eq!(table.lines().count(), 6);
        assert!(table.contains("| q | keda-default |"));
    }
}
