//! `taskbus bench`: end-to-end throughput and latency, beside a raw JetStream baseline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer, stream};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use taskbus_agent::{Agent, AgentConfig, TaskContext, TaskError};
use taskbus_proto::Subjects;
use taskbus_runtime::nats::{redact_url, NatsAuth};
use taskbus_runtime::{CancellationToken, TaskTracker};

use crate::local::Local;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// No-op tasks to push through.
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// In-process agents.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// Tasks each agent runs at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Offered load in tasks/s (0 = as fast as possible). Latency figures mean most at a rate
    /// the system sustains, e.g. --rate 2000.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// PostgreSQL to use (default: start a private one).
    #[arg(long, env = "TASKBUS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Admission batches the coordinator has in progress at once (1 = one after the other).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub admission_pipeline: u32,
    /// Write each task's publish, admission, start and completion times (ms since the run
    /// began) to this CSV file, to see when and where slow tasks lost time. Turns on the
    /// coordinator's `admitted` events (one more core NATS message per task).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<std::path::PathBuf>,
    /// Skip the raw JetStream baselines.
    #[arg(long)]
    pub no_baseline: bool,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Figures {
    name: String,
    tasks: usize,
    offered_rate: f64,
    seconds: f64,
    per_second: f64,
    p50_start_ms: Option<f64>,
    p99_start_ms: Option<f64>,
    p50_complete_ms: f64,
    p99_complete_ms: f64,
    /// Seconds until the coordinator had recorded every outcome in PostgreSQL (taskbus only):
    /// the rate the whole system sustained, not just the rate agents reported successes.
    #[serde(skip_serializing_if = "Option::is_none")]
    recorded_seconds: Option<f64>,
}

/// Unacknowledged publishes in flight (async-nats allows 5,000 per JetStream context).
const WINDOW: usize = 4000;

/// `nats_url`: the server to use when the user named one (default: start a private one).
pub async fn run(
    args: BenchArgs,
    nats_url: Option<String>,
    nats_auth: &NatsAuth,
    prefix: &str,
) -> anyhow::Result<()> {
    if args.tasks == 0 || args.tasks > 10_000_000 {
        bail!("--tasks must be between 1 and 10000000");
    }
    if args.agents == 0 || args.concurrency == 0 {
        bail!("--agents and --concurrency must be at least 1");
    }
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        bail!("--rate must be a non-negative number");
    }
    let local = crate::local::ensure(nats_url, nats_auth, args.database_url.clone(), false).await?;
    eprintln!(
        "bench: nats {}, postgres {}",
        redact_url(&local.nats_url),
        local.database_url
    );
    let taskbus = run_taskbus(&args, &local, prefix).await?;
    let baseline = if args.no_baseline {
        vec![]
    } else {
        vec![
            run_baseline(&args, &local, 1).await?,
            run_baseline(&args, &local, 3).await?,
        ]
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "taskbus": taskbus, "jetstream_baseline": baseline })
            )?
        );
    } else {
        println!(
            "{:<40} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}",
            "", "tasks", "per sec", "p50 start", "p99 start", "p50 done", "p99 done"
        );
        for f in std::iter::once(&taskbus).chain(baseline.iter()) {
            let ms = |v: Option<f64>| v.map(|v| format!("{v:.2}ms")).unwrap_or_else(|| "-".into());
            println!(
                "{:<40} {:>8} {:>10.0} {:>9} {:>9} {:>9} {:>9}",
                f.name,
                f.tasks,
                f.per_second,
                ms(f.p50_start_ms),
                ms(f.p99_start_ms),
                ms(Some(f.p50_complete_ms)),
                ms(Some(f.p99_complete_ms))
            );
        }
        if let Some(r) = taskbus.recorded_seconds {
            println!(
                "{:<40} {:>8} {:>10.0}  (every outcome in PostgreSQL after {r:.2} s)",
                "taskbus, outcomes recorded",
                taskbus.tasks,
                taskbus.tasks as f64 / r
            );
        }
        if args.rate > 0.0 {
            println!("offered load: {} tasks/s", args.rate);
        }
    }
    Ok(())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bar(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Publish `n` messages produced by `body(i)` to `subject(i)`, paced at `rate` (0 = flat out),
/// keeping up to WINDOW acks in flight; records each publish time (ns since `t0`).
async fn publish_all(
    js: &jetstream::Context,
    n: usize,
    rate: f64,
    t0: Instant,
    sent: &[AtomicU64],
    subject: impl Fn(usize) -> String,
    body: impl Fn(usize) -> Vec<u8>,
) -> anyhow::Result<()> {
    let mut acks = FuturesUnordered::new();
    for (i, slot) in sent.iter().enumerate().take(n) {
        if rate > 0.0 {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        while acks.len() >= WINDOW {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
        slot.store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let f = js.publish(subject(i), body(i).into()).await?;
        acks.push(async move { f.await.map(|_| ()) });
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(())
}

fn index_of(token: &str) -> Option<usize> {
    token.rsplit('-').next()?.parse().ok()
}

/// Record the first time an event for task `<run>-<i>` (4th subject token) arrived; true when
/// this was the first time.
fn stamp(subject: &str, run: &str, times: &[AtomicU64], t0: Instant) -> bool {
    let now = t0.elapsed().as_nanos() as u64;
    subject
        .split('.')
        .nth(3)
        .filter(|id| id.starts_with(run))
        .and_then(index_of)
        .and_then(|i| times.get(i))
        .is_some_and(|slot| {
            slot.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        })
}

async fn run_taskbus(args: &BenchArgs, local: &Local, prefix: &str) -> anyhow::Result<Figures> {
    let (nats_url, database_url) = (local.nats_url.as_str(), local.database_url.as_str());
    let n = args.tasks;
    let run_id = ulid::Ulid::new().to_string().to_lowercase();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut cfg = taskbus_coordinator::Config::new(nats_url, database_url);
    cfg.nats_auth = local.nats_auth.clone();
    cfg.prefix = prefix.to_string();
    cfg.ensure_pools = vec!["bench".into()];
    cfg.publish_admitted = args.csv.is_some();
    cfg.admission_pipeline = args.admission_pipeline as usize;
    let coord = taskbus_coordinator::start(cfg, shutdown.clone()).await?;
    tracker.spawn(coord.wait());
    for a in 0..args.agents {
        let mut ac = AgentConfig::new(nats_url, "bench");
        ac.nats_auth = local.nats_auth.clone();
        ac.prefix = prefix.to_string();
        ac.agent_id = format!("bench-agent-{a}");
        ac.concurrency = args.concurrency;
        let agent = Agent::new(ac, |_t: TaskContext| async {
            Ok::<_, TaskError>(serde_json::Value::Null)
        });
        let sd = shutdown.clone();
        tracker.spawn(async move {
            let _ = agent.run(sd).await;
        });
    }
    tracker.close();

    let subjects = Subjects::new(prefix);
    let client =
        taskbus_runtime::nats::connect(nats_url, &local.nats_auth, "taskbus-bench").await?;
    let js = jetstream::new(client.clone());
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let sub_admitted = match args.csv {
        Some(_) => Some(
            client
                .subscribe(format!("{}.events.bench.*.admitted", subjects.prefix()))
                .await?,
        ),
        None => None,
    };
    let mut sub_started = client
        .subscribe(format!("{}.events.bench.*.started", subjects.prefix()))
        .await?;
    let mut sub_done = client
        .subscribe(format!("{}.events.bench.*.succeeded", subjects.prefix()))
        .await?;
    let t0 = Instant::now();
    let pb = bar(n, "taskbus");
    let rid = run_id.clone();
    let st = started.clone();
    let ad = admitted.clone();
    let rid_ad = run_id.clone();
    let started_rx = async move {
        let admitted_rx = async move {
            if let Some(mut sub) = sub_admitted {
                while let Some(m) = sub.next().await {
                    stamp(&m.subject, &rid_ad, &ad, t0);
                }
            }
        };
        let started_rx = async move {
            while let Some(m) = sub_started.next().await {
                stamp(&m.subject, &rid, &st, t0);
            }
        };
        tokio::join!(admitted_rx, started_rx);
    };
    let rid = run_id.clone();
    let dn = done.clone();
    let pb2 = pb.clone();
    let done_rx = async move {
        let mut count = 0usize;
        while let Some(m) = sub_done.next().await {
            if stamp(&m.subject, &rid, &dn, t0) {
                count += 1;
                pb2.inc(1);
                if count == n {
                    return;
                }
            }
        }
    };
    let submit_subject = subjects.submit("bench");
    let publish = publish_all(
        &js,
        n,
        args.rate,
        t0,
        &sent,
        |_| submit_subject.clone(),
        |i| format!(r#"{{"kind":"noop","id":"{run_id}-{i}","payload":{{"i":{i}}}}}"#).into_bytes(),
    );
    let stop_rx = CancellationToken::new();
    let (p, _, finished) = tokio::join!(publish, started_rx_until(started_rx, &stop_rx), async {
        let r = tokio::time::timeout(Duration::from_secs(600), done_rx).await;
        stop_rx.cancel();
        r
    });
    // The run is over when the coordinator has recorded every outcome, not when the agents
    // reported them: a coordinator that falls behind is not sustaining the rate.
    let recorded = match (&p, &finished) {
        (Ok(()), Ok(())) => Some(wait_recorded(database_url, &run_id, n, t0).await?),
        _ => None,
    };
    p?;
    pb.finish();
    shutdown.cancel();
    tracker.wait().await;
    finished.context("not every task completed within 600 s")?;

    if let Some(path) = &args.csv {
        let mut out = String::from("task,published_ms,admitted_ms,started_ms,done_ms\n");
        for i in 0..n {
            let ms = |v: &AtomicU64| match v.load(Ordering::Relaxed) {
                0 => String::new(),
                ns => format!("{:.3}", ns as f64 / 1e6),
            };
            out.push_str(&format!(
                "{i},{},{},{},{}\n",
                ms(&sent[i]),
                ms(&admitted[i]),
                ms(&started[i]),
                ms(&done[i])
            ));
        }
        std::fs::write(path, out)
            .with_context(|| format!("cannot write the CSV file {}", path.display()))?;
    }
    let mut start_lat = Vec::with_capacity(n);
    let mut done_lat = Vec::with_capacity(n);
    let mut last = 0u64;
    for i in 0..n {
        let s = sent[i].load(Ordering::Relaxed);
        let b = started[i].load(Ordering::Relaxed);
        let d = done[i].load(Ordering::Relaxed);
        if b > 0 {
            start_lat.push((b.saturating_sub(s)) as f64 / 1e6);
        }
        done_lat.push((d.saturating_sub(s)) as f64 / 1e6);
        last = last.max(d);
    }
    start_lat.sort_by(f64::total_cmp);
    done_lat.sort_by(f64::total_cmp);
    let secs = last as f64 / 1e9;
    Ok(Figures {
        name: "taskbus submit→agent→succeeded".into(),
        tasks: n,
        offered_rate: args.rate,
        seconds: secs,
        per_second: n as f64 / secs,
        p50_start_ms: (!start_lat.is_empty()).then(|| pct(&start_lat, 0.5)),
        p99_start_ms: (!start_lat.is_empty()).then(|| pct(&start_lat, 0.99)),
        p50_complete_ms: pct(&done_lat, 0.5),
        p99_complete_ms: pct(&done_lat, 0.99),
        recorded_seconds: recorded,
    })
}

/// Wait until the coordinator has recorded all `n` tasks of the run as succeeded; returns the
/// seconds since `t0`.
async fn wait_recorded(
    database_url: &str,
    run_id: &str,
    n: usize,
    t0: Instant,
) -> anyhow::Result<f64> {
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .context("cannot connect to PostgreSQL to see the recorded outcomes")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // The run's ids all start with the run id; the primary key serves the prefix range.
        let recorded: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM coordinator.tasks
             WHERE task_id >= $1 AND task_id < $2 AND status = 'succeeded'",
        )
        .bind(format!("{run_id}-"))
        .bind(format!("{run_id}."))
        .fetch_one(&db)
        .await?;
        if recorded as usize >= n {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("only {recorded} of {n} outcomes recorded after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `started` receiver until shutdown (it has no natural end).
async fn started_rx_until(f: impl std::future::Future<Output = ()>, shutdown: &CancellationToken) {
    tokio::select! {
        _ = f => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Raw JetStream: durable publish to a file-backed work-queue stream, consumed and acked by a
/// pull consumer: the floor of what a durable task queue costs on this machine. With more
/// than one hop the message is relayed through that many work queues, each relay publishing to the
/// next hop and acking only after the publish is acknowledged (in batches, as the coordinator
/// does): taskbus's path has three such durable hops (submit, work, outcome).
async fn run_baseline(args: &BenchArgs, local: &Local, hops: usize) -> anyhow::Result<Figures> {
    let n = args.tasks;
    let client =
        taskbus_runtime::nats::connect(&local.nats_url, &local.nats_auth, "taskbus-bench-baseline")
            .await?;
    let js = jetstream::new(client.clone());
    let id = ulid::Ulid::new().to_string();
    let name = format!("BENCH_RAW_{id}");
    let hop_subject = |k: usize| format!("benchraw.{id}.{k}");
    let st = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("benchraw.{id}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let mut consumers = Vec::with_capacity(hops);
    for k in 1..=hops {
        consumers.push(
            st.create_consumer(consumer::pull::Config {
                durable_name: Some(format!("bench-{k}")),
                filter_subject: hop_subject(k),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await?,
        );
    }
    let c = consumers.pop().context("at least one hop")?;
    let relays = consumers.into_iter().enumerate().map(|(k, c)| {
        let js = js.clone();
        let next = hop_subject(k + 2);
        async move {
            let msgs = c.stream().max_messages_per_batch(1000).messages().await?;
            let mut chunks = msgs.ready_chunks(1000);
            let mut count = 0;
            while count < n {
                let Some(chunk) = chunks.next().await else {
                    break;
                };
                let chunk: Vec<_> = chunk
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut acks = Vec::with_capacity(chunk.len());
                for m in &chunk {
                    acks.push(js.publish(next.clone(), m.payload.clone()).await?);
                }
                for a in acks {
                    a.await?;
                }
                for m in &chunk {
                    m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                count += chunk.len();
            }
            anyhow::Ok(())
        }
    });
    let relays = futures::future::try_join_all(relays);
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let pb = bar(n, "jetstream");
    let dn = done.clone();
    let pb2 = pb.clone();
    let consume = async move {
        let mut msgs = c.stream().max_messages_per_batch(1000).messages().await?;
        let mut count = 0;
        while let Some(m) = msgs.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            let now = t0.elapsed().as_nanos() as u64;
            if let Ok(i) = std::str::from_utf8(
                &m.payload[..m
                    .payload
                    .iter()
                    .position(|b| *b == b' ')
                    .unwrap_or(m.payload.len())],
            )
            .unwrap_or("")
            .parse::<usize>()
            {
                if i < dn.len() {
                    dn[i].store(now, Ordering::Relaxed);
                }
            }
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            count += 1;
            pb2.inc(1);
            if count == n {
                break;
            }
        }
        anyhow::Ok(())
    };
    let first = hop_subject(1);
    let publish = publish_all(
        &js,
        n,
        args.rate,
        t0,
        &sent,
        |_| first.clone(),
        |i| format!("{i} {{\"kind\":\"noop\",\"payload\":{{\"i\":{i}}}}}").into_bytes(),
    );
    let (p, c, r) = tokio::join!(
        publish,
        tokio::time::timeout(Duration::from_secs(600), consume),
        tokio::time::timeout(Duration::from_secs(600), relays)
    );
    p?;
    c.context("baseline did not finish within 600 s")??;
    r.context("baseline relays did not finish within 600 s")??;
    pb.finish();
    let _ = js.delete_stream(&name).await;
    let mut lat: Vec<f64> = (0..n)
        .map(|i| {
            done[i]
                .load(Ordering::Relaxed)
                .saturating_sub(sent[i].load(Ordering::Relaxed)) as f64
                / 1e6
        })
        .collect();
    let last = (0..n)
        .map(|i| done[i].load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    lat.sort_by(f64::total_cmp);
    let secs = last as f64 / 1e9;
    Ok(Figures {
        name: if hops == 1 {
            "raw JetStream publish→consume+ack".into()
        } else {
            format!("raw JetStream, {hops} chained hops")
        },
        tasks: n,
        offered_rate: args.rate,
        seconds: secs,
        per_second: n as f64 / secs,
        p50_start_ms: None,
        p99_start_ms: None,
        p50_complete_ms: pct(&lat, 0.5),
        p99_complete_ms: pct(&lat, 0.99),
        recorded_seconds: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn parse(v: &[&str]) -> Result<BenchArgs, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(v.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn malformed_flags_are_refused() {
        assert!(parse(&[]).is_ok());
        for bad in [
            &["--tasks", "many"][..],
            &["--tasks", "-5"],
            &["--agents", "two"],
            &["--rate", "fast"],
            &["--admission-pipeline", "0"],
            &["--admission-pipeline", "17"],
            &["--csv"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn out_of_range_values_fail_before_anything_starts() {
        for (tasks, agents, concurrency, rate, flag) in [
            (0, 2, 256, 0.0, "--tasks"),
            (20_000_000, 2, 256, 0.0, "--tasks"),
            (10, 0, 256, 0.0, "--agents"),
            (10, 2, 0, 0.0, "--concurrency"),
            (10, 2, 256, -1.0, "--rate"),
            (10, 2, 256, f64::NAN, "--rate"),
            (10, 2, 256, f64::INFINITY, "--rate"),
        ] {
            let mut a = parse(&[]).unwrap();
            a.tasks = tasks;
            a.agents = agents;
            a.concurrency = concurrency;
            a.rate = rate;
            // A NATS URL nothing listens on: reaching it would be a bug of the check.
            let e = run(
                a,
                Some("nats://127.0.0.1:1".into()),
                &NatsAuth::default(),
                "taskbus",
            )
            .await
            .expect_err("refused")
            .to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }
}
