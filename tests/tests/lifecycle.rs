//! Task lifecycle against a real nats-server and PostgreSQL: backoff, delays, deadlines,
//! timeouts, cancellation, late and repeated outcomes, dead-letter replay, heartbeats, the
//! circuit breaker and reputation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};
use taskbus_agent::{Agent, AgentConfig, CancellationToken, TaskContext, TaskError};
use taskbus_proto::PoolSettings;
use taskbus_tests::eventually;
use taskbus_tests::stack::Stack;

const T: Duration = Duration::from_secs(30);

/// Start an in-process agent with `handler`; returns its stop token.
fn agent<H, F>(s: &Stack, id: &str, handler: H) -> CancellationToken
where
    H: Fn(TaskContext) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = id.into();
    cfg.concurrency = 8;
    cfg.grace = Duration::from_secs(2);
    cfg.heartbeat_every = Duration::from_millis(300);
    let a = Agent::new(cfg, handler);
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move { a.run(t).await.expect("agent runs") });
    token
}

async fn api(s: &Stack, endpoint: &str, body: Value) -> Value {
    let r = s
        .client
        .request(
            format!("taskbus.api.{endpoint}"),
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .expect("api reply");
    serde_json::from_slice(&r.payload).unwrap()
}

async fn next_json(sub: &mut async_nats::Subscriber) -> Value {
    let m = tokio::time::timeout(T, sub.next())
        .await
        .expect("event in time")
        .expect("open");
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test]
async fn retries_back_off_through_message_schedules() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            retry_base_ms: 1200,
            retry_max_ms: 5000,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let st = starts.clone();
    let _a = agent(&s, "flaky", move |t: TaskContext| {
        st.lock().unwrap().push((t.attempt, Instant::now()));
        async move {
            if t.attempt < 3 {
                Err(TaskError::Retryable(format!("flake {}", t.attempt)))
            } else {
                Ok(json!("finally"))
            }
        }
    });
    let mut retries = s
        .client
        .subscribe("taskbus.events.default.bo.retry_scheduled")
        .await
        .unwrap();
    s.submit(
        "default",
        json!({"kind": "x", "id": "bo", "max_attempts": 5}),
    )
    .await;
    for expected_attempt in [2, 3] {
        let ev = next_json(&mut retries).await;
        assert_eq!(ev["attempt"], expected_attempt);
        let at: chrono::DateTime<Utc> = ev["at"].as_str().unwrap().parse().unwrap();
        let nb: chrono::DateTime<Utc> = ev["not_before"].as_str().unwrap().parse().unwrap();
        let delay = (nb - at).num_milliseconds();
        // base 1200 ms doubling, jitter factor in [0.5, 1]
        let max = 1200 * (1 << (expected_attempt - 2));
        assert!(
            delay >= max / 2 && delay <= max,
            "delay {delay} ms for attempt {expected_attempt}"
        );
    }
    let row = s.wait_status("bo", "succeeded", T).await;
    assert_eq!(row.attempt, 3);
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 3);
    // Delays of at least the jittered backoff (schedules round up to whole seconds).
    assert!(
        starts[1].1 - starts[0].1 >= Duration::from_millis(550),
        "{starts:?}"
    );
    assert!(
        starts[2].1 - starts[1].1 >= Duration::from_millis(1150),
        "{starts:?}"
    );
}

#[tokio::test]
async fn not_before_delays_the_first_attempt() {
    let s = Stack::new(30_000).await;
    let (_c, _t) = s.coordinator().await;
    let started = Arc::new(std::sync::Mutex::new(None));
    let st = started.clone();
    let _a = agent(&s, "waiter", move |_t: TaskContext| {
        *st.lock().unwrap() = Some(Utc::now());
        async { Ok(json!(1)) }
    });
    let nb = Utc::now() + chrono::Duration::seconds(2);
    s.submit(
        "default",
        json!({"kind": "x", "id": "later", "not_before": nb.to_rfc3339()}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        s.task("later").await.unwrap().status,
        "queued",
        "not handed out early"
    );
    s.wait_status("later", "succeeded", T).await;
    let ran = started.lock().unwrap().unwrap();
    assert!(ran >= nb, "ran at {ran}, not before {nb}");
}

/// A coordinator serving /metrics on a free port.
async fn coordinator_with_metrics(s: &Stack) -> (taskbus_coordinator::Running, SocketAddr) {
    let mut c = s.coordinator_config();
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let running = taskbus_coordinator::start(c, CancellationToken::new())
        .await
        .unwrap();
    let http = running.http_addr.unwrap();
    (running, http)
}

#[tokio::test]
async fn deadline_expires_unstarted_tasks_and_they_never_run() {
    let s = Stack::new(30_000).await;
    let (_c, http) = coordinator_with_metrics(&s).await;
    let mut expired = s
        .client
        .subscribe("taskbus.events.default.dl.expired")
        .await
        .unwrap();
    let deadline = Utc::now() + chrono::Duration::milliseconds(1500);
    s.submit(
        "default",
        json!({"kind": "x", "id": "dl", "deadline": deadline.to_rfc3339()}),
    )
    .await;
    let ev = next_json(&mut expired).await;
    assert_eq!(ev["event"], "expired");
    s.wait_status("dl", "expired", T).await;
    // An agent that starts now gets the stale work message and reports expired, never runs it.
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let _a = agent(&s, "late", move |_t: TaskContext| {
        r.fetch_add(1, Ordering::Relaxed);
        async { Ok(json!(1)) }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 0);
    assert_eq!(s.task("dl").await.unwrap().status, "expired");
    let (_, text) = taskbus_tests::http_get(http, "/metrics").await;
    assert!(
        text.contains(r#"taskbus_coordinator_outcomes_total{outcome="expired"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn maintenance_queries_read_only_the_tasks_they_may_change() {
    use taskbus_coordinator::store::{
        CLAIM_LOST_WORK_SQL, EXPIRE_OVERDUE_SQL, POOLS_WITH_HELD_SQL,
    };
    let lost_work = CLAIM_LOST_WORK_SQL
        .replace("$1", "'default'")
        .replace("$2", "'normal'")
        .replace("$3", "now()")
        .replace("$4", "500");
    let s = Stack::new(30_000).await;
    let (_c, _t) = s.coordinator().await; // runs the migrations
                                          // With sequential scans priced out, a plan shows which index a query can use. Before, the
                                          // deadline sweep's and the held-pools query's predicates matched no index but the one of
                                          // every open task, which each walked once a second.
    for (sql, index) in [
        (EXPIRE_OVERDUE_SQL, "tasks_open_deadline"),
        (POOLS_WITH_HELD_SQL, "tasks_held"),
        // The lost-work sweep reads the queued tasks of one pool created before its cutoff.
        (lost_work.as_str(), "tasks_open_pool_status"),
    ] {
        let mut tx = s.pg.begin().await.unwrap();
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("Scan using {index}"))
                || plan.contains(&format!("Index Scan on {index}")),
            "{sql}\n{plan}"
        );
    }
}

/// A task row written directly, created and finished (unless open) `age_s` seconds ago, then
/// changed by `set` (an SQL `SET` list, or empty).
async fn old_row(db: &mut sqlx::PgConnection, id: &str, status: &str, age_s: i64, set: &str) {
    sqlx::query(
        "INSERT INTO coordinator.tasks (task_id, pool, status, attempt, max_attempts, created_at,
             updated_at, finished_at)
         SELECT $1, 'default', $2, 1, 1, now() - make_interval(secs => $3),
                now() - make_interval(secs => $3),
                CASE WHEN $2 IN ('queued', 'running') THEN NULL ELSE now() - make_interval(secs => $3) END",
    )
    .bind(id)
    .bind(status)
    .bind(age_s as f64)
    .execute(&mut *db)
    .await
    .unwrap();
    if !set.is_empty() {
        sqlx::query(&format!(
            "UPDATE coordinator.tasks SET {set} WHERE task_id = $1"
        ))
        .bind(id)
        .execute(&mut *db)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn finished_records_are_deleted_after_their_retention_and_open_ones_kept() {
    use taskbus_coordinator::retention::Retention;
    use taskbus_coordinator::store::PRUNE_SQL;
    let s = Stack::new(30_000).await;
    let retention = Retention {
        finished: Some(Duration::from_secs(3)),
        dead: None,
    };
    // Shorter than JetStream's duplicate window, a resubmitted id's work could be dropped.
    let mut c = s.coordinator_config();
    c.retention = retention;
    match taskbus_coordinator::start(c, CancellationToken::new()).await {
        Err(e) => assert!(e.to_string().contains("duplicate window"), "{e}"),
        Ok(_) => panic!("a retention under the duplicate window was accepted"),
    }
    let mut c = s.coordinator_config();
    c.retention = retention;
    c.streams.duplicate_window = Duration::from_secs(1);
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let token = CancellationToken::new();
    let running = taskbus_coordinator::start(c, token.clone()).await.unwrap();
    let http = running.http_addr.unwrap();

    let hour = 3_600;
    // One transaction, so that no maintenance pass sees a row before its last change.
    let mut tx = s.pg.begin().await.unwrap();
    for status in ["succeeded", "cancelled", "expired", "rejected"] {
        old_row(&mut tx, &format!("old-{status}"), status, hour, "").await;
    }
    old_row(&mut tx, "old-dead", "dead", hour, "").await; // no dead retention: kept
    old_row(&mut tx, "old-queued", "queued", hour, "").await; // open: kept
    old_row(&mut tx, "old-running", "running", hour, "").await;
    // Its terminal event is still due (the outbox): kept until sent. The maintenance pass
    // re-sends a due event 5 s after the row's last update, which is put in the future here
    // so that the event stays due for the test's length.
    let due = "event_due = true, updated_at = now() + interval '1 hour'";
    old_row(&mut tx, "old-due", "cancelled", hour, due).await;
    // Created long ago, finished a moment ago: kept until its own retention runs out.
    old_row(
        &mut tx,
        "late-finisher",
        "succeeded",
        hour,
        "finished_at = now()",
    )
    .await;
    old_row(&mut tx, "priced", "succeeded", hour, "payer = 'acme'").await;
    tx.commit().await.unwrap();

    let gone = [
        "old-succeeded",
        "old-cancelled",
        "old-expired",
        "old-rejected",
        "priced",
    ];
    eventually("old finished records deleted", T, || async {
        for id in gone {
            s.task(id).await.is_none().then_some(())?;
        }
        Some(())
    })
    .await;
    for kept in [
        "old-dead",
        "old-queued",
        "old-running",
        "old-due",
        "late-finisher",
    ] {
        assert!(s.task(kept).await.is_some(), "{kept} deleted");
    }
    eventually("the late finisher deleted in its turn", T, || async {
        s.task("late-finisher").await.is_none().then_some(())
    })
    .await;
    let (_, text) = taskbus_tests::http_get(http, "/metrics").await;
    assert!(
        text.contains(r#"taskbus_coordinator_tasks_pruned_total{status="succeeded"} 3"#),
        "{text}"
    );

    // End to end: a task runs, its record goes after the retention, and its id is then new
    // again (what docs/PROTOCOL.md says: deleting a record forgets the id).
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let _a = agent(&s, "keeper", move |_t: TaskContext| {
        r.fetch_add(1, Ordering::Relaxed);
        async { Ok(json!("done")) }
    });
    s.submit("default", json!({"kind": "x", "id": "again"}))
        .await;
    s.wait_status("again", "succeeded", T).await;
    s.submit("default", json!({"kind": "x", "id": "again"}))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1, "a known id runs once");
    eventually("the finished record deleted", T, || async {
        s.task("again").await.is_none().then_some(())
    })
    .await;
    let v = api(&s, "task.get", json!({"id": "again"})).await;
    assert_eq!(v["error"]["code"], 404, "{v}");
    assert!(
        v["error"]["error"].as_str().unwrap().contains("retention"),
        "{v}"
    );
    s.submit("default", json!({"kind": "x", "id": "again"}))
        .await;
    s.wait_status("again", "succeeded", T).await;
    assert_eq!(runs.load(Ordering::Relaxed), 2);

    // A pass reads the index of creation times from its oldest end (so with nothing to
    // delete it stops at the first task created after the cutoff) and deletes by primary key.
    // Planned against a table of 50,000 finished tasks (rolled back), where deleting
    // `IN (subquery)` was a hash join against a scan of the whole table.
    let mut tx = s.pg.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO coordinator.tasks (task_id, pool, status, created_at, finished_at)
         SELECT 'bulk-' || g, 'default', 'succeeded', now() - interval '2 days', now()
         FROM generate_series(1, 50000) g",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ANALYZE coordinator.tasks")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {PRUNE_SQL}"))
        .bind(Utc::now() - chrono::Duration::days(1))
        .bind(vec!["succeeded"])
        .bind(2_000i64)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("using tasks_created"), "{plan}");
    assert!(plan.contains("using tasks_pkey"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    token.cancel();
    running.wait().await;
}

#[tokio::test]
async fn overrunning_attempts_time_out_and_late_outcomes_change_nothing() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            retry_base_ms: 100,
            retry_max_ms: 100,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let _a = agent(&s, "slowpoke", |t: TaskContext| async move {
        // Ignores cancellation on purpose for the first attempt.
        if t.attempt == 1 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Ok(json!({"attempt": t.attempt}))
    });
    let mut timed_out = s
        .client
        .subscribe("taskbus.events.default.slow.timed_out")
        .await
        .unwrap();
    s.submit(
        "default",
        json!({"kind": "x", "id": "slow", "timeout_ms": 300, "max_attempts": 2}),
    )
    .await;
    let ev = next_json(&mut timed_out).await;
    assert_eq!(ev["attempt"], 1);
    let row = s.wait_status("slow", "succeeded", T).await;
    assert_eq!(row.attempt, 2);
    assert_eq!(row.result, Some(json!({"attempt": 2})));
    // A late success for attempt 1 arrives: nothing changes.
    publish_outcome(
        &s,
        "slow",
        1,
        "succeeded",
        json!({"result": "late", "agent_id": "ghost"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let row = s.task("slow").await.unwrap();
    assert_eq!(
        (row.status.as_str(), row.attempt, row.result),
        ("succeeded", 2, Some(json!({"attempt": 2})))
    );
}

/// Publish an outcome event as an agent would (JetStream, durable), with a unique message id.
async fn publish_outcome(s: &Stack, id: &str, attempt: u32, event: &str, extra: Value) {
    let mut body = json!({
        "event": event, "task_id": id, "pool": "default", "at": Utc::now().to_rfc3339(),
        "attempt": attempt, "agent_id": "tester", "duration_ms": 1, "error": "boom", "retryable": true
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    s.js.publish(
        format!("taskbus.events.default.{id}.{event}"),
        serde_json::to_vec(&body).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn cancelling_a_queued_task_means_it_never_runs() {
    let s = Stack::new(30_000).await;
    let (_c, http) = coordinator_with_metrics(&s).await;
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let _a = agent(&s, "c-agent", move |_t: TaskContext| {
        r.fetch_add(1, Ordering::Relaxed);
        async { Ok(json!(1)) }
    });
    let nb = Utc::now() + chrono::Duration::seconds(2);
    s.submit(
        "default",
        json!({"kind": "x", "id": "cq", "not_before": nb.to_rfc3339()}),
    )
    .await;
    s.wait_status("cq", "queued", T).await;
    let v = api(
        &s,
        "task.cancel",
        json!({"id": "cq", "reason": "changed my mind"}),
    )
    .await;
    assert_eq!(v["ok"]["status"], "cancelled", "{v}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        runs.load(Ordering::Relaxed),
        0,
        "a cancelled task never runs"
    );
    assert_eq!(s.task("cq").await.unwrap().status, "cancelled");
    // Cancelling again, or an unknown id, is a clear error.
    assert_eq!(
        api(&s, "task.cancel", json!({"id": "cq"})).await["error"]["code"],
        409
    );
    assert_eq!(
        api(&s, "task.cancel", json!({"id": "nope"})).await["error"]["code"],
        404
    );
    assert_eq!(
        api(&s, "task.cancel", json!({"id": "bad id"})).await["error"]["code"],
        400
    );
    assert_eq!(
        api(&s, "task.cancel", json!({"nope": 1})).await["error"]["code"],
        400
    );
    // Counted once: the refused second cancel is not an outcome.
    let (_, text) = taskbus_tests::http_get(http, "/metrics").await;
    assert!(
        text.contains(r#"taskbus_coordinator_outcomes_total{outcome="cancelled"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn tasks_cancelled_before_an_agent_starts_are_never_run_by_it() {
    let s = Stack::new(30_000).await;
    let (_c, _ct) = s.coordinator().await;
    for i in 0..30 {
        s.submit("default", json!({"kind": "x", "id": format!("pre-{i}")}))
            .await;
    }
    for i in 0..30 {
        let id = format!("pre-{i}");
        s.wait_status(&id, "queued", T).await;
        let v = api(&s, "task.cancel", json!({"id": id})).await;
        assert_eq!(v["ok"]["status"], "cancelled", "{v}");
    }
    // The agent starts with thirty cancelled tasks' work messages waiting for it: it pulls only
    // once it has replayed their cancellations, and acks them away unrun.
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = ran.clone();
    let _a = agent(&s, "late-agent", move |t: TaskContext| {
        r.lock().unwrap().push(t.task_id.clone());
        async { Ok(json!(1)) }
    });
    s.submit("default", json!({"kind": "x", "id": "after"}))
        .await;
    s.wait_status("after", "succeeded", T).await;
    s.wait_stream_empty("TASKBUS_WORK", T).await;
    assert_eq!(*ran.lock().unwrap(), vec!["after".to_string()]);
}

#[tokio::test]
async fn cancelling_a_running_task_tells_the_handler_and_late_outcomes_are_ignored() {
    let s = Stack::new(30_000).await;
    let (_c, _t) = s.coordinator().await;
    let saw_cancel = Arc::new(AtomicU64::new(0));
    let sc = saw_cancel.clone();
    let _a = agent(&s, "c-run", move |t: TaskContext| {
        let sc = sc.clone();
        async move {
            tokio::select! {
                _ = t.cancel.cancelled() => { sc.fetch_add(1, Ordering::Relaxed); Err(TaskError::Retryable("stopped".into())) }
                _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(json!("too late")),
            }
        }
    });
    s.submit("default", json!({"kind": "x", "id": "cr"})).await;
    s.wait_status("cr", "running", T).await;
    let v = api(&s, "task.cancel", json!({"id": "cr"})).await;
    assert_eq!(v["ok"]["status"], "cancelled");
    eventually("handler told", T, || async {
        (saw_cancel.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    // An outcome for the cancelled attempt (an agent that did not listen) changes nothing.
    publish_outcome(&s, "cr", 1, "succeeded", json!({"result": "ignored"})).await;
    publish_outcome(&s, "cr", 1, "failed", json!({})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let row = s.task("cr").await.unwrap();
    assert_eq!(row.status, "cancelled");
    assert_eq!(row.result, None);
}

#[tokio::test]
async fn an_agent_reporting_twice_is_recorded_once() {
    let s = Stack::new(30_000).await;
    let (_c, _t) = s.coordinator().await;
    s.submit("default", json!({"kind": "x", "id": "twice"}))
        .await;
    s.wait_status("twice", "queued", T).await;
    // The attempt ran on two agents (a redelivery): both report success, then a failure.
    let first = json!({"result": "first", "agent_id": "dup-a"});
    publish_outcome(&s, "twice", 1, "succeeded", first).await;
    let second = json!({"result": "second", "agent_id": "dup-b"});
    publish_outcome(&s, "twice", 1, "succeeded", second).await;
    publish_outcome(&s, "twice", 1, "failed", json!({"agent_id": "dup-c"})).await;
    s.wait_status("twice", "succeeded", T).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let row = s.task("twice").await.unwrap();
    assert_eq!(
        (row.status.as_str(), row.attempt, row.result),
        ("succeeded", 1, Some(json!("first")))
    );
    // A failure reported twice retries once.
    s.submit(
        "default",
        json!({"kind": "x", "id": "f-twice", "max_attempts": 3}),
    )
    .await;
    s.wait_status("f-twice", "queued", T).await;
    publish_outcome(&s, "f-twice", 1, "failed", json!({"agent_id": "dup-f"})).await;
    publish_outcome(&s, "f-twice", 1, "failed", json!({"agent_id": "dup-f"})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.task("f-twice").await.unwrap().attempt, 2);

    // Reputation counts what was recorded, once: the success for the agent whose result was
    // kept, and the repeated failure once.
    let figures = || async {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT agent_id, successes, failures FROM coordinator.agents
             WHERE agent_id LIKE 'dup-%' ORDER BY agent_id",
        )
        .fetch_all(&s.pg)
        .await
        .unwrap();
        rows
    };
    let want = vec![("dup-a".to_string(), 1, 0), ("dup-f".to_string(), 0, 1)];
    eventually("reputation figures flushed", T, || async {
        (figures().await.len() >= 2).then_some(())
    })
    .await;
    // The maintenance pass flushes once a second: give a wrong extra count time to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(figures().await, want);
}

#[tokio::test]
async fn dead_tasks_are_replayed_with_fresh_attempts() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            retry_base_ms: 50,
            retry_max_ms: 50,
            // Six failures in a row would open the agent's breaker for 30 s; not this test's
            // subject.
            breaker_threshold: 0,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let healthy = Arc::new(AtomicU64::new(0));
    let h = healthy.clone();
    let _a = agent(&s, "dlq-agent", move |t: TaskContext| {
        let ok = h.load(Ordering::Relaxed) == 1;
        async move {
            if ok {
                Ok(json!({"attempt": t.attempt}))
            } else {
                Err(TaskError::Retryable("down".into()))
            }
        }
    });
    for i in 0..3 {
        s.submit(
            "default",
            json!({"kind": "x", "id": format!("dq{i}"), "max_attempts": 2}),
        )
        .await;
    }
    for i in 0..3 {
        s.wait_status(&format!("dq{i}"), "dead", T).await;
    }
    let v = api(&s, "tasks.list", json!({"status": "dead"})).await;
    assert_eq!(v["ok"].as_array().unwrap().len(), 3);
    healthy.store(1, Ordering::Relaxed);
    let v = api(&s, "dlq.replay", json!({"ids": ["dq0", "dq1", "unknown"]})).await;
    assert_eq!(v["ok"]["replayed"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["ok"]["skipped"], json!(["unknown"]));
    let row = s.wait_status("dq0", "succeeded", T).await;
    assert_eq!(row.attempt, 3, "fresh attempt after the two used ones");
    assert_eq!(s.task("dq2").await.unwrap().status, "dead");
    let v = api(&s, "dlq.replay", json!({"pool": "default"})).await;
    assert_eq!(v["ok"]["replayed"], json!(["dq2"]));
    s.wait_status("dq2", "succeeded", T).await;
    assert_eq!(
        api(&s, "dlq.replay", json!({"limit": 0})).await["error"]["code"],
        400
    );
    assert_eq!(
        api(&s, "dlq.replay", json!({"ids": ["a b"]})).await["error"]["code"],
        400
    );
}

#[tokio::test]
async fn heartbeats_breaker_and_reputation() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            breaker_threshold: 3,
            breaker_cooldown_ms: 60_000,
            retry_base_ms: 50,
            retry_max_ms: 50,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let _good = agent(
        &s,
        "good-agent",
        |t: TaskContext| async move { Ok(t.payload) },
    );
    // Let the good agent build a record first, then the bad one joins.
    for i in 0..5 {
        s.submit("default", json!({"kind": "x", "id": format!("g{i}")}))
            .await;
    }
    for i in 0..5 {
        s.wait_status(&format!("g{i}"), "succeeded", T).await;
    }
    let _bad = agent(&s, "bad-agent", |_t: TaskContext| async {
        Err(TaskError::Retryable("broken".into()))
    });
    let mut hb = s
        .client
        .subscribe("taskbus.agents.default.bad-agent.heartbeat")
        .await
        .unwrap();
    // Once it is pulling, the bad agent gets its share of the tasks.
    next_json(&mut hb).await;
    for i in 0..30 {
        s.submit(
            "default",
            json!({"kind": "x", "id": format!("b{i}"), "max_attempts": 10}),
        )
        .await;
    }
    // The bad agent fails three in a row, opens its breaker and reports it.
    let open = tokio::time::timeout(T, async {
        loop {
            let v = next_json(&mut hb).await;
            if v["breaker"] == "open" {
                return v;
            }
        }
    })
    .await
    .expect("breaker open in a heartbeat");
    // Tasks already in flight when it opened may add to the count.
    assert!(
        open["consecutive_failures"].as_u64().unwrap() >= 3,
        "{open}"
    );
    // Every task still succeeds: the good agent takes over.
    for i in 0..30 {
        s.wait_status(&format!("b{i}"), "succeeded", T).await;
    }
    // Reputation is flushed once a second: wait until the bad agent's failures show.
    let rep = |a: &Value| {
        a["reputation"]
            .as_str()
            .and_then(|r| r.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let agents = eventually("agents listed with reputations", T, || async {
        let v = api(&s, "agents.list", json!({})).await;
        let list = v["ok"].as_array()?.clone();
        let of = |id: &str| list.iter().find(|a| a["agent_id"] == id).map(rep);
        (list.len() == 2
            && list.iter().all(|a| a["health"] != "gone")
            && of("bad-agent")? < of("good-agent")?)
        .then_some(list)
    })
    .await;
    let bad = agents
        .iter()
        .find(|a| a["agent_id"] == "bad-agent")
        .unwrap();
    let good = agents
        .iter()
        .find(|a| a["agent_id"] == "good-agent")
        .unwrap();
    assert_eq!(bad["health"], "paused");
    assert_eq!(bad["breaker"], "open");

    assert!((0.45..=1.0).contains(&rep(bad)));
    assert_eq!(rep(good), 1.0);
    // The good agent stamps its multiplier into its succeeded events.
    let mut ok = s
        .client
        .subscribe("taskbus.events.default.stamp.succeeded")
        .await
        .unwrap();
    s.submit("default", json!({"kind": "x", "id": "stamp"}))
        .await;
    let ev = next_json(&mut ok).await;
    assert_eq!(ev["agent_id"], "good-agent");
    assert_eq!(ev["reputation"], "1.0000");
}

#[tokio::test]
async fn a_flooding_tenant_does_not_block_another_beyond_the_fairness_limit() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            fairness_limit: 2,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let _a = agent(&s, "fair-agent", |_t: TaskContext| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(json!(1))
    });
    // Tenant a floods the pool with 10,000 tasks.
    let js = s.js.clone();
    let mut acks = Vec::new();
    let flood: usize = std::env::var("FAIR_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for i in 0..flood {
        let body = json!({"kind": "x", "id": format!("a{i}"), "labels": {"tenant": "a"}});
        acks.push(
            js.publish(
                "taskbus.submit.default",
                serde_json::to_vec(&body).unwrap().into(),
            )
            .await
            .unwrap(),
        );
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    // Tenant b's single task still runs promptly.
    let t0 = Instant::now();
    s.submit(
        "default",
        json!({"kind": "x", "id": "b-task", "labels": {"tenant": "b"}}),
    )
    .await;
    let mut max_active_a = 0i64;
    loop {
        let active_a: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM coordinator.tasks WHERE fair_key = 'a' AND status IN ('queued', 'running')",
        )
        .fetch_one(&s.pg)
        .await
        .unwrap();
        max_active_a = max_active_a.max(active_a);
        if s.task("b-task")
            .await
            .is_some_and(|t| t.status == "succeeded")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "tenant b waited too long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coordinator.tasks WHERE fair_key = 'a' AND status = 'succeeded'",
    )
    .fetch_one(&s.pg)
    .await
    .unwrap();
    assert!(
        max_active_a <= 2,
        "tenant a had {max_active_a} tasks queued or running at once"
    );
    eprintln!(
        "b done after {:?}; a: {done_a} done, at most {max_active_a} active",
        t0.elapsed()
    );
    assert!(
        (done_a as usize) < flood,
        "b did not wait for a's whole flood ({done_a} of a's tasks done)"
    );
    let held_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coordinator.tasks WHERE fair_key = 'a' AND status = 'admitted'",
    )
    .fetch_one(&s.pg)
    .await
    .unwrap();
    assert!(held_a > 0, "a's flood is held back, not dropped");
    // Lifting the limit releases the held tasks.
    s.set_pool(
        "default",
        PoolSettings {
            fairness_limit: 0,
            ..Default::default()
        },
    )
    .await;
    eventually("held tasks released", T, || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks WHERE status = 'admitted'")
                .fetch_one(&s.pg)
                .await
                .ok()?;
        (n == 0).then_some(())
    })
    .await;
}

/// The documented priority rule, as an independent model: with one slot and tasks waiting in
/// every band, an agent takes `high` before `normal` before `low`, except that every tenth
/// task it takes is a `low` one while any wait.
fn expected_priority_order(
    mut high: usize,
    mut normal: usize,
    mut low: usize,
) -> Vec<&'static str> {
    let mut out = Vec::new();
    while high + normal + low > 0 {
        let tenth = out.len() % taskbus_agent::LOW_EVERY == taskbus_agent::LOW_EVERY - 1;
        let band = if low > 0 && (tenth || high + normal == 0) {
            low -= 1;
            "low"
        } else if high > 0 {
            high -= 1;
            "high"
        } else {
            normal -= 1;
            "normal"
        };
        out.push(band);
    }
    out
}

#[tokio::test]
async fn high_goes_before_normal_before_low_and_low_is_not_starved() {
    let s = Stack::new(30_000).await;
    let (_c, _t) = s.coordinator().await;
    // Published low first, then normal, then high: arrival order is the reverse of priority.
    for band in ["low", "normal", "high"] {
        for i in 0..25 {
            s.submit(
                "default",
                json!({"kind": "x", "id": format!("{band}-{i:02}"), "priority": band, "payload": {"band": band}}),
            )
            .await;
        }
    }
    // Wait until all 75 wait in the work stream, then let one single-slot agent take them.
    eventually("all 75 tasks queued for agents", T, || async {
        let mut pending = 0;
        for p in taskbus_proto::Priority::ALL {
            let mut c = s
                .js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    s.subjects.work_consumer("default", p),
                    s.subjects.work_stream(),
                )
                .await
                .ok()?;
            pending += c.info().await.ok()?.num_pending;
        }
        (pending == 75).then_some(())
    })
    .await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = order.clone();
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "prio-agent".into();
    cfg.concurrency = 1;
    let a = Agent::new(cfg, move |t: TaskContext| {
        let seen = seen.clone();
        async move {
            let band = t.payload["band"].as_str().unwrap_or("?").to_string();
            seen.lock().unwrap().push(band);
            Ok(json!(null))
        }
    });
    let stop = CancellationToken::new();
    let t = stop.clone();
    let running = tokio::spawn(async move { a.run(t).await });
    eventually("all 75 succeeded", T, || async {
        (s.count("succeeded").await == 75).then_some(())
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
    let got = order.lock().unwrap().clone();
    let want = expected_priority_order(25, 25, 25);
    assert_eq!(got, want, "start order by band");
    eprintln!(
        "start order: {}",
        got.iter().map(|b| &b[..1]).collect::<String>()
    );
}

#[tokio::test]
async fn the_pre_priority_work_consumer_is_replaced_and_its_queue_served() {
    use async_nats::jetstream::consumer;
    let s = Stack::new(30_000).await;
    let stream = s.js.get_stream(s.subjects.work_stream()).await.unwrap();
    // What an older coordinator left behind: one consumer over every band of the pool, and a
    // task it had not delivered yet.
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("work-default".into()),
            filter_subject: s.subjects.work_pool("default"),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let item = r#"{"attempt":1,"pool":"default","task":{"id":"legacy-1","kind":"x"}}"#;
    serde_json::from_str::<taskbus_proto::WorkItem>(item).expect("a valid work item");
    s.js.publish("taskbus.work.default.normal", item.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (_c, _t) = s.coordinator().await;
    let names: Vec<String> = stream
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|n| n.unwrap())
        .collect();
    assert!(!names.contains(&"work-default".to_string()), "{names:?}");
    for band in ["high", "normal", "low"] {
        assert!(names.contains(&format!("work-default-{band}")), "{names:?}");
    }
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ran.clone();
    let _a = agent(&s, "after-upgrade", move |t: TaskContext| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(t.task_id.clone());
            Ok(json!(null))
        }
    });
    s.submit("default", json!({"kind": "x", "id": "new-1"}))
        .await;
    s.wait_status("new-1", "succeeded", T).await;
    eventually("the old queued task ran", T, || async {
        ran.lock()
            .unwrap()
            .contains(&"legacy-1".to_string())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn terminal_events_a_crash_left_unannounced_are_re_sent() {
    let s = Stack::new(30_000).await;
    let (_c, _t) = s.coordinator().await;
    let ids = [
        "lost-dead",
        "lost-cancelled",
        "lost-expired",
        "back-in-queue",
        "api-cancel",
        "lost-paid-success",
        "lost-paid-dead",
        "plain-success",
    ];
    for id in ids {
        s.submit("default", json!({"kind": "x", "id": id})).await;
    }
    for id in ids {
        s.wait_status(id, "queued", T).await;
    }
    let mut events = s
        .client
        .subscribe("taskbus.events.default.*.*")
        .await
        .unwrap();
    // What a coordinator killed right after writing a terminal status leaves behind: the status
    // and its outbox mark, no event.
    for (id, set) in [
        ("lost-dead", "status = 'dead', attempt = 2, error = 'boom'"),
        ("lost-cancelled", "status = 'cancelled', error = 'stop'"),
        (
            "lost-expired",
            "status = 'expired', deadline = now() - interval '1 minute'",
        ),
        // Marked, but no longer terminal (replayed since): nothing to announce.
        ("back-in-queue", "status = 'queued'"),
        // Priced tasks also get their `closed` event (the ledger settles on it); for a success,
        // that is the only event the coordinator sends.
        (
            "lost-paid-success",
            "status = 'succeeded', payer = 'acme', agent_id = 'agent-z', reputation = '0.8'",
        ),
        (
            "lost-paid-dead",
            "status = 'dead', attempt = 2, error = 'x', payer = 'acme'",
        ),
        // An unpriced success has nothing for the coordinator to announce.
        (
            "plain-success",
            "status = 'succeeded', agent_id = 'agent-z'",
        ),
    ] {
        sqlx::query(&format!(
            "UPDATE coordinator.tasks SET {set}, finished_at = now(), event_due = true,
                    updated_at = now() - interval '10 seconds' WHERE task_id = $1"
        ))
        .bind(id)
        .execute(&s.pg)
        .await
        .unwrap();
    }
    // A cancel through the API clears its own mark once the event is stored.
    let v = api(&s, "task.cancel", json!({"id": "api-cancel"})).await;
    assert_eq!(v["ok"]["status"], "cancelled", "{v}");
    let due: bool =
        sqlx::query_scalar("SELECT event_due FROM coordinator.tasks WHERE task_id = 'api-cancel'")
            .fetch_one(&s.pg)
            .await
            .unwrap();
    assert!(!due, "the API's cancel left its outbox mark set");

    let mut seen = std::collections::HashMap::new();
    let t0 = Instant::now();
    while seen.len() < 7 {
        assert!(t0.elapsed() < T, "re-sent events so far: {seen:?}");
        let v = next_json(&mut events).await;
        let key = format!(
            "{}:{}",
            v["task_id"].as_str().unwrap(),
            v["event"].as_str().unwrap()
        );
        seen.insert(key, v);
    }
    assert_eq!(seen["lost-dead:dead"]["attempts"], 2);
    assert_eq!(seen["lost-dead:dead"]["last_error"], "boom");
    assert_eq!(seen["lost-cancelled:cancelled"]["reason"], "stop");
    assert!(seen.contains_key("lost-expired:expired"));
    assert!(seen.contains_key("api-cancel:cancelled"));
    let c = &seen["lost-paid-success:closed"];
    assert_eq!(
        (
            &c["status"],
            &c["agent_id"],
            &c["reputation"],
            &c["attempt"]
        ),
        (
            &json!("succeeded"),
            &json!("agent-z"),
            &json!("0.8"),
            &json!(1)
        ),
        "{c}"
    );
    assert!(seen.contains_key("lost-paid-dead:dead"));
    assert_eq!(seen["lost-paid-dead:closed"]["status"], "dead");
    assert_eq!(seen["lost-paid-dead:closed"]["attempt"], 2);
    eventually("every outbox mark cleared", T, || async {
        let due: i64 = sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks WHERE event_due")
            .fetch_one(&s.pg)
            .await
            .ok()?;
        (due == 0).then_some(())
    })
    .await;
    // Nothing was announced for the task that is queued again, nor for the unpriced success.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), events.next()).await {
        assert!(!m.subject.contains("back-in-queue"), "{}", m.subject);
        assert!(!m.subject.contains("plain-success"), "{}", m.subject);
    }
    // The events are durable: they are in the events stream.
    let st = s.js.get_stream(s.subjects.events_stream()).await.unwrap();
    for subject in [
        "taskbus.events.default.lost-dead.dead",
        "taskbus.events.default.lost-cancelled.cancelled",
        "taskbus.events.default.lost-expired.expired",
    ] {
        st.get_last_raw_message_by_subject(subject)
            .await
            .unwrap_or_else(|e| panic!("{subject} not stored: {e}"));
    }
}

#[tokio::test]
async fn a_replayed_task_that_dies_again_is_announced_again() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            breaker_threshold: 0,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let _a = agent(&s, "always-fails", |_t: TaskContext| async {
        Err(TaskError::Fatal("broken".into()))
    });
    s.submit("default", json!({"kind": "x", "id": "twice-dead"}))
        .await;
    s.wait_status("twice-dead", "dead", T).await;
    let v = api(&s, "dlq.replay", json!({"ids": ["twice-dead"]})).await;
    assert_eq!(v["ok"]["replayed"], json!(["twice-dead"]), "{v}");
    eventually("dead again", T, || async {
        let t = s.task("twice-dead").await?;
        (t.status == "dead" && t.attempt == 2).then_some(())
    })
    .await;
    // Both deaths are in the events stream (the second is not taken for a duplicate).
    let stream = s.js.get_stream(s.subjects.events_stream()).await.unwrap();
    eventually("two dead events stored", T, || async {
        let mut info = stream
            .info_with_subjects("taskbus.events.default.twice-dead.dead")
            .await
            .ok()?;
        let mut n = 0;
        while let Some(Ok((_, count))) = info.next().await {
            n += count;
        }
        (n == 2).then_some(())
    })
    .await;
}

/// W3C trace context: a valid `traceparent` on the submit message reaches the handler on every
/// attempt (the retry's work message is built from the task's record) and travels on each
/// attempt's `started` and outcome events, and on the coordinator's `retry_scheduled`, `dead`
/// and `rejected` events; a malformed one is dropped and the task runs all the same.
#[tokio::test]
async fn a_traceparent_follows_the_task_through_its_attempts_and_events() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let s = Stack::new(30_000).await;
    s.set_pool(
        "default",
        PoolSettings {
            retry_base_ms: 500,
            retry_max_ms: 1000,
            ..Default::default()
        },
    )
    .await;
    let (_c, _t) = s.coordinator().await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sn = seen.clone();
    let _a = agent(&s, "tracer", move |t: TaskContext| {
        sn.lock()
            .unwrap()
            .push((t.task_id.clone(), t.attempt, t.traceparent.clone()));
        async move {
            if t.task_id == "traced" && t.attempt == 1 || t.task_id == "doomed" {
                Err(TaskError::Retryable("this attempt fails".into()))
            } else {
                Ok(json!("ok"))
            }
        }
    });
    let mut events = s
        .client
        .subscribe("taskbus.events.default.>")
        .await
        .unwrap();
    let submit = |id: &str, tp: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("traceparent", tp);
        let later = |s: i64| (Utc::now() + chrono::Duration::seconds(s)).to_rfc3339();
        let body = match id {
            "doomed" => json!({"kind": "x", "id": id, "max_attempts": 1}),
            "refused" => json!({"kind": "x", "id": id, "not_a_field": 1}),
            // Waits a minute: cancelled, crashed and expired before any agent sees them.
            "waiting" | "crashed" | "late" => {
                json!({"kind": "x", "id": id, "not_before": later(60)})
            }
            _ => json!({"kind": "x", "id": id, "max_attempts": 2}),
        }
        .to_string();
        let js = s.js.clone();
        async move {
            js.publish_with_headers("taskbus.submit.default", h, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    submit("traced", TP).await;
    submit("garbled", "00-NOT-A-TRACE-01\u{7f}").await;
    submit("doomed", TP).await;
    submit("refused", TP).await;
    for id in ["waiting", "crashed", "late"] {
        submit(id, TP).await;
    }
    s.wait_status("waiting", "queued", T).await;
    let v = api(&s, "task.cancel", json!({"id": "waiting"})).await;
    assert_eq!(v["ok"]["status"], "cancelled", "{v}");
    // A coordinator killed right after writing `dead` for a priced task: its outbox re-sends
    // `dead` and `closed`.
    s.wait_status("crashed", "queued", T).await;
    sqlx::query(
        "UPDATE coordinator.tasks SET status = 'dead', error = 'x', payer = 'acme', finished_at = now(),
                event_due = true, updated_at = now() - interval '10 seconds'
         WHERE task_id = 'crashed'",
    )
    .execute(&s.pg)
    .await
    .unwrap();
    // Its deadline passes while it waits: the coordinator expires it.
    s.wait_status("late", "queued", T).await;
    sqlx::query("UPDATE coordinator.tasks SET deadline = now() - interval '1 second' WHERE task_id = 'late'")
        .execute(&s.pg)
        .await
        .unwrap();
    s.wait_status("late", "expired", T).await;
    s.wait_status("traced", "succeeded", T).await;
    s.wait_status("garbled", "succeeded", T).await;
    s.wait_status("doomed", "dead", T).await;
    s.wait_status("refused", "rejected", T).await;
    // The record says which trace the task belongs to (`taskbus task get`).
    let traced = api(&s, "task.get", json!({"id": "traced"})).await;
    assert_eq!(traced["ok"]["traceparent"], TP, "{traced}");
    let garbled = api(&s, "task.get", json!({"id": "garbled"})).await;
    assert!(garbled["ok"].get("traceparent").is_none(), "{garbled}");

    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("doomed".to_string(), 1, Some(TP.to_string())),
            ("garbled".to_string(), 1, None),
            ("traced".to_string(), 1, Some(TP.to_string())),
            ("traced".to_string(), 2, Some(TP.to_string())),
        ]
    );
    // Every event the agent published, with the header it carried.
    let key = |id: &str, kind: &str, a: u64| (id.to_string(), kind.to_string(), a);
    let want: BTreeMap<_, _> = [
        (key("traced", "started", 1), Some(TP.to_string())),
        (key("traced", "failed", 1), Some(TP.to_string())),
        (key("traced", "started", 2), Some(TP.to_string())),
        (key("traced", "succeeded", 2), Some(TP.to_string())),
        (key("garbled", "started", 1), None),
        (key("garbled", "succeeded", 1), None),
        // Written by the coordinator, from the task's record or the submit message.
        (key("traced", "retry_scheduled", 2), Some(TP.to_string())),
        (key("doomed", "started", 1), Some(TP.to_string())),
        (key("doomed", "failed", 1), Some(TP.to_string())),
        (key("doomed", "dead", 1), Some(TP.to_string())),
        (key("refused", "rejected", 0), Some(TP.to_string())),
        (key("waiting", "cancelled", 0), Some(TP.to_string())),
        (key("crashed", "dead", 1), Some(TP.to_string())),
        (key("crashed", "closed", 1), Some(TP.to_string())),
        (key("late", "expired", 0), Some(TP.to_string())),
    ]
    .into();
    let mut headers = BTreeMap::new();
    let deadline = Instant::now() + T;
    while headers.len() < want.len() && Instant::now() < deadline {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await else {
            break;
        };
        let parts: Vec<&str> = m.subject.split('.').collect();
        let kind = parts[4];
        let kinds = [
            "started",
            "failed",
            "succeeded",
            "retry_scheduled",
            "dead",
            "rejected",
            "cancelled",
            "closed",
            "expired",
        ];
        if !kinds.contains(&kind) {
            continue;
        }
        let body = serde_json::from_slice::<Value>(&m.payload).unwrap();
        let attempt = body["attempt"]
            .as_u64()
            .or(body["attempts"].as_u64())
            .unwrap_or(0);
        let tp = m
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str().to_string());
        headers.insert(key(parts[3], kind, attempt), tp);
    }
    assert_eq!(headers, want);
}
