//! `taskbus dev`: the whole stack in one process, with a live status line.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use taskbus_agent::handlers::Demo;
use taskbus_agent::{Agent, AgentConfig};
use taskbus_proto::Subjects;
use taskbus_runtime::nats::{redact_url, NatsAuth};
use taskbus_runtime::{CancellationToken, TaskTracker};

/// The ledger account `taskbus dev` funds and charges for priced demo tasks.
const DEMO_PAYER: &str = "demo";

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// PostgreSQL URL; without it a private PostgreSQL is started in a temp dir.
    #[arg(long, env = "TASKBUS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Demo agents (echo handler) on pool `default`.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// Tasks each demo agent runs at once.
    #[arg(long, default_value_t = 8)]
    pub agent_concurrency: usize,
    /// Demo tasks per second submitted to pool `default` (0 = none).
    #[arg(long, default_value_t = 5.0)]
    pub demo_rate: f64,
    /// Run the GPU dispatcher on pool `gpu` with this many declared GPUs (no real GPU needed;
    /// 0 = none). Its task kinds: `gpu-env` (prints the GPUs the task was given) and `sleep`
    /// (payload `{"args": ["2"]}` sleeps 2 s on its GPUs).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub gpus: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Coordinator /healthz, /readyz, /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,
    /// Scaler's KEDA External Scaler gRPC address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub scaler_grpc_listen: SocketAddr,
    /// Scaler's HTTP address (/v1/lag, /metrics, external metrics API).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub scaler_http_listen: SocketAddr,
    /// Write a Prometheus configuration that scrapes every service of this stack, under the job
    /// names deploy/monitoring/ expects, to FILE. Then run `prometheus --config.file=FILE` and
    /// import deploy/monitoring/dashboards/taskbus.json into Grafana (docs/MONITORING.md).
    #[arg(long, value_name = "FILE")]
    pub prometheus_config: Option<PathBuf>,
}

pub async fn run(
    args: DevArgs,
    nats_url: Option<String>,
    nats_auth: &NatsAuth,
    prefix: &str,
) -> anyhow::Result<()> {
    if !(args.demo_rate.is_finite() && (0.0..=100_000.0).contains(&args.demo_rate)) {
        anyhow::bail!("--demo-rate must be between 0 and 100000 tasks per second");
    }
    if let Some(dir) = args.prometheus_config.as_deref().and_then(|p| p.parent()) {
        if !(dir.as_os_str().is_empty() || dir.is_dir()) {
            anyhow::bail!(
                "--prometheus-config: directory {} does not exist; create it or choose another file",
                dir.display()
            );
        }
    }
    let started = Instant::now();
    let local = crate::local::ensure(nats_url, nats_auth, args.database_url.clone(), true).await?;
    let (nats_url, database_url) = (local.nats_url.clone(), local.database_url.clone());
    let auth = &local.nats_auth;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();

    let mut cfg = taskbus_coordinator::Config::new(nats_url.clone(), database_url.clone());
    cfg.nats_auth = auth.clone();
    cfg.prefix = prefix.to_string();
    cfg.http_listen = Some(args.http_listen);
    if args.gpus > 0 {
        cfg.ensure_pools.push(DEV_GPU_POOL.into());
    }
    let coordinator = taskbus_coordinator::start(cfg, shutdown.clone())
        .await
        .context("coordinator failed to start")?;
    let http = coordinator.http_addr;
    tracker.spawn(coordinator.wait());
    // Every service's /metrics, by the job name the alerts and the dashboard expect.
    let mut scrape: Vec<(&str, SocketAddr)> = Vec::new();
    scrape.extend(http.map(|a| ("taskbus-coordinator", a)));

    let mut lc = taskbus_ledger::Config::new(nats_url.clone(), database_url.clone());
    lc.nats_auth = auth.clone();
    lc.prefix = prefix.to_string();
    lc.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let ledger = taskbus_ledger::start(lc, shutdown.clone())
        .await
        .context("payment ledger failed to start")?;
    // Fund the demo payer once (a fixed idempotency key: restarts do not deposit again).
    ledger
        .ledger()
        .deposit(&taskbus_ledger::api::MoveRequest {
            account: DEMO_PAYER.into(),
            amount: "1000.00".into(),
            currency: Some("USD".into()),
            key: Some("dev-demo-funding".into()),
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot fund the demo payer: {e}"))?;
    let ledger_handle = ledger.ledger().clone();
    scrape.extend(ledger.http_addr.map(|a| ("taskbus-ledger", a)));
    tracker.spawn(ledger.wait());

    let mut sc = taskbus_scaler::Config::new(nats_url.clone());
    sc.nats_auth = auth.clone();
    sc.prefix = prefix.to_string();
    sc.grpc_listen = args.scaler_grpc_listen;
    sc.http_listen = args.scaler_http_listen;
    let scaler = taskbus_scaler::start(sc, shutdown.clone())
        .await
        .context("scaler failed to start")?;
    let (scaler_grpc, scaler_http) = (scaler.grpc_addr, scaler.http_addr);
    scrape.push(("taskbus-scaler", scaler_http));
    tracker.spawn(scaler.wait());

    for i in 0..args.agents {
        let mut ac = AgentConfig::new(nats_url.clone(), "default");
        ac.nats_auth = auth.clone();
        ac.prefix = prefix.to_string();
        ac.agent_id = format!("dev-agent-{}", i + 1);
        ac.concurrency = args.agent_concurrency.max(1);
        ac.grace = Duration::from_secs(5);
        let addr = metrics_port()?;
        ac.http_listen = Some(addr);
        scrape.push(("taskbus-agent", addr));
        let agent = Agent::new(ac, |t| Demo::Echo.run(t));
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = agent.run(sd).await {
                eprintln!("agent stopped: {e}");
            }
        });
    }

    if args.gpus > 0 {
        let mut dc = dev_gpu_dispatcher(&nats_url, auth, prefix, args.gpus);
        let addr = metrics_port()?;
        dc.http_listen = Some(addr);
        scrape.push(("taskbus-gpu-dispatcher", addr));
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = taskbus_gpu_dispatcher::dispatcher::run(dc, sd).await {
                eprintln!("GPU dispatcher stopped: {e}");
            }
        });
    }

    let client = taskbus_runtime::nats::connect(&nats_url, auth, "taskbus-dev").await?;
    let js = jetstream::new(client.clone());
    if args.demo_rate > 0.0 {
        tracker.spawn(demo_load(
            js.clone(),
            Subjects::new(prefix),
            args.demo_rate,
            shutdown.clone(),
        ));
    }
    tracker.close();

    eprintln!(
        "\ntaskbus dev is up in {:.1} s: coordinator, payment ledger, scaler, {} agent(s) on pool `default`, demo load {}/s (every other task priced 0.25 USD, paid by `{DEMO_PAYER}`)",
        started.elapsed().as_secs_f64(),
        args.agents,
        args.demo_rate
    );
    eprintln!(
        "  metrics: {}",
        scrape
            .iter()
            .map(|(job, a)| format!("{} http://{a}/metrics", job.trim_start_matches("taskbus-")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &args.prometheus_config {
        std::fs::write(path, prometheus_config(&scrape)).with_context(|| {
            format!(
                "cannot write the Prometheus configuration to {}",
                path.display()
            )
        })?;
        eprintln!(
            "  Prometheus: prometheus --config.file={} (then import deploy/monitoring/dashboards/taskbus.json into Grafana)",
            path.display()
        );
    }
    eprintln!("  scaler: KEDA external scaler gRPC {scaler_grpc}, lag http://{scaler_http}/v1/lag");
    if args.gpus > 0 {
        eprintln!(
            "  GPU dispatcher: pool `{DEV_GPU_POOL}`, {} declared GPU(s); try: taskbus submit --pool {DEV_GPU_POOL} --kind gpu-env --wait",
            args.gpus
        );
    }
    eprintln!("  in another shell:");
    eprintln!("    export TASKBUS_NATS_URL={}", redact_url(&nats_url));
    eprintln!("    nats pub {prefix}.submit.default '{{\"kind\":\"echo\",\"payload\":{{\"x\":1}}}}'   # or: taskbus submit --kind echo --wait");
    eprintln!("    taskbus tasks list");
    eprintln!("    taskbus ledger balance {DEMO_PAYER}; taskbus ledger balance platform; taskbus ledger accounts --kind agent");
    eprintln!("  Ctrl-C stops everything.\n");

    let db = taskbus_runtime::db::connect(&database_url, 2).await?;
    let stop_at = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let status = status_line(
        &js,
        &db,
        &ledger_handle,
        Subjects::new(prefix),
        shutdown.clone(),
    );
    tokio::select! {
        _ = taskbus_runtime::cancel_on_signal(shutdown.clone()) => {}
        _ = async { match stop_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
        _ = status => {}
    }
    shutdown.cancel();
    eprintln!("\nstopping…");
    tracker.wait().await;
    Ok(())
}

/// A free loopback port for a service that does not report the address it bound (the agents and
/// the GPU dispatcher).
fn metrics_port() -> anyhow::Result<SocketAddr> {
    let port = taskbus_runtime::devservers::free_port().context("no free port for /metrics")?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A Prometheus configuration scraping `targets` every 5 s, one job per name.
fn prometheus_config(targets: &[(&str, SocketAddr)]) -> String {
    let mut jobs: Vec<(&str, Vec<String>)> = Vec::new();
    for (job, addr) in targets {
        let target = format!("\"{addr}\"");
        match jobs.iter_mut().find(|(j, _)| j == job) {
            Some((_, t)) => t.push(target),
            None => jobs.push((job, vec![target])),
        }
    }
    let mut out = String::from(
        "# Written by `taskbus dev --prometheus-config`: every service of that stack, under the\n\
         # job names of deploy/monitoring/. The ports change with each run.\n\
         global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nscrape_configs:\n",
    );
    for (job, t) in jobs {
        out.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            t.join(", ")
        ));
    }
    out
}

/// The pool of `taskbus dev --gpus`.
const DEV_GPU_POOL: &str = "gpu";

/// The GPU dispatcher of `taskbus dev --gpus N`: N declared GPUs, the local backend, and two
/// harmless programs.
fn dev_gpu_dispatcher(
    nats_url: &str,
    auth: &NatsAuth,
    prefix: &str,
    gpus: u32,
) -> taskbus_gpu_dispatcher::dispatcher::DispatcherConfig {
    use taskbus_gpu_dispatcher::allocator::PoolQuota;
    use taskbus_gpu_dispatcher::dispatcher::{Backend, DispatcherConfig, GpuSource};
    use taskbus_gpu_dispatcher::local::LocalConfig;
    let programs = [
        (
            "gpu-env",
            &[
                "printenv",
                "CUDA_VISIBLE_DEVICES",
                "TASKBUS_TASK_ID",
                "TASKBUS_ATTEMPT",
            ][..],
        ),
        ("sleep", &["sleep"][..]),
    ]
    .into_iter()
    .map(|(k, argv)| (k.to_string(), argv.iter().map(|a| a.to_string()).collect()))
    .collect();
    let mut c = DispatcherConfig::new(
        nats_url,
        vec![PoolQuota {
            pool: DEV_GPU_POOL.into(),
            quota: None,
        }],
        Backend::Local(LocalConfig {
            programs,
            ..LocalConfig::default()
        }),
    );
    c.nats_auth = auth.clone();
    c.prefix = prefix.to_string();
    c.agent_id = "dev-gpu-dispatcher".into();
    c.gpus = GpuSource::Declared(taskbus_gpu_dispatcher::inventory::declared(
        gpus,
        Some("dev-gpu"),
        None,
    ));
    c.grace = Duration::from_secs(5);
    c
}

async fn demo_load(
    js: jetstream::Context,
    subjects: Subjects,
    rate: f64,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let body = if n.is_multiple_of(2) {
            serde_json::json!({ "kind": "echo", "payload": { "demo": n }, "price": "0.25", "payer": DEMO_PAYER, "currency": "USD" })
        } else {
            serde_json::json!({ "kind": "echo", "payload": { "demo": n } })
        };
        if let Ok(f) = js
            .publish(subjects.submit("default"), body.to_string().into())
            .await
        {
            drop(f);
        }
    }
}

/// How long to wait before counting the task table again, after a count that took `took`: once
/// a second while counting is cheap, and never more than about 5 % of the time, so a status line
/// against a large shared database does not keep a core of it busy.
fn count_interval(took: Duration) -> Duration {
    (took * 20).max(Duration::from_secs(1))
}

/// Tasks in `status`, over all pools, from `store::counts` rows `(pool, status, n)`.
fn total(counts: &[(String, String, i64)], status: &str) -> i64 {
    counts.iter().filter(|c| c.1 == status).map(|c| c.2).sum()
}

/// Prints tasks/s and per-pool backlog every second until shutdown.
async fn status_line(
    js: &jetstream::Context,
    db: &sqlx::PgPool,
    ledger: &taskbus_ledger::Ledger,
    subjects: Subjects,
    shutdown: CancellationToken,
) {
    let tty = std::io::stderr().is_terminal();
    let mut last_done: Option<(i64, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    let mut counts = Vec::new();
    let mut rate = 0.0;
    let mut next_count = tokio::time::Instant::now();
    loop {
        let tick_at = tokio::select! {
            _ = shutdown.cancelled() => return,
            at = tick.tick() => at,
        };
        n += 1;
        // The counts scan the whole task table: against a big shared database they are taken
        // less often (see `count_interval`), and the line shows the latest ones meanwhile.
        if tick_at >= next_count {
            let t = Instant::now();
            let fresh = taskbus_coordinator::store::counts(db).await;
            next_count = tick_at + count_interval(t.elapsed());
            if let Ok(fresh) = fresh {
                counts = fresh;
                let done = total(&counts, "succeeded");
                if let Some((d, at)) = last_done {
                    rate = (done - d) as f64 / at.elapsed().as_secs_f64();
                }
                last_done = Some((done, Instant::now()));
            }
        }
        let done = total(&counts, "succeeded");
        let mut pools: Vec<String> = counts.iter().map(|c| c.0.clone()).collect();
        pools.sort();
        pools.dedup();
        let mut backlog = Vec::new();
        for p in pools
            .iter()
            .filter(|p| taskbus_proto::ids::is_valid_pool(p))
        {
            let (mut queued, mut running, mut found) = (0, 0, false);
            for prio in taskbus_proto::Priority::ALL {
                if let Ok(mut c) = js
                    .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                        subjects.work_consumer(p, prio),
                        subjects.work_stream(),
                    )
                    .await
                {
                    if let Ok(i) = c.info().await {
                        queued += i.num_pending;
                        running += i.num_ack_pending;
                        found = true;
                    }
                }
            }
            if found {
                backlog.push(format!("{p}: {queued} queued/{running} running"));
            }
        }
        let demo = ledger
            .balance(DEMO_PAYER, Some("USD"))
            .await
            .ok()
            .and_then(|b| b.balances.first().map(|b| b.available.clone()))
            .unwrap_or_else(|| "-".into());
        let line = format!(
            "{:>7.1} tasks/s | succeeded {} dead {} rejected {} | backlog {} | {DEMO_PAYER} {demo} USD",
            rate,
            done,
            total(&counts, "dead"),
            total(&counts, "rejected"),
            if backlog.is_empty() { "-".into() } else { backlog.join(", ") }
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if n % 5 == 1 {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_counts_are_taken_less_often() {
        // (how long a count took, ms; how long until the next one, ms)
        for (took, wait) in [(3, 1000), (50, 1000), (150, 3000), (2000, 40_000)] {
            assert_eq!(
                count_interval(Duration::from_millis(took)),
                Duration::from_millis(wait)
            );
        }
    }
}
