//! End-to-end tests of the spine against a real nats-server and a real PostgreSQL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use taskbus_agent::{Agent, AgentConfig, CancellationToken, TaskContext, TaskError};
use taskbus_tests::stack::Stack;
use taskbus_tests::{eventually, workspace_bin, PgServer, TestDb};
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(30);

/// Publish `n` echo tasks `<prefix><i>` to pool `default`, pausing `pause` after every
/// `every` of them, then wait for every publish ack.
fn produce(
    stack: &Stack,
    prefix: &'static str,
    n: usize,
    every: usize,
    pause: Duration,
) -> JoinHandle<()> {
    let js = stack.js.clone();
    tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..n {
            let body = serde_json::to_vec(
                &json!({"kind": "echo", "id": format!("{prefix}{i}"), "payload": i}),
            )
            .unwrap();
            acks.push(
                js.publish("taskbus.submit.default", body.into())
                    .await
                    .unwrap(),
            );
            if i % every == 0 {
                tokio::time::sleep(pause).await;
            }
        }
        for a in acks {
            a.await.unwrap();
        }
    })
}

/// Wait until all `n` tasks succeeded, and check that the table holds exactly `n` tasks.
async fn all_succeeded_none_invented(s: &Stack, n: usize) {
    eventually("all tasks succeeded", Duration::from_secs(90), || async {
        (s.count("succeeded").await == n as i64).then_some(())
    })
    .await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks")
        .fetch_one(&s.pg)
        .await
        .unwrap();
    assert_eq!(total, n as i64, "no task lost, none invented");
}

#[tokio::test]
async fn happy_path_with_events() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let (_a, _at, runs) = s.echo_agent("agent-1", 4);
    let mut events = s
        .client
        .subscribe("taskbus.events.default.t-happy.>")
        .await
        .unwrap();
    s.submit(
        "default",
        json!({"kind": "echo", "payload": {"x": 1}, "id": "t-happy"}),
    )
    .await;
    let row = s.wait_status("t-happy", "succeeded", T).await;
    assert_eq!(row.result, Some(json!({"x": 1})));
    assert_eq!(row.attempt, 1);
    assert_eq!(row.agent_id.as_deref(), Some("agent-1"));
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(T, events.next())
            .await
            .expect("event")
            .expect("open");
        seen.push(m.subject.rsplit('.').next().unwrap().to_string());
    }
    assert_eq!(seen, ["admitted", "started", "succeeded"]);
    // Only the durable one is stored: the informational events travel on core NATS alone.
    let stream = s.js.get_stream(s.subjects.events_stream()).await.unwrap();
    let stored: Vec<String> = stream
        .info_with_subjects("taskbus.events.default.t-happy.>")
        .await
        .unwrap()
        .map_ok(|(subject, _count)| subject)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored, ["taskbus.events.default.t-happy.succeeded"]);
}

#[tokio::test]
async fn an_events_stream_that_stored_every_event_is_narrowed_on_start() {
    let s = Stack::new(30_000).await;
    // The events stream as releases before the sixth session set it up: one catch-all subject.
    let mut old = taskbus_proto::streams::events_stream(&s.subjects, &Default::default());
    old.subjects = vec!["taskbus.events.>".into()];
    s.js.update_stream(old).await.unwrap();
    let (_coord, _ct) = s.coordinator().await;
    let mut stream = s.js.get_stream(s.subjects.events_stream()).await.unwrap();
    let subjects = stream.info().await.unwrap().config.subjects.clone();
    assert!(subjects.contains(&"taskbus.events.*.*.succeeded".to_string()));
    assert!(!subjects
        .iter()
        .any(|x| x.ends_with(".>") || x.ends_with(".started")));
    // A `started` on core NATS is no longer stored; a `succeeded` still is.
    let before = stream.info().await.unwrap().state.messages;
    s.client
        .publish("taskbus.events.default.t-old.started", "{}".into())
        .await
        .unwrap();
    s.client.flush().await.unwrap();
    s.js.publish("taskbus.events.default.t-old.succeeded", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, before + 1);
}

#[tokio::test]
async fn every_rejection_reason_is_recorded() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("default", b"not json".to_vec(), "invalid_json", "seq-"),
        ("default", br#"[1]"#.to_vec(), "invalid_json", "seq-"),
        (
            "default",
            br#"{"id":"r-unknown","kind":"a","bogus":1}"#.to_vec(),
            "unknown_field",
            "r-unknown",
        ),
        (
            "default",
            br#"{"id":"r-missing","payload":1}"#.to_vec(),
            "missing_field",
            "r-missing",
        ),
        (
            "default",
            br#"{"id":"bad id!","kind":"a"}"#.to_vec(),
            "invalid_id",
            "seq-",
        ),
        (
            "default",
            br#"{"id":"r-prio","kind":"a","priority":"urgent"}"#.to_vec(),
            "invalid_value",
            "r-prio",
        ),
        (
            "default",
            br#"{"id":"r-att","kind":"a","max_attempts":0}"#.to_vec(),
            "invalid_value",
            "r-att",
        ),
        (
            "default",
            br#"{"id":"r-price","kind":"a","price":"-3","payer":"p"}"#.to_vec(),
            "invalid_value",
            "r-price",
        ),
        (
            "default",
            br#"{"id":"r-ver","kind":"a","v":9}"#.to_vec(),
            "unsupported_version",
            "r-ver",
        ),
        (
            "default",
            br#"{"id":"r-dl","kind":"a","deadline":"2000-01-01T00:00:00Z"}"#.to_vec(),
            "deadline_passed",
            "r-dl",
        ),
        (
            "default",
            format!(
                r#"{{"id":"r-big","kind":"a","payload":"{}"}}"#,
                "x".repeat(300_000)
            )
            .into_bytes(),
            "too_large",
            "r-big",
        ),
        (
            "nope",
            br#"{"id":"r-pool","kind":"a"}"#.to_vec(),
            "unknown_pool",
            "r-pool",
        ),
        (
            "Bad_Pool",
            br#"{"id":"r-badpool","kind":"a"}"#.to_vec(),
            "unknown_pool",
            "r-badpool",
        ),
    ];
    let mut rejected = s
        .client
        .subscribe("taskbus.events.*.*.rejected")
        .await
        .unwrap();
    for (pool, body, _, _) in &cases {
        s.submit_raw(pool, body.clone()).await;
    }
    for (_, _, reason, id) in &cases {
        let row = eventually(&format!("rejection {reason} for {id}"), T, || async {
            let q = if id.ends_with('-') {
                sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
                    "SELECT status, reason, reason_message FROM coordinator.tasks WHERE task_id LIKE 'seq-%' AND reason = $1",
                )
                .bind(reason)
            } else {
                sqlx::query_as("SELECT status, reason, reason_message FROM coordinator.tasks WHERE task_id = $1").bind(*id)
            };
            q.fetch_optional(&s.pg).await.ok().flatten()
        })
        .await;
        assert_eq!(row.0, "rejected");
        assert_eq!(row.1.as_deref(), Some(*reason));
        assert!(
            row.2.is_some_and(|m| m.len() > 10),
            "a sentence for {reason}"
        );
    }
    // Each rejection is also an event with its reason.
    let mut reasons = Vec::new();
    while reasons.len() < cases.len() {
        let m = tokio::time::timeout(T, rejected.next())
            .await
            .expect("rejected event")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["event"], "rejected");
        reasons.push(v["reason"].as_str().unwrap().to_string());
    }
    for (_, _, reason, _) in &cases {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no rejected event for {reason}"
        );
    }
    // Nothing is left looping on the submit stream.
    let consumer_pending = eventually("submit stream drained", T, || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            s.js.get_consumer_from_stream("coordinator", "TASKBUS_SUBMIT")
                .await
                .ok()?;
        let info = c.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    let () = consumer_pending;
    // The coordinator is still alive and admits good work.
    s.submit("default", json!({"kind": "echo", "id": "after-garbage"}))
        .await;
    s.wait_status("after-garbage", "queued", T).await;
}

#[tokio::test]
async fn duplicate_ids_run_once_and_a_fixed_rejection_is_admitted() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    for i in 0..3 {
        s.submit(
            "default",
            json!({"kind": "echo", "id": "dup", "payload": i}),
        )
        .await;
    }
    let (_a, _at, runs) = s.echo_agent("agent-d", 4);
    let row = s.wait_status("dup", "succeeded", T).await;
    assert_eq!(row.result, Some(json!(0)), "the first submission wins");
    // Long after JetStream's duplicate window would matter, the id is still known.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.submit(
        "default",
        json!({"kind": "echo", "id": "dup", "payload": 9}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    assert_eq!(s.task("dup").await.unwrap().result, Some(json!(0)));

    // A refused message does not burn its id: the corrected one is admitted.
    s.submit_raw(
        "default",
        br#"{"id":"fixme","kind":"echo","oops":1}"#.to_vec(),
    )
    .await;
    s.wait_status("fixme", "rejected", T).await;
    s.submit(
        "default",
        json!({"kind": "echo", "id": "fixme", "payload": "ok"}),
    )
    .await;
    let row = s.wait_status("fixme", "succeeded", T).await;
    assert_eq!(row.result, Some(json!("ok")));
}

#[tokio::test]
async fn nats_msg_id_names_tasks_without_an_id() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "from-header");
    s.js.publish_with_headers(
        "taskbus.submit.default",
        headers,
        r#"{"kind":"echo"}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    s.wait_status("from-header", "queued", T).await;
    s.submit("default", json!({"kind": "echo"})).await;
    eventually("generated id", T, || async {
        (s.count("queued").await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn failing_tasks_are_retried_then_dead() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "failer".into();
    let agent = Agent::new(cfg, |t: TaskContext| async move {
        if t.kind == "fatal" {
            Err::<serde_json::Value, _>(TaskError::Fatal("no".into()))
        } else {
            Err(TaskError::Retryable(format!("attempt {}", t.attempt)))
        }
    });
    let token = CancellationToken::new();
    let t2 = token.clone();
    let _h = tokio::spawn(async move { agent.run(t2).await.unwrap() });
    let mut dead = s
        .client
        .subscribe("taskbus.events.default.*.dead")
        .await
        .unwrap();
    s.submit(
        "default",
        json!({"kind": "x", "id": "f1", "max_attempts": 3}),
    )
    .await;
    s.submit(
        "default",
        json!({"kind": "fatal", "id": "f2", "max_attempts": 3}),
    )
    .await;
    let row = s.wait_status("f1", "dead", T).await;
    assert_eq!(row.attempt, 3);
    assert_eq!(row.error.as_deref(), Some("attempt 3"));
    let row = s.wait_status("f2", "dead", T).await;
    assert_eq!(row.attempt, 1, "fatal errors are not retried");
    for _ in 0..2 {
        tokio::time::timeout(T, dead.next())
            .await
            .expect("dead event");
    }
    token.cancel();
}

#[tokio::test]
async fn agent_killed_mid_task_is_redelivered_and_completed_once() {
    let s = Stack::new(1_000).await;
    let (_coord, _ct) = s.coordinator().await;
    // Agent A is a real process running the sleep handler; it takes the task, then dies.
    let mut a = tokio::process::Command::new(workspace_bin("taskbus-agent"))
        .args([
            "--pool",
            "default",
            "--handler",
            "sleep",
            "--agent-id",
            "doomed",
            "--nats-url",
            &s.nats.url(),
            "--http-listen",
            "127.0.0.1:0",
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    let mut started = s
        .client
        .subscribe("taskbus.events.default.victim.started")
        .await
        .unwrap();
    s.submit(
        "default",
        json!({"kind": "sleep", "id": "victim", "payload": {"ms": 3_600_000}}),
    )
    .await;
    let m = tokio::time::timeout(T, started.next())
        .await
        .expect("started")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["agent_id"], "doomed");
    a.kill().await.unwrap(); // SIGKILL: no drain, no hand-back.

    // Agent B (in-process, returns at once) gets the task when A's lease runs out.
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "rescuer".into();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let b = Agent::new(cfg, move |_t: TaskContext| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::Relaxed);
            Ok::<_, TaskError>(json!("rescued"))
        }
    });
    let token = CancellationToken::new();
    let t2 = token.clone();
    let _h = tokio::spawn(async move { b.run(t2).await.unwrap() });
    let row = s.wait_status("victim", "succeeded", T).await;
    assert_eq!(row.agent_id.as_deref(), Some("rescuer"));
    assert_eq!(row.result, Some(json!("rescued")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1, "completed once");
    token.cancel();
}

#[tokio::test]
async fn sigterm_drain_finishes_in_flight_and_hands_back_nothing_lost() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let mut a = tokio::process::Command::new(workspace_bin("taskbus-agent"))
        .args([
            "--pool",
            "default",
            "--handler",
            "sleep",
            "--agent-id",
            "draining",
            "--concurrency",
            "2",
        ])
        .args(["--grace-seconds", "10", "--nats-url", &s.nats.url()])
        .args(["--http-listen", "127.0.0.1:0"])
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    for i in 0..6 {
        s.submit(
            "default",
            json!({"kind": "sleep", "id": format!("d{i}"), "payload": {"ms": 700}}),
        )
        .await;
    }
    eventually("two running", T, || async {
        (s.count("running").await >= 1).then_some(())
    })
    .await;
    // SIGTERM: in-flight tasks finish, the agent stops pulling.
    let pid = a.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(T, a.wait())
        .await
        .expect("agent exits")
        .unwrap();
    assert!(status.success(), "clean exit, got {status}");
    // Another agent picks up the rest; every task completes.
    let (_b, _bt, _) = s.echo_agent("after-drain", 4);
    for i in 0..6 {
        s.wait_status(&format!("d{i}"), "succeeded", T).await;
    }
    let by_draining: i64 =
        sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks WHERE agent_id = 'draining' AND status = 'succeeded'")
            .fetch_one(&s.pg)
            .await
            .unwrap();
    assert!(
        by_draining >= 1,
        "the draining agent finished its in-flight work"
    );
}

#[tokio::test]
async fn coordinator_killed_mid_load_loses_nothing() {
    let s = Stack::new(30_000).await;
    let spawn_coord = || {
        tokio::process::Command::new(workspace_bin("taskbus-coordinator"))
            .args([
                "--nats-url",
                &s.nats.url(),
                "--database-url",
                &s.db.url,
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(["--pools", "default"])
            .env("TASKBUS_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn coordinator")
    };
    let mut coord = spawn_coord();
    let (_a, _at, runs) = s.echo_agent("load-agent", 64);
    const N: usize = 3000;
    let producer = produce(&s, "L", N, 500, Duration::from_millis(100));
    eventually("some progress", T, || async {
        (s.count("succeeded").await > 200).then_some(())
    })
    .await;
    coord.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut coord = spawn_coord();
    producer.await.unwrap();
    all_succeeded_none_invented(&s, N).await;
    assert!(runs.load(Ordering::Relaxed) >= N as u64);
    coord.kill().await.ok();
}

/// The coordinator does not ping a pooled connection before each statement: one PostgreSQL
/// closed (a restart, a failover, an idle-connection reaper) fails the statement that finds
/// it, and that batch must come back through redelivery, not be lost.
#[tokio::test]
async fn database_connections_dropped_mid_load_lose_nothing() {
    let s = Stack::new(30_000).await;
    let mut dropped = 0i64;
    disrupted_twice_under_load(&s, "D", async || {
        // Every connection the services hold on this database, closed server-side.
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'taskbus') t",
        )
        .fetch_one(&s.pg)
        .await
        .unwrap();
        dropped += n;
    })
    .await;
    assert!(dropped > 0, "the coordinator held connections to close");
}

/// A coordinator and an agent run 2,000 echo tasks `<prefix><i>` while `disrupt` runs after
/// 200 and again after 800 have succeeded; then every task must have succeeded and run once.
async fn disrupted_twice_under_load(
    s: &Stack,
    prefix: &'static str,
    mut disrupt: impl AsyncFnMut(),
) {
    let (_c, _ct) = s.coordinator().await;
    let (_a, _at, runs) = s.echo_agent(&format!("{prefix}-agent"), 64);
    const N: usize = 2000;
    let producer = produce(s, prefix, N, 200, Duration::from_millis(50));
    for at_least in [200, 800] {
        eventually("some progress", T, || async {
            (s.count("succeeded").await > at_least).then_some(())
        })
        .await;
        disrupt().await;
    }
    producer.await.unwrap();
    all_succeeded_none_invented(s, N).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs.load(Ordering::Relaxed), N as u64, "each task ran once");
}

/// Admission commits its rows without waiting for the disk, publishes the work at once and
/// acks the submit messages after a shared WAL flush (services/coordinator/src/flush.rs). The
/// server here is crashed twice under load (an immediate shutdown: WAL still in its shared
/// memory is lost; what it had written survives in the page cache) and restarted on the same
/// data: batches fail, their messages come back, nothing is lost or run twice.
#[tokio::test]
async fn postgres_crash_mid_load_loses_nothing_and_runs_each_task_once() {
    let mut pg = PgServer::start().await.expect("start a private PostgreSQL");
    let s = Stack::on_database(30_000, TestDb::new_on(&pg.url()).await).await;
    disrupted_twice_under_load(&s, "P", async || {
        pg.crash_and_restart().await.expect("restart PostgreSQL")
    })
    .await;
}

/// What a crash that loses an admitted row leaves behind: the task's outcome is in the stream
/// but its row is gone until the submit message is admitted again. The outcome must wait for
/// the row rather than be dropped.
#[tokio::test]
async fn an_outcome_that_arrives_before_its_row_waits_for_it() {
    let s = Stack::new(30_000).await;
    let (_c, _ct) = s.coordinator().await;
    // No agent: the outcome below is the only one.
    s.publish_succeeded("early-1", 1, "agent-early").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(s.task("early-1").await.is_none());
    s.submit("default", json!({"kind": "echo", "id": "early-1"}))
        .await;
    let row = s.wait_status("early-1", "succeeded", T).await;
    assert_eq!(row.agent_id.as_deref(), Some("agent-early"));
    assert_eq!(row.result, Some(json!({"by": "agent-early"})));
}

#[tokio::test]
async fn two_coordinator_replicas_share_the_work() {
    let s = Stack::new(30_000).await;
    let (_c1, _t1) = s.coordinator().await;
    let (_c2, _t2) = s.coordinator().await;
    let (_a, _at, runs) = s.echo_agent("shared-agent", 32);
    const N: usize = 1000;
    let mut acks = Vec::new();
    for i in 0..N {
        let body = serde_json::to_vec(&json!({"kind": "echo", "id": format!("R{i}")})).unwrap();
        acks.push(
            s.js.publish("taskbus.submit.default", body.into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    eventually("all succeeded", Duration::from_secs(60), || async {
        (s.count("succeeded").await == N as i64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        runs.load(Ordering::Relaxed),
        N as u64,
        "each task ran exactly once"
    );
}

#[tokio::test]
async fn request_reply_api_get_list_and_bad_requests() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let (_a, _at, _) = s.echo_agent("api-agent", 4);
    s.submit(
        "default",
        json!({"kind": "echo", "id": "api-1", "payload": 5}),
    )
    .await;
    s.wait_status("api-1", "succeeded", T).await;
    let ask = |subject: &'static str, body: &'static str| {
        let c = s.client.clone();
        async move {
            let r = c.request(subject, body.into()).await.expect("reply");
            serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()
        }
    };
    let v = ask("taskbus.api.task.get", r#"{"id":"api-1"}"#).await;
    assert_eq!(v["ok"]["status"], "succeeded");
    assert_eq!(v["ok"]["result"], 5);
    let v = ask("taskbus.api.tasks.list", r#"{"status":"succeeded"}"#).await;
    assert_eq!(v["ok"].as_array().unwrap().len(), 1);
    let v = ask("taskbus.api.tasks.list", "").await;
    assert!(v["ok"].is_array());
    for (subject, body, code) in [
        ("taskbus.api.task.get", r#"{"id":"nope"}"#, 404),
        ("taskbus.api.task.get", r#"{"id":"a.b"}"#, 400),
        ("taskbus.api.task.get", "garbage", 400),
        ("taskbus.api.task.get", r#"{"id":"x","extra":1}"#, 400),
        ("taskbus.api.tasks.list", r#"{"limit":0}"#, 400),
        ("taskbus.api.tasks.list", r#"{"status":"sleeping"}"#, 400),
    ] {
        let v = ask(subject, body).await;
        assert_eq!(v["error"]["code"], code, "{subject} {body} → {v}");
        assert!(v["error"]["error"].as_str().unwrap().len() > 5);
    }
    // $SRV discovery finds the coordinator.
    let r = s
        .client
        .request("$SRV.PING.taskbus-coordinator", "".into())
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["name"], "taskbus-coordinator");
}

#[test]
fn coordinator_refuses_bad_tuning_flags_with_a_clear_error() {
    for (flag, value) in [
        ("--batch-size", "0"),
        ("--batch-size", "many"),
        ("--admission-pipeline", "0"),
        ("--admission-pipeline", "99"),
        ("--lost-work-after", "10s"),
        ("--lost-work-after", "soon"),
    ] {
        let out = std::process::Command::new(workspace_bin("taskbus-coordinator"))
            .args([flag, value])
            .env("TASKBUS_DATABASE_URL", "postgres://nobody@127.0.0.1:1/x")
            .output()
            .expect("coordinator binary runs");
        assert!(!out.status.success(), "{flag} {value} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: {err}"
        );
    }
}

#[tokio::test]
async fn a_burst_of_repeated_ids_across_concurrent_batches_runs_each_once() {
    let s = Stack::new(30_000).await;
    let mut cfg = s.coordinator_config();
    // Small batches, many in progress at once: the same id lands in concurrent batches.
    cfg.batch_size = 7;
    cfg.admission_pipeline = 4;
    let shutdown = CancellationToken::new();
    let _coord = taskbus_coordinator::start(cfg, shutdown.clone())
        .await
        .expect("coordinator starts");
    let (_a, _at, runs) = s.echo_agent("agent-burst", 32);
    let mut acks = Vec::new();
    // Ten ids, each repeated every ten messages: with batches of 7 and 4 batches in progress,
    // every id is in several concurrent batches.
    for round in 0..100 {
        for i in 0..10 {
            let body = json!({"kind": "echo", "id": format!("burst-{i:03}"), "payload": round});
            acks.push(
                s.js.publish(
                    s.subjects.submit("default"),
                    serde_json::to_vec(&body).unwrap().into(),
                )
                .await
                .unwrap(),
            );
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    eventually("10 tasks succeeded", T, || async {
        (s.count("succeeded").await == 10).then_some(())
    })
    .await;
    // Every submit message was handled (acked), none is left to redeliver.
    s.wait_stream_empty(&s.subjects.submit_stream(), T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs.load(Ordering::Relaxed), 10, "each id ran exactly once");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks")
        .fetch_one(&s.pg)
        .await
        .unwrap();
    assert_eq!(rows, 10);
    // Each task ran with the payload of one of its submissions.
    let payloads: Vec<i64> = sqlx::query_scalar(
        "SELECT (envelope->'payload')::int8 FROM coordinator.tasks ORDER BY task_id",
    )
    .fetch_all(&s.pg)
    .await
    .unwrap();
    assert!(
        payloads.iter().all(|p| (0..100).contains(p)),
        "{payloads:?}"
    );
    shutdown.cancel();
}

/// The first task a fresh coordinator sees shows `running` while it runs: the `started`
/// writer does not wait for an outcome to be recorded first when none is pending (it used to
/// wait 5 s, so a short first task went from `queued` straight to `succeeded`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_coordinator_records_running_promptly() {
    let s = Stack::new(30_000).await;
    let (_c, _ct) = s.coordinator().await;
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "slow".into();
    let agent = Agent::new(cfg, |_t: TaskContext| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok::<_, TaskError>(json!(null))
    });
    let token = CancellationToken::new();
    let run = tokio::spawn(agent.run(token.clone()));
    s.submit("default", json!({"kind": "slow", "id": "first"}))
        .await;
    let t = s
        .wait_status("first", "running", Duration::from_millis(2_500))
        .await;
    assert_eq!(t.agent_id.as_deref(), Some("slow"));
    s.wait_status("first", "succeeded", T).await;
    token.cancel();
    run.await.unwrap().unwrap();
}

/// A coordinator that looks for lost work every 2 s, with tasks `lost-0` to `lost-19` queued
/// and no agent.
async fn lost_work_stack() -> (Stack, CancellationToken, taskbus_coordinator::Running) {
    let s = Stack::new(30_000).await;
    let mut config = s.coordinator_config();
    config.lost_work_after = Duration::from_secs(2);
    let token = CancellationToken::new();
    let coord = taskbus_coordinator::start(config, token.clone())
        .await
        .expect("coordinator starts");
    for i in 0..20 {
        s.submit(
            "default",
            json!({"kind": "echo", "id": format!("lost-{i}")}),
        )
        .await;
    }
    for i in 0..20 {
        s.wait_status(&format!("lost-{i}"), "queued", T).await;
    }
    (s, token, coord)
}

/// Lost work is found while tasks keep coming and the outcome consumer never idles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_work_is_sent_again_while_outcomes_keep_coming() {
    let (s, token, _coord) = lost_work_stack().await;
    let stream = s.js.get_stream("TASKBUS_WORK").await.unwrap();
    assert_eq!(stream.purge().await.unwrap().purged, 20);

    // From now on tasks keep coming, about 200 a second, each taking 20 ms: the outcome
    // consumer is never idle for long, and lost work must not wait for it to be.
    let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = runs.clone();
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "under-load".into();
    cfg.concurrency = 16;
    let agent = Agent::new(cfg, move |t: TaskContext| {
        r.lock().unwrap().push(t.task_id.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, TaskError>(json!("ran"))
        }
    });
    let agent_token = CancellationToken::new();
    let run = tokio::spawn(agent.run(agent_token.clone()));
    let load_token = CancellationToken::new();
    let load = {
        let (js, subject, stop) = (
            s.js.clone(),
            s.subjects.submit("default"),
            load_token.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !stop.is_cancelled() {
                tick.tick().await;
                let body = json!({"kind": "echo", "id": format!("load-{n}")});
                js.publish(subject.clone(), body.to_string().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    for i in 0..20 {
        s.wait_status(&format!("lost-{i}"), "succeeded", T).await;
    }
    assert!(!load.is_finished(), "the load was still running");
    load_token.cancel();
    let submitted = load.await.unwrap();
    assert!(submitted > 0);
    for n in 0..submitted {
        s.wait_status(&format!("load-{n}"), "succeeded", T).await;
    }
    let ran = runs.lock().unwrap().clone();
    let once: std::collections::BTreeSet<&String> = ran.iter().collect();
    assert_eq!(once.len(), ran.len(), "no task ran twice");
    assert_eq!(ran.len() as u64, 20 + submitted);
    agent_token.cancel();
    run.await.unwrap().unwrap();
    token.cancel();
}

/// An operator purges the work stream (or it comes back from an old backup) while tasks wait:
/// PostgreSQL still says `queued`, but no agent will ever see them. The coordinator notices
/// that their messages are gone and sends each attempt again, once; tasks whose messages are
/// still there, and a delayed attempt whose time has not come, are left alone.
#[tokio::test]
async fn work_the_work_stream_lost_is_sent_again_once() {
    let (s, token, _coord) = lost_work_stack().await;
    let later = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    s.submit(
        "default",
        json!({"kind": "echo", "id": "later", "not_before": later}),
    )
    .await;
    s.wait_status("later", "queued", T).await;
    // The work subjects are purged; the delayed attempt's schedule message stays.
    let mut stream = s.js.get_stream("TASKBUS_WORK").await.unwrap();
    let purged = stream.purge().filter("taskbus.work.>").await.unwrap();
    assert_eq!(purged.purged, 20);
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    // Tasks submitted after that have their messages.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..5 {
        s.submit(
            "default",
            json!({"kind": "echo", "id": format!("kept-{i}")}),
        )
        .await;
    }

    let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = runs.clone();
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "after-purge".into();
    let agent = Agent::new(cfg, move |t: TaskContext| {
        r.lock().unwrap().push(t.task_id.clone());
        async move { Ok::<_, TaskError>(json!("ran")) }
    });
    let agent_token = CancellationToken::new();
    let run = tokio::spawn(agent.run(agent_token.clone()));
    for i in 0..20 {
        s.wait_status(&format!("lost-{i}"), "succeeded", T).await;
    }
    for i in 0..5 {
        s.wait_status(&format!("kept-{i}"), "succeeded", T).await;
    }
    // A few more sweeps: nothing is sent twice, the delayed task waits for its time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut ran = runs.lock().unwrap().clone();
    ran.sort();
    let mut want: Vec<String> = (0..5)
        .map(|i| format!("kept-{i}"))
        .chain((0..20).map(|i| format!("lost-{i}")))
        .collect();
    want.sort();
    assert_eq!(ran, want, "each task ran exactly once");
    assert_eq!(s.task("later").await.unwrap().status, "queued");
    agent_token.cancel();
    run.await.unwrap().unwrap();
    token.cancel();
}
