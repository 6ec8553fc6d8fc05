//! Ledger benchmark: settled tasks per second with `synchronous_commit = on`, beside `pgbench`
//! on the same machine in the same run.
//!
//! ```text
//! cargo run --release -p taskbus-ledger --example bench -- \
//!     --database-url postgres://taskbus:taskbus@127.0.0.1:5432/postgres --tasks 100000
//! ```
//!
//! It creates a fresh database, runs `pgbench` (TPC-B-like and single-row inserts) for a
//! baseline, then measures
//! 1. **store**: the ledger library alone: one task holds in batches while another settles
//!    them (success with a reputation multiplier, payout split agent/platform, refund), each
//!    batch one transaction, with 1 and with `--shards` escrow/platform shards;
//! 2. **service**: the whole path through NATS: batch hold requests to `taskbus.ledger.hold`,
//!    the `held` events, `closed` events (as the coordinator sends them) published to
//!    JetStream, settlement consuming them, `settled` events published; timed until every hold
//!    is settled.
//!
//! `--compare` adds, in the same run, the store on the schema before migration
//! 20261122000101 (foreign keys, fillfactor 85) and the service reading its own `held` events
//! back, to show what those changes bought.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rust_decimal::Decimal;
use sqlx::Row;
use taskbus_ledger::api::MoveRequest;
use taskbus_ledger::{HoldInput, Ledger, LedgerOptions, Resolution, TaskResolution};
use taskbus_proto::api::{HoldRequest, HoldResponse, HoldStatus, Reply};
use taskbus_proto::events::{self, Event};
use taskbus_proto::Subjects;

#[derive(Parser, Debug)]
struct Args {
    /// A PostgreSQL URL on which the bench may create a database.
    #[arg(long, env = "TASKBUS_TEST_DATABASE_URL")]
    database_url: String,
    /// NATS URL; default: start a nats-server for the run.
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    #[arg(long, default_value_t = 100)]
    payers: usize,
    #[arg(long, default_value_t = 50)]
    agents: usize,
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// Holds and settlements per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Seconds of each pgbench run (0 skips pgbench).
    #[arg(long, default_value_t = 10)]
    pgbench_secs: u64,
    /// Skip the service (NATS) measurement.
    #[arg(long)]
    store_only: bool,
    /// Also measure, in the same run, what the changes of migration
    /// 20261122000101_ledger_speed.sql and of skipping `held` events bought: the store on the
    /// earlier schema (foreign keys, fillfactor 85) and the service reading its own `held`
    /// events back.
    #[arg(long)]
    compare: bool,
}

/// The journal as it was before migration 20261122000101 (for `--compare`).
const EARLIER_SCHEMA: &str = "ALTER TABLE ledger.transfers
    DROP CONSTRAINT IF EXISTS transfers_debit_account_fkey,
    DROP CONSTRAINT IF EXISTS transfers_credit_account_fkey,
    ADD CONSTRAINT transfers_debit_account_fkey FOREIGN KEY (debit_account) REFERENCES ledger.accounts (id),
    ADD CONSTRAINT transfers_credit_account_fkey FOREIGN KEY (credit_account) REFERENCES ledger.accounts (id),
    SET (fillfactor = 85)";

async fn fresh_db(admin: &str, name: &str) -> anyhow::Result<String> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin)
        .await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&pool)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(taskbus_tests::with_database(admin, name))
}

fn pgbench(url: &str, secs: u64, extra: &[&str], what: &str) {
    let out = Command::new("pgbench")
        .args(["-c", "4", "-j", "2", "-T", &secs.to_string(), "-n"])
        .args(extra)
        .arg(url)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let tps = text
                .lines()
                .find(|l| l.starts_with("tps ="))
                .unwrap_or("tps = ?")
                .to_string();
            println!("pgbench {what}: {tps}");
        }
        Ok(o) => println!(
            "pgbench {what} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("pgbench not available: {e}"),
    }
}

fn rep(i: usize) -> Decimal {
    [
        Decimal::ONE,
        Decimal::new(9, 1),
        Decimal::new(75, 2),
        Decimal::new(12, 1),
    ][i % 4]
}

async fn open(url: &str, shards: u32, earlier_schema: bool) -> anyhow::Result<Ledger> {
    let pool = taskbus_runtime::db::connect_and_migrate(url, 4).await?;
    if earlier_schema {
        sqlx::query(EARLIER_SCHEMA).execute(&pool).await?;
    }
    let opts = LedgerOptions {
        shards,
        ..Default::default()
    };
    Ok(Ledger::open(pool, &opts).await?)
}

async fn fund(ledger: &Ledger, payers: usize, tasks: usize) -> anyhow::Result<()> {
    let each = Decimal::from(tasks as u64 * 2 / payers as u64 + 10);
    for p in 0..payers {
        ledger
            .deposit(&MoveRequest {
                account: format!("payer-{p}"),
                amount: each.to_string(),
                currency: Some("USD".into()),
                key: None,
            })
            .await?;
    }
    Ok(())
}

/// Holds and settles `tasks` tasks with the library, hold and settle pipelined.
async fn store_bench(
    url: &str,
    args: &Args,
    shards: u32,
    tag: &str,
    earlier_schema: bool,
) -> anyhow::Result<f64> {
    let ledger = open(url, shards, earlier_schema).await?;
    fund(&ledger, args.payers, args.tasks).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<String>>(8);
    let started = Instant::now();
    let holder = {
        let ledger = ledger.clone();
        let (tasks, batch, payers) = (args.tasks, args.batch, args.payers);
        let tag = tag.to_string();
        tokio::spawn(async move {
            let mut hold_time = Duration::ZERO;
            for b in 0..tasks.div_ceil(batch) {
                let inputs: Vec<HoldInput> = (b * batch..((b + 1) * batch).min(tasks))
                    .map(|i| HoldInput {
                        task_id: format!("{tag}-{i}"),
                        pool: "default".into(),
                        payer: format!("payer-{}", i % payers),
                        amount: "1.00".into(),
                        currency: None,
                        at: None,
                    })
                    .collect();
                let t = Instant::now();
                let r = ledger.hold(&inputs).await?;
                hold_time += t.elapsed();
                let ids = inputs
                    .iter()
                    .zip(&r.outcomes)
                    .filter(|(_, o)| o.is_held())
                    .map(|(h, _)| h.task_id.clone())
                    .collect();
                if tx.send(ids).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(hold_time)
        })
    };
    let mut settle_time = Duration::ZERO;
    let mut settled = 0usize;
    let mut seq = 0u64;
    while let Some(ids) = rx.recv().await {
        let res: Vec<TaskResolution> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                seq += 1;
                TaskResolution {
                    task_id: id.clone(),
                    seq,
                    resolution: Resolution::Succeeded {
                        agent_id: format!("agent-{}", i % args.agents),
                        multiplier: rep(i),
                    },
                }
            })
            .collect();
        let t = Instant::now();
        settled += ledger.settle(&res).await?.len();
        settle_time += t.elapsed();
    }
    let hold_time = holder.await??;
    let secs = started.elapsed().as_secs_f64();
    let rate = settled as f64 / secs;
    let problems = taskbus_ledger::audit::check(ledger.db()).await?;
    println!(
        "store{}, {shards} shard(s), batch {}: {settled} tasks held+settled in {secs:.2} s = {rate:.0} settled tasks/s \
         (time in hold {:.2} s, in settle {:.2} s; audit: {})",
        if earlier_schema { " on the earlier schema" } else { "" },
        args.batch,
        hold_time.as_secs_f64(),
        settle_time.as_secs_f64(),
        if problems.is_empty() { "ok".to_string() } else { format!("{problems:?}") }
    );
    Ok(rate)
}

async fn service_bench(
    url: &str,
    args: &Args,
    nats_url: &str,
    replay_held: bool,
) -> anyhow::Result<f64> {
    let mut cfg = taskbus_ledger::Config::new(nats_url, url);
    cfg.replay_held = replay_held;
    // Its own consumer, so that a second run in the same stream starts from its own events.
    cfg.consumer = format!("ledger-bench-{}", ulid::Ulid::new());
    cfg.ledger.shards = args.shards;
    cfg.batch_size = args.batch.max(1000);
    let token = taskbus_runtime::CancellationToken::new();
    let running = taskbus_ledger::start(cfg, token.clone()).await?;
    fund(running.ledger(), args.payers, args.tasks).await?;
    let client = async_nats::connect(nats_url).await?;
    let js = Arc::new(async_nats::jetstream::new(client.clone()));
    let subjects = Subjects::default();
    let started = Instant::now();
    let batches: Vec<usize> = (0..args.tasks.div_ceil(args.batch)).collect();
    let mut handles = Vec::new();
    // A few concurrent "coordinators".
    for part in batches.chunks(batches.len().div_ceil(4).max(1)) {
        let part = part.to_vec();
        let (client, js, subjects) = (client.clone(), js.clone(), subjects.clone());
        let (tasks, batch, payers, agents) = (args.tasks, args.batch, args.payers, args.agents);
        handles.push(tokio::spawn(async move {
            for b in part {
                let holds: Vec<_> = (b * batch..((b + 1) * batch).min(tasks))
                    .map(|i| taskbus_proto::api::Hold {
                        task_id: format!("svc{}-{i}", u8::from(replay_held)),
                        pool: "default".into(),
                        payer: format!("payer-{}", i % payers),
                        amount: "1.00".into(),
                        currency: None,
                    })
                    .collect();
                let body = serde_json::to_vec(&HoldRequest {
                    holds: holds.clone(),
                })?;
                let reply = client.request("taskbus.ledger.hold", body.into()).await?;
                let Reply::Ok(HoldResponse { results }) = serde_json::from_slice(&reply.payload)?
                else {
                    anyhow::bail!("hold refused");
                };
                let mut acks = Vec::with_capacity(results.len());
                for (i, r) in results.iter().enumerate() {
                    if r.status != HoldStatus::Held {
                        continue;
                    }
                    // What the coordinator publishes once it has recorded the success.
                    let ev = Event::Closed(events::Closed {
                        task_id: r.task_id.clone(),
                        pool: "default".into(),
                        at: chrono::Utc::now(),
                        status: events::ClosedStatus::Succeeded,
                        attempt: 1,
                        agent_id: Some(format!("agent-{}", i % agents)),
                        reputation: Some(rep(i).to_string()),
                    });
                    let p = async_nats::jetstream::message::PublishMessage::build()
                        .payload(ev.to_json().into())
                        .message_id(format!("{}:closed", r.task_id));
                    acks.push(
                        js.send_publish(
                            subjects.event("default", &r.task_id, taskbus_proto::EventKind::Closed),
                            p,
                        )
                        .await?,
                    );
                }
                for a in acks {
                    a.await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let produced = started.elapsed().as_secs_f64();
    let db = running.ledger().db().clone();
    let total = args.tasks as i64;
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ledger.transfers WHERE kind = 'hold' AND status = 'settled'",
        )
        .fetch_one(&db)
        .await?;
        if n >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("only {n} of {total} settled after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = total as f64 / secs;
    let problems = taskbus_ledger::audit::check(&db).await?;
    println!(
        "service (NATS hold requests, held events, closed events consumed{}, settled events), {} shards: {total} tasks in {secs:.2} s = {rate:.0} settled tasks/s (all held and closed published after {produced:.2} s; audit: {})",
        if replay_held { ", held events read back" } else { "" },
        args.shards,
        if problems.is_empty() { "ok".to_string() } else { format!("{problems:?}") }
    );
    token.cancel();
    running.wait().await;
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = format!("taskbus_bench_{}", std::process::id());
    let url = fresh_db(&args.database_url, &name).await?;
    {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        let row = sqlx::query(
            "SELECT current_setting('synchronous_commit'), current_setting('fsync'), version()",
        )
        .fetch_one(&pool)
        .await?;
        println!(
            "PostgreSQL: synchronous_commit = {}, fsync = {}; {}",
            row.get::<String, _>(0),
            row.get::<String, _>(1),
            row.get::<String, _>(2)
        );
        println!(
            "machine: {} CPUs",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
    }
    if args.pgbench_secs > 0 {
        let init = Command::new("pgbench")
            .args(["-i", "-q", "-s", "4"])
            .arg(&url)
            .output();
        match init {
            Ok(o) if o.status.success() => {
                pgbench(&url, args.pgbench_secs, &[], "tpcb-like (-c 4)");
                let script = std::env::temp_dir().join("taskbus-bench-insert.sql");
                std::fs::write(
                    &script,
                    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now());\n",
                )?;
                pgbench(
                    &url,
                    args.pgbench_secs,
                    &["-f", &script.display().to_string()],
                    "single-row insert transactions (-c 4)",
                );
            }
            Ok(o) => println!("pgbench -i failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => println!("pgbench not available: {e}"),
        }
    }
    store_bench(&url, &args, 1, "one", false).await?;
    store_bench(&url, &args, args.shards, "sharded", false).await?;
    let mut dbs = vec![name.clone()];
    if args.compare {
        let old = format!("{name}_old");
        let old_url = fresh_db(&args.database_url, &old).await?;
        dbs.push(old);
        store_bench(&old_url, &args, 1, "one", true).await?;
        store_bench(&old_url, &args, args.shards, "sharded", true).await?;
    }
    if !args.store_only {
        let variants: &[bool] = if args.compare {
            &[false, true]
        } else {
            &[false]
        };
        for &replay_held in variants {
            // A fresh nats-server (unless one is given) and database per run.
            let server;
            let nats_url = match &args.nats_url {
                Some(u) => u.clone(),
                None => {
                    server = taskbus_runtime::devservers::NatsServer::start().await?;
                    server.url()
                }
            };
            let db = format!("{name}_svc{}", u8::from(replay_held));
            let svc_db = fresh_db(&args.database_url, &db).await?;
            dbs.push(db);
            service_bench(&svc_db, &args, &nats_url, replay_held).await?;
        }
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await?;
    for db in dbs {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&pool)
            .await?;
    }
    Ok(())
}
