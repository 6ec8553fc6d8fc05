//! Crash test of the whole paid stack: a real nats-server, a fresh PostgreSQL database, the
//! coordinator (`taskbus-coordinator`) and the payment ledger (`taskbus-ledger`) as child
//! processes that are killed with SIGKILL at random points and restarted, two agents
//! in-process, and thousands of priced tasks from a few payers submitted while the kills
//! happen.
//!
//! The handler succeeds most tasks, fails some once and then succeeds (a retry), fails some on
//! every attempt (`max_attempts` 2: dead) and some fatally (dead at once). A few tasks go to a
//! pool without agents and are cancelled while queued, and a few run briefly while a
//! cancellation races them (all through the coordinator's API, retried across its crashes), and
//! a poorly funded payer gets some of its tasks rejected with `insufficient_funds` (it is topped
//! up midway, so that a rejected task whose submit message comes back after a coordinator crash
//! could now be afforded: it must stay rejected, with no hold). Afterwards:
//!
//! - every task has reached exactly one terminal state in `coordinator.tasks`, the one its plan
//!   allows, and no row was invented;
//! - every admitted task has exactly one hold in the ledger, resolved as the coordinator's
//!   terminal status says (`settled` for succeeded, `voided` by `dead`/`cancelled`); a
//!   rejected task has no transfer at all;
//! - each admitted task has one `closed` event with the coordinator's status; a settled hold
//!   pays the agent the coordinator recorded, with the multiplier of that `closed` event (which
//!   repeats one of the agents' `succeeded` events of the attempt), by the ledger's formula;
//! - the events stream holds exactly one `settled` event per admitted task (and none for a
//!   rejected one), agreeing with the hold, and no `rejected` event for an admitted task;
//! - the ledger's audit invariants hold, escrow is empty, and the balances are what the
//!   outcomes imply: each payer spent exactly the payouts of its succeeded tasks, each agent
//!   earned its share of its payouts and the platform the fees.
//!
//! `PAID_CRASH_TASKS` sets the number of tasks (default 10,000), `PAID_CRASH_SEED` the seed
//! (printed), `PAID_CRASH_CHILD_LOG` the children's log level (default `warn`; logs are kept in
//! a temporary directory whose path is printed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::Row;
use taskbus_agent::{Agent, AgentConfig, CancellationToken, TaskContext, TaskError};
use taskbus_proto::events::{self, ClosedStatus, Event};
use taskbus_proto::PoolSettings;
use taskbus_tests::stack::Stack;
use taskbus_tests::{ask, deposit, eventually, stream_events, workspace_bin};
use tokio::process::{Child, Command};
use tokio_util::task::TaskTracker;

/// Well-funded payers.
const PAYERS: usize = 4;
const FUNDS: &str = "100000.00";
/// A payer that cannot afford all of its tasks.
const POOR: &str = "payer-poor";
const POOR_FUNDS: &str = "20.00";
/// Deposited to the poor payer while the load runs, so that a rejected task's redelivered
/// submit message (after a coordinator crash) could now be afforded: it must stay rejected,
/// and no hold may be made for it.
const POOR_TOP_UP: &str = "30.00";
/// A pool without agents: its tasks stay queued until cancelled.
const IDLE_POOL: &str = "idle";
const FEE_SHARE: Decimal = Decimal::from_parts(1, 0, 0, false, 1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Succeeds at once.
    Ok,
    /// Fails (retryable) on attempt 1, succeeds on attempt 2.
    Flaky,
    /// Fails (retryable) on every attempt; `max_attempts` 2: dead.
    Fail,
    /// Fails fatally: dead after one attempt.
    Fatal,
    /// Goes to the idle pool and is cancelled while queued.
    Cancel,
    /// Runs a few milliseconds and succeeds, while a cancellation races it: it ends
    /// `succeeded` or `cancelled`, whichever the coordinator recorded first, and the ledger
    /// must follow the coordinator (a success that lost is not paid).
    Race,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Flaky => "flaky",
            Mode::Fail => "fail",
            Mode::Fatal => "fatal",
            Mode::Cancel => "cancel",
            Mode::Race => "race",
        }
    }
}

#[derive(Debug, Clone)]
struct Planned {
    payer: String,
    price: Decimal,
    mode: Mode,
}

fn child_log_level() -> String {
    std::env::var("PAID_CRASH_CHILD_LOG").unwrap_or_else(|_| "warn".into())
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

fn spawn_coordinator(nats: &str, db: &str, log: &Path) -> Child {
    Command::new(workspace_bin("taskbus-coordinator"))
        .args(["--nats-url", nats, "--database-url", db])
        .args(["--http-listen", "127.0.0.1:0", "--pools", "default"])
        .env("TASKBUS_LOG", child_log_level())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log))
        .kill_on_drop(true)
        .spawn()
        .expect("coordinator binary starts")
}

fn spawn_ledger(nats: &str, db: &str, log: &Path) -> Child {
    Command::new(workspace_bin("taskbus-ledger"))
        .env("TASKBUS_NATS_URL", nats)
        .env("TASKBUS_DATABASE_URL", db)
        .env("TASKBUS_HTTP_LISTEN", "127.0.0.1:0")
        .env("TASKBUS_LEDGER_ACK_WAIT_SECS", "2")
        .env("TASKBUS_LEDGER_DB_CONNECTIONS", "4")
        .env("TASKBUS_LOG", child_log_level())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log))
        .kill_on_drop(true)
        .spawn()
        .expect("ledger binary starts")
}

/// Kills its child with SIGKILL at random points and starts it again, until `stop`; then
/// hands the (running) child back.
fn killer(
    tracker: &TaskTracker,
    name: &'static str,
    mut child: Child,
    respawn: impl Fn() -> Child + Send + 'static,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
    kills: Arc<AtomicU32>,
) -> tokio::task::JoinHandle<Child> {
    tracker.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(rng.random_range(400..2500))).await;
            if stop.load(Ordering::SeqCst) {
                return child;
            }
            let _ = child.start_kill(); // SIGKILL
            let _ = child.wait().await;
            kills.fetch_add(1, Ordering::SeqCst);
            tracing::info!(name, "killed");
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..600))).await;
            child = respawn();
        }
    })
}

/// Cancel a task through the coordinator's API, across coordinator crashes: retried until
/// the answer says the task is cancelled, or (`racing`: the task may finish first) that it had
/// already ended.
async fn cancel(client: &async_nats::Client, id: &str, racing: bool) {
    let body = serde_json::to_vec(&json!({"id": id, "reason": "crash test"})).unwrap();
    eventually(&format!("cancel {id}"), Duration::from_secs(120), || {
        let body = body.clone();
        async move {
            let v = ask(client, "taskbus.api.task.cancel", body).await?;
            if v["ok"]["status"] == "cancelled" {
                return Some(());
            }
            // A retry after a crash that followed the cancellation itself, or a racing task
            // that ended before the cancellation.
            let e = &v["error"];
            let msg = e["error"].as_str().unwrap_or_default();
            (e["code"] == 409 && (racing || msg.contains("cancelled"))).then_some(())
        }
    })
    .await;
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("taskbus-paid-crash-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_ledger_killed_settle_every_task_exactly_once() {
    let tasks: usize = std::env::var("PAID_CRASH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("PAID_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("paid crash test: {tasks} tasks, PAID_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let began = Instant::now();

    let s = Stack::new(30_000).await;
    for pool in ["default", IDLE_POOL] {
        s.set_pool(
            pool,
            PoolSettings {
                ack_wait_ms: 30_000,
                // Failures are part of the plan: never pause the agents.
                breaker_threshold: 0,
                ..Default::default()
            },
        )
        .await;
    }
    let logs = tempdir();
    let (coord_log, ledger_log) = (logs.join("coordinator.log"), logs.join("ledger.log"));
    eprintln!("paid crash test: child logs in {}", logs.display());
    let (nats, db) = (s.nats.url(), s.db.url.clone());
    let coordinator = spawn_coordinator(&nats, &db, &coord_log);
    let ledger = spawn_ledger(&nats, &db, &ledger_log);

    for p in 0..PAYERS {
        deposit(
            &s.client,
            &format!("payer-{p}"),
            FUNDS,
            &format!("fund-{p}"),
        )
        .await;
    }
    deposit(&s.client, POOR, POOR_FUNDS, "fund-poor").await;

    // Agents, in-process (they are not what this test kills).
    let tracker = TaskTracker::new();
    let agents_stop = CancellationToken::new();
    for id in ["agent-a", "agent-b"] {
        let mut cfg = AgentConfig::new(s.nats.url(), "default");
        cfg.agent_id = id.into();
        cfg.concurrency = 64;
        cfg.grace = Duration::from_secs(2);
        let agent = Agent::new(cfg, |t: TaskContext| async move {
            match t.payload["mode"].as_str() {
                Some("flaky") if t.attempt == 1 => Err(TaskError::Retryable("first try".into())),
                Some("fail") => Err(TaskError::Retryable(format!("attempt {}", t.attempt))),
                Some("fatal") => Err(TaskError::Fatal("fatal".into())),
                Some("race") => {
                    let ms = t.payload["ms"].as_u64().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!({"done": t.task_id}))
                }
                _ => Ok(json!({"done": t.task_id})),
            }
        });
        let stop = agents_stop.clone();
        tracker.spawn(async move { agent.run(stop).await.expect("agent runs") });
    }

    // The killers.
    let stop_killing = Arc::new(AtomicBool::new(false));
    let (coord_kills, ledger_kills) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let coord_killer = {
        let (nats, db, log) = (nats.clone(), db.clone(), coord_log.clone());
        killer(
            &tracker,
            "coordinator",
            coordinator,
            move || spawn_coordinator(&nats, &db, &log),
            StdRng::seed_from_u64(seed ^ 0xc0),
            stop_killing.clone(),
            coord_kills.clone(),
        )
    };
    let ledger_killer = {
        let (nats, db, log) = (nats.clone(), db.clone(), ledger_log.clone());
        killer(
            &tracker,
            "ledger",
            ledger,
            move || spawn_ledger(&nats, &db, &log),
            StdRng::seed_from_u64(seed ^ 0x1e),
            stop_killing.clone(),
            ledger_kills.clone(),
        )
    };

    // The plan, then the load, published while the kills happen.
    let mut plan: BTreeMap<String, Planned> = BTreeMap::new();
    let mut bodies = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let id = format!("paid-{i}");
        let roll: f64 = rng.random();
        let mode = match roll {
            r if r < 0.03 => Mode::Cancel,
            r if r < 0.06 => Mode::Race,
            r if r < 0.11 => Mode::Fail,
            r if r < 0.15 => Mode::Fatal,
            r if r < 0.23 => Mode::Flaky,
            _ => Mode::Ok,
        };
        let payer = if mode == Mode::Ok && rng.random_bool(0.02) {
            POOR.to_string()
        } else {
            format!("payer-{}", rng.random_range(0..PAYERS))
        };
        let price = Decimal::new(rng.random_range(1..500), 2);
        let pool = if mode == Mode::Cancel {
            IDLE_POOL
        } else {
            "default"
        };
        let body = json!({
            "id": id, "kind": "paid",
            "payload": {"mode": mode.as_str(), "ms": rng.random_range(0..30)},
            "price": price.to_string(), "payer": payer, "currency": "USD",
            "max_attempts": if mode == Mode::Flaky { 3 } else { 2 },
            "retry": {"base_ms": 50, "max_ms": 100},
        });
        bodies.push((pool, serde_json::to_vec(&body).unwrap()));
        plan.insert(id, Planned { payer, price, mode });
    }
    let producer = {
        let js = s.js.clone();
        tracker.spawn(async move {
            for chunk in bodies.chunks(250) {
                let mut acks = Vec::with_capacity(chunk.len());
                for (pool, body) in chunk {
                    acks.push(
                        js.publish(format!("taskbus.submit.{pool}"), body.clone().into())
                            .await
                            .expect("publish"),
                    );
                }
                for a in acks {
                    a.await.expect("submit acknowledged");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let cancels: Vec<String> = plan
        .iter()
        .filter(|(_, p)| matches!(p.mode, Mode::Cancel | Mode::Race))
        .map(|(id, _)| id.clone())
        .collect();
    let canceller = {
        let (client, pg) = (s.client.clone(), s.pg.clone());
        let cancels = cancels.clone();
        let racing: HashSet<String> = plan
            .iter()
            .filter(|(_, p)| p.mode == Mode::Race)
            .map(|(id, _)| id.clone())
            .collect();
        tracker.spawn(async move {
            for id in &cancels {
                let racing = racing.contains(id);
                // Only a task the coordinator has admitted can be cancelled.
                eventually(
                    &format!("{id} queued"),
                    Duration::from_secs(120),
                    || async {
                        let st: Option<String> = sqlx::query_scalar(
                            "SELECT status FROM coordinator.tasks WHERE task_id = $1",
                        )
                        .bind(id)
                        .fetch_optional(&pg)
                        .await
                        .ok()
                        .flatten();
                        st.filter(|s| racing || s == "queued").map(|_| ())
                    },
                )
                .await;
                cancel(&client, id, racing).await;
            }
        })
    };

    let terminal_count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM coordinator.tasks
             WHERE status IN ('succeeded', 'dead', 'cancelled', 'rejected', 'expired')",
        )
        .fetch_one(&s.pg)
        .await
        .unwrap_or(0)
    };
    // Keep killing until most of the work is done, and at least a few times each.
    let kill_until = tasks as i64 * 9 / 10;
    let mut topped_up = false;
    loop {
        let done = terminal_count().await;
        if !topped_up && done >= tasks as i64 * 4 / 10 {
            deposit(&s.client, POOR, POOR_TOP_UP, "top-up-poor").await;
            topped_up = true;
        }
        let enough =
            coord_kills.load(Ordering::SeqCst) >= 3 && ledger_kills.load(Ordering::SeqCst) >= 3;
        if (done >= kill_until && enough) || began.elapsed() > Duration::from_secs(150) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_killing.store(true, Ordering::SeqCst);
    let mut coordinator = coord_killer.await.unwrap();
    let mut ledger = ledger_killer.await.unwrap();
    producer.await.unwrap();
    eprintln!(
        "paid crash test: {} coordinator kills, {} ledger kills, {} of {tasks} tasks done after {:.1} s",
        coord_kills.load(Ordering::SeqCst),
        ledger_kills.load(Ordering::SeqCst),
        terminal_count().await,
        began.elapsed().as_secs_f64()
    );
    canceller.await.unwrap();

    // 1. Every task reaches one terminal state; nothing is invented.
    let settled = tokio::time::timeout(Duration::from_secs(120), async {
        while terminal_count().await < tasks as i64 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if settled.is_err() {
        // Say which tasks are stuck, and where.
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM coordinator.tasks GROUP BY 1 ORDER BY 1")
                .fetch_all(&s.pg)
                .await
                .unwrap_or_default();
        let stuck: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
            "SELECT task_id, status, attempt, agent_id FROM coordinator.tasks
             WHERE status NOT IN ('succeeded', 'dead', 'cancelled', 'rejected', 'expired')
             ORDER BY task_id LIMIT 20",
        )
        .fetch_all(&s.pg)
        .await
        .unwrap_or_default();
        panic!(
            "not every one of {tasks} tasks is terminal after 120 s: {by_status:?}; \
             not terminal (first 20): {stuck:?}; child logs in {}",
            logs.display()
        );
    }
    let rows = sqlx::query(
        "SELECT task_id, status, attempt, agent_id, reason, pool FROM coordinator.tasks",
    )
    .fetch_all(&s.pg)
    .await
    .unwrap();
    assert_eq!(rows.len(), tasks, "one row per task, none invented");
    let mut status: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut rejected = 0usize;
    for r in &rows {
        let id: String = r.get(0);
        let st: String = r.get(1);
        let attempt: i32 = r.get(2);
        let reason: Option<String> = r.get(4);
        let p = plan
            .get(&id)
            .unwrap_or_else(|| panic!("unplanned task row {id}"));
        let allowed: &[&str] = match p.mode {
            Mode::Ok if p.payer == POOR => &["succeeded", "rejected"],
            Mode::Ok | Mode::Flaky => &["succeeded"],
            Mode::Fail | Mode::Fatal => &["dead"],
            Mode::Cancel => &["cancelled"],
            Mode::Race => &["succeeded", "cancelled"],
        };
        assert!(
            allowed.contains(&st.as_str()),
            "{id} ({:?}, payer {}) ended {st} ({reason:?})",
            p.mode,
            p.payer
        );
        match (p.mode, st.as_str()) {
            (_, "rejected") => {
                assert_eq!(reason.as_deref(), Some("insufficient_funds"), "{id}");
                rejected += 1;
            }
            (Mode::Flaky, _) => assert_eq!(attempt, 2, "{id}"),
            (Mode::Fail, _) => assert_eq!(attempt, 2, "{id}"),
            (Mode::Fatal, _) => assert_eq!(attempt, 1, "{id}"),
            _ => {}
        }
        status.insert(id, (st, r.get(3)));
    }
    let admitted = tasks - rejected;
    let race_won = plan
        .iter()
        .filter(|(id, p)| p.mode == Mode::Race && status[*id].0 == "cancelled")
        .count();
    eprintln!(
        "paid crash test: {admitted} admitted, {rejected} rejected (insufficient funds), {} cancel requests, {race_won} racing tasks cancelled",
        cancels.len()
    );

    // 2. Every admitted task's hold resolves.
    let db = s.db.pool().await;
    eventually("every hold resolved", Duration::from_secs(60), || async {
        let (resolved, pending): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status IN ('settled', 'voided')),
                        count(*) FILTER (WHERE status = 'pending')
                 FROM ledger.transfers WHERE kind = 'hold'",
        )
        .fetch_one(&db)
        .await
        .ok()?;
        (resolved >= admitted as i64 && pending == 0).then_some(())
    })
    .await;
    // Let any redelivery still in flight land, then check that nothing moves any more.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3. Exactly one hold per admitted task, resolved as the coordinator's status says (which
    // its one `closed` event repeats), paying the agent and multiplier of the recorded success,
    // which is one of the agents' `succeeded` events of that attempt.
    let mut successes: HashMap<String, Vec<(u32, String, Option<String>)>> = HashMap::new();
    for e in stream_events(&s.js, "succeeded").await {
        if let Event::Succeeded(e) = e {
            successes
                .entry(e.task_id)
                .or_default()
                .push((e.attempt, e.agent_id, e.reputation));
        }
    }
    let mut closed: HashMap<String, events::Closed> = HashMap::new();
    for e in stream_events(&s.js, "closed").await {
        let Event::Closed(c) = e else {
            panic!("not a closed event: {e:?}")
        };
        if let Some(first) = closed.get(&c.task_id) {
            // A re-send after a crash (outside JetStream's duplicate window) repeats it.
            assert_eq!(
                (first.status, &first.agent_id, &first.reputation),
                (c.status, &c.agent_id, &c.reputation),
                "{}: two different closed events",
                c.task_id
            );
        }
        closed.entry(c.task_id.clone()).or_insert(c);
    }
    assert_eq!(closed.len(), admitted, "one closed event per admitted task");
    let holds = sqlx::query(
        "SELECT t.task_id, t.status, t.amount, t.posted_amount, t.agent_id, t.reputation, t.outcome, a.name
         FROM ledger.transfers t JOIN ledger.accounts a ON a.id = t.debit_account WHERE t.kind = 'hold'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(holds.len(), admitted, "one hold per admitted task");
    let mut spent: HashMap<String, Decimal> = HashMap::new();
    let mut earned: HashMap<String, Decimal> = HashMap::new();
    let mut fees = Decimal::ZERO;
    let mut settled_ids = HashSet::new();
    for h in &holds {
        let id: String = h.get(0);
        let hold_status: String = h.get(1);
        let amount: Decimal = h.get(2);
        let posted: Option<Decimal> = h.get(3);
        let agent: Option<String> = h.get(4);
        let reputation: Option<Decimal> = h.get(5);
        let outcome: Option<String> = h.get(6);
        let payer: String = h.get(7);
        let p = &plan[&id];
        assert_eq!((amount, &payer), (p.price, &p.payer), "{id}: hold content");
        let (st, coord_agent) = &status[&id];
        match st.as_str() {
            "succeeded" => {
                assert_eq!(
                    hold_status, "settled",
                    "{id}: succeeded, hold {hold_status}"
                );
                assert_eq!(outcome.as_deref(), Some("succeeded"), "{id}");
                let c = closed
                    .get(&id)
                    .unwrap_or_else(|| panic!("{id}: no closed event"));
                assert_eq!(c.status, ClosedStatus::Succeeded, "{id}: closed as");
                let ev_agent = c.agent_id.as_ref().expect("a success names its agent");
                let ev_rep = &c.reputation;
                assert!(
                    successes.get(&id).is_some_and(|v| v.contains(&(
                        c.attempt,
                        ev_agent.clone(),
                        ev_rep.clone()
                    ))),
                    "{id}: the closed event repeats no agent's success: {c:?}"
                );
                assert_eq!(agent.as_ref(), Some(ev_agent), "{id}: paid agent");
                assert_eq!(coord_agent.as_ref(), Some(ev_agent), "{id}: recorded agent");
                let m: Decimal = ev_rep
                    .as_deref()
                    .map(|r| r.parse().unwrap())
                    .unwrap_or(Decimal::ONE);
                assert_eq!(reputation, Some(m), "{id}: multiplier");
                let split = taskbus_ledger::money::split(p.price, m, FEE_SHARE, 2);
                assert_eq!(posted, Some(split.payout), "{id}: payout");
                *spent.entry(payer.clone()).or_default() += split.payout;
                *earned.entry(ev_agent.clone()).or_default() += split.agent;
                fees += split.platform;
            }
            "dead" | "cancelled" => {
                assert_eq!(hold_status, "voided", "{id}: {st}, hold {hold_status}");
                assert_eq!(
                    closed.get(&id).map(|c| c.status.as_str()),
                    Some(st.as_str()),
                    "{id}: closed as"
                );
                assert_eq!(outcome.as_deref(), Some(st.as_str()), "{id}: voided by");
                assert_eq!(
                    posted.unwrap_or_default(),
                    Decimal::ZERO,
                    "{id}: nothing posted"
                );
            }
            other => panic!("{id}: a hold for a task that ended {other}"),
        }
        settled_ids.insert(id);
    }
    for (id, (st, _)) in &status {
        if st == "rejected" {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM ledger.transfers WHERE task_id = $1")
                    .bind(id)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            assert_eq!(n, 0, "{id}: rejected but has transfers");
        }
    }
    let (payouts, fee_rows): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind = 'payout'), count(*) FILTER (WHERE kind = 'fee')
         FROM ledger.transfers",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let succeeded = status.values().filter(|(s, _)| s == "succeeded").count() as i64;
    assert!(payouts <= succeeded && fee_rows <= succeeded);

    // 4. One `settled` event per admitted task, agreeing with its hold; none for the rest.
    let settled = stream_events(&s.js, "settled").await;
    let mut seen = HashSet::new();
    for e in &settled {
        let Event::Settled(e) = e else {
            panic!("not a settled event: {e:?}")
        };
        assert!(
            seen.insert(e.task_id.clone()),
            "{}: two settled events",
            e.task_id
        );
        assert!(
            settled_ids.contains(&e.task_id),
            "{}: settled without a hold",
            e.task_id
        );
        let want = if status[&e.task_id].0 == "succeeded" {
            "posted"
        } else {
            "voided"
        };
        assert_eq!(e.outcome, want, "{}: settled event", e.task_id);
    }
    assert_eq!(seen.len(), admitted, "settled events");
    // And no admitted task was also announced as rejected.
    for e in stream_events(&s.js, "rejected").await {
        let (_, id) = e.task();
        assert_eq!(
            status.get(id).map(|s| s.0.as_str()),
            Some("rejected"),
            "{id}: a rejected event for a task that was admitted"
        );
    }

    // 5. The invariants, and the balances the outcomes imply.
    let problems = taskbus_ledger::audit::check(&db).await.expect("audit runs");
    assert!(
        problems.is_empty(),
        "ledger invariants broken: {problems:#?}"
    );
    let accounts: HashMap<String, (String, [Decimal; 4])> = sqlx::query(
        "SELECT name, kind, debits_pending, debits_posted, credits_pending, credits_posted
         FROM ledger.accounts WHERE currency = 'USD'",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        (
            r.get(0),
            (r.get(1), [r.get(2), r.get(3), r.get(4), r.get(5)]),
        )
    })
    .collect();
    for (name, funds) in (0..PAYERS)
        .map(|p| (format!("payer-{p}"), FUNDS))
        .chain([(POOR.to_string(), POOR_FUNDS)])
    {
        let [dp, dpo, _, cpo] = accounts[&name].1;
        let mut funds: Decimal = funds.parse().unwrap();
        if name == POOR && topped_up {
            funds += POOR_TOP_UP.parse::<Decimal>().unwrap();
        }
        let want = spent.get(&name).copied().unwrap_or_default();
        assert_eq!(
            (dp, dpo, cpo),
            (Decimal::ZERO, want, funds),
            "{name}: pending, spent, funded"
        );
    }
    let mut platform = Decimal::ZERO;
    for (name, (kind, [dp, dpo, cp, cpo])) in &accounts {
        match kind.as_str() {
            "agent" => assert_eq!(
                (*dpo, *cpo),
                (Decimal::ZERO, earned.get(name).copied().unwrap_or_default()),
                "{name}: earned"
            ),
            "escrow" => assert_eq!(
                (*dp, *cp, *dpo),
                (Decimal::ZERO, Decimal::ZERO, *cpo),
                "{name}: empty"
            ),
            "platform" => platform += *cpo,
            _ => {}
        }
    }
    assert_eq!(platform, fees, "platform fees");
    let total_spent: Decimal = spent.values().sum();
    let total_earned: Decimal = earned.values().sum();
    assert_eq!(
        total_spent,
        total_earned + fees,
        "payers paid exactly what agents and platform got"
    );
    assert!(total_spent > Decimal::ZERO);
    eprintln!(
        "paid crash test: ok in {:.1} s: {succeeded} paid ({total_spent} USD), {} voided, {payouts} payouts",
        began.elapsed().as_secs_f64(),
        admitted as i64 - succeeded
    );

    agents_stop.cancel();
    let _ = coordinator.start_kill();
    let _ = ledger.start_kill();
    let _ = coordinator.wait().await;
    let _ = ledger.wait().await;
    tracker.close();
    tracker.wait().await;
    let _ = std::fs::remove_dir_all(&logs);
}
