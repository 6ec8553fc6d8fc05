//! Crash test: the ledger binary runs as a child process and is killed with SIGKILL at random
//! points (and restarted) while a driver playing the coordinator makes holds for many priced
//! tasks (retrying a batch until it gets an answer, as the coordinator does) and publishes
//! their outcome events, some of them twice or contradicted by a late second outcome.
//! Afterwards every task is settled exactly once, as its first outcome says, balances equal
//! the model's, each task has exactly one `settled` event, and the invariants hold. Then the
//! whole events stream is replayed into a fresh ledger, which must end with the same balances.
//!
//! `LEDGER_CRASH_TASKS` sets the number of tasks (default 3000), `LEDGER_CRASH_SEED` the seed.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use sqlx::Row;
use taskbus_ledger::money::split;
use taskbus_proto::api::{HoldRequest, HoldResponse, HoldStatus, Reply};
use taskbus_proto::events::Event;
use tokio::process::{Child, Command};

const PAYERS: usize = 4;
const AGENTS: usize = 5;

fn spawn_ledger(nats: &str, db: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_taskbus-ledger"))
        .env("TASKBUS_NATS_URL", nats)
        .env("TASKBUS_DATABASE_URL", db)
        .env("TASKBUS_HTTP_LISTEN", "127.0.0.1:0")
        .env("TASKBUS_LEDGER_ACK_WAIT_SECS", "2")
        .env("TASKBUS_LEDGER_BATCH_SIZE", "300")
        .env("TASKBUS_LEDGER_DB_CONNECTIONS", "4")
        .env(
            "TASKBUS_LOG",
            std::env::var("LEDGER_CRASH_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("ledger binary starts")
}

/// What the driver decided for one held task.
#[derive(Debug, Clone)]
struct Planned {
    payer: usize,
    price: Decimal,
    /// The first outcome published: `Some((agent, multiplier))` for success, `None` for a void.
    first: Option<(usize, Decimal)>,
}

async fn hold_until_answered(env: &Env, holds: &[taskbus_proto::api::Hold]) -> HoldResponse {
    let body = serde_json::to_vec(&HoldRequest {
        holds: holds.to_vec(),
    })
    .unwrap();
    loop {
        let r = env
            .client
            .send_request(
                "taskbus.ledger.hold",
                async_nats::Request::new()
                    .payload(body.clone().into())
                    .timeout(Some(Duration::from_secs(2))),
            )
            .await;
        if let Ok(m) = r {
            if let Ok(Reply::Ok(resp)) = serde_json::from_slice::<Reply<HoldResponse>>(&m.payload) {
                return resp;
            }
        }
        // Ledger down, restarting, or its database busy: the coordinator would retry later.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ledger_settles_every_task_exactly_once() {
    let env = Env::new().await;
    let tasks: usize = std::env::var("LEDGER_CRASH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("LEDGER_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test: {tasks} tasks, LEDGER_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let logdir = tempfile_dir();
    let log = logdir.join("ledger.log");
    eprintln!("crash test: ledger log in {}", log.display());

    let mut child = spawn_ledger(&env.nats.url(), &env.db.url, &log);
    let deposits: Vec<(String, String)> = (0..PAYERS)
        .map(|p| (format!("payer-{p}"), "100000.00".to_string()))
        .collect();
    {
        let env = &env;
        eventually(
            "ledger binary answers",
            Duration::from_secs(30),
            || async move {
                let m = tokio::time::timeout(
                    Duration::from_secs(1),
                    env.client
                        .request("taskbus.ledger.balance", r#"{"account":"x"}"#.into()),
                )
                .await
                .ok()?
                .ok()?;
                match serde_json::from_slice::<Reply<taskbus_ledger::api::BalanceReply>>(&m.payload)
                {
                    Ok(Reply::Ok(_)) => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }
    for (p, amount) in &deposits {
        env.deposit(p, amount, "USD").await;
    }

    // The killer owns the child: SIGKILL at random points, down for a while, start again.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let killer = {
        let stop = stop.clone();
        let kills = kills.clone();
        let mut krng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let nats = env.nats.url();
        let db = env.db.url.clone();
        let log = log.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(krng.random_range(100..1200))).await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let _ = child.start_kill();
                let _ = child.wait().await;
                kills.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(krng.random_range(20..500))).await;
                child = spawn_ledger(&nats, &db, &log);
            }
            child
        })
    };

    // The driver: holds in batches, then the outcomes of the held tasks.
    let mut plan: BTreeMap<String, Planned> = BTreeMap::new();
    let mut not_held = 0usize;
    let reps = [None, Some("0.5"), Some("0.95"), Some("1.2"), Some("0.333")];
    let batch = 100;
    for b in 0..tasks.div_ceil(batch) {
        let mut holds = Vec::new();
        let mut meta = Vec::new();
        for i in b * batch..((b + 1) * batch).min(tasks) {
            let id = format!("task-{i}");
            let payer = rng.random_range(0..PAYERS);
            let price = Decimal::new(rng.random_range(1..500), 2);
            holds.push(hold(
                &id,
                &format!("payer-{payer}"),
                &price.to_string(),
                Some("USD"),
            ));
            meta.push((id, payer, price));
        }
        let resp = hold_until_answered(&env, &holds).await;
        for ((id, payer, price), r) in meta.into_iter().zip(resp.results) {
            assert_eq!(id, r.task_id);
            if r.status != HoldStatus::Held {
                not_held += 1;
                continue;
            }
            let roll: f64 = rng.random();
            let first = if roll < 0.7 {
                let agent = rng.random_range(0..AGENTS);
                let rep = reps[rng.random_range(0..reps.len())];
                env.publish(&succeeded(&id, &format!("agent-{agent}"), rep))
                    .await;
                Some((
                    agent,
                    rep.map(|r| r.parse().unwrap()).unwrap_or(Decimal::ONE),
                ))
            } else {
                let ev = match rng.random_range(0..3) {
                    0 => dead(&id),
                    1 => cancelled(&id),
                    _ => expired(&id),
                };
                env.publish(&ev).await;
                None
            };
            // A late, contradicting outcome (must change nothing), or the same event again.
            if rng.random_bool(0.1) {
                let late: Event = if first.is_some() {
                    dead(&id)
                } else {
                    succeeded(&id, "agent-late", None)
                };
                let (pool, tid) = late.task();
                let subject = env.subjects.event(pool, tid, late.kind());
                env.publish_raw(&subject, late.to_json(), &format!("{id}:late"))
                    .await;
            }
            plan.insert(
                id,
                Planned {
                    payer,
                    price,
                    first,
                },
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut child = killer.await.unwrap();
    let held = plan.len() as i64;
    eprintln!(
        "crash test: {held} held, {not_held} not held, {} kills requested",
        kills.load(Ordering::SeqCst)
    );
    assert_eq!(not_held, 0, "every payer was funded for every task");
    env.wait_resolved(held).await;
    // Let any in-flight redelivery finish, then check nothing moves any more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.audit().await;

    // Exactly once, as the first outcome says.
    let rows = sqlx::query(
        "SELECT task_id, status, amount, posted_amount, agent_id FROM ledger.transfers WHERE kind = 'hold'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, held);
    let mut payers = [Decimal::new(100_000, 0); PAYERS];
    let mut agents: HashMap<String, Decimal> = HashMap::new();
    let mut platform = Decimal::ZERO;
    for r in &rows {
        let id: String = r.get(0);
        let p = &plan[&id];
        let status: String = r.get(1);
        match p.first {
            Some((agent, m)) => {
                assert_eq!(status, "settled", "{id}");
                let s = split(p.price, m, Decimal::new(1, 1), 2);
                assert_eq!(r.get::<Option<Decimal>, _>(3), Some(s.payout), "{id}");
                assert_eq!(
                    r.get::<Option<String>, _>(4),
                    Some(format!("agent-{agent}")),
                    "{id}"
                );
                payers[p.payer] -= s.payout;
                *agents.entry(format!("agent-{agent}")).or_default() += s.agent;
                platform += s.platform;
            }
            None => assert_eq!(status, "voided", "{id}"),
        }
    }
    let payouts: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger.transfers WHERE kind = 'payout'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let expected_payouts = plan
        .values()
        .filter(|p| {
            p.first.is_some_and(|(_, m)| {
                split(p.price, m, Decimal::new(1, 1), 2).agent > Decimal::ZERO
            })
        })
        .count() as i64;
    assert_eq!(payouts, expected_payouts);
    let snap = env.snapshot().await;
    let posted = |name: &str| {
        let v = &snap[&(name.to_string(), "USD".to_string())];
        let d = |s: &String| s.parse::<Decimal>().unwrap();
        (d(&v[3]) - d(&v[1]), d(&v[0]))
    };
    for (i, want) in payers.iter().enumerate() {
        assert_eq!(
            posted(&format!("payer-{i}")),
            (*want, Decimal::ZERO),
            "payer-{i}"
        );
    }
    for (a, want) in &agents {
        assert_eq!(posted(a).0, *want, "{a}");
    }
    let got_platform: Decimal = snap
        .iter()
        .filter(|((n, c), _)| n.starts_with("platform.") && c == "USD")
        .map(|(_, v)| v[3].parse::<Decimal>().unwrap())
        .sum();
    assert_eq!(got_platform, platform);
    assert!(!snap.contains_key(&("agent-late".to_string(), "USD".to_string())));

    // One settled event per task.
    let settled = env.stream_events("settled").await;
    assert_eq!(settled.len() as i64, held, "settled events");
    let distinct: std::collections::HashSet<_> =
        settled.iter().map(|e| e.task().1.to_string()).collect();
    assert_eq!(distinct.len() as i64, held);
    let _ = child.start_kill();
    let _ = child.wait().await;

    // Replay the whole events stream into a fresh ledger, funded like the first one before its
    // consumer starts: same balances.
    let fresh = TestDb::new().await;
    {
        let pool = taskbus_runtime::db::connect_and_migrate(&fresh.url, 2)
            .await
            .unwrap();
        let ledger =
            taskbus_ledger::Ledger::open(pool.clone(), &taskbus_ledger::LedgerOptions::default())
                .await
                .unwrap();
        for (p, amount) in &deposits {
            ledger
                .deposit(&taskbus_ledger::api::MoveRequest {
                    account: p.clone(),
                    amount: amount.clone(),
                    currency: Some("USD".into()),
                    key: None,
                })
                .await
                .unwrap();
        }
        pool.close().await;
    }
    let mut cfg = taskbus_ledger::Config::new(env.nats.url(), fresh.url.clone());
    cfg.consumer = "ledger-replay".into();
    cfg.replay_held = true;
    let token = taskbus_runtime::CancellationToken::new();
    let replay = taskbus_ledger::start(cfg, token.clone()).await.unwrap();
    let fresh_pool = fresh.pool().await;
    {
        let pool = &fresh_pool;
        eventually("the replay resolves every hold", Duration::from_secs(120), || async move {
            let (n, pending): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*) FILTER (WHERE status <> 'pending'), COUNT(*) FILTER (WHERE status = 'pending')
                 FROM ledger.transfers WHERE kind = 'hold'",
            )
            .fetch_one(pool)
            .await
            .ok()?;
            (n == held && pending == 0).then_some(())
        })
        .await;
    }
    audit(&fresh_pool).await;
    assert_eq!(
        snapshot(&fresh_pool).await,
        snap,
        "replayed balances differ"
    );
    token.cancel();
    replay.wait().await;
    let _ = std::fs::remove_dir_all(&logdir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("taskbus-ledger-crash-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
