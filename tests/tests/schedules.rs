//! Schedules (recurring tasks) end to end: a real nats-server, a real PostgreSQL, coordinators
//! in-process, the `taskbus` binary for the CLI.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};
use taskbus_agent::CancellationToken;
use taskbus_tests::stack::Stack;
use taskbus_tests::{eventually, http_get, workspace_bin};

const T: Duration = Duration::from_secs(30);

async fn bucket(s: &Stack) -> kv::Store {
    taskbus_runtime::nats::schedules_bucket(&s.js, &s.subjects, 1)
        .await
        .expect("schedules bucket")
}

async fn put(kv: &kv::Store, name: &str, v: Value) {
    kv.put(name, serde_json::to_vec(&v).unwrap().into())
        .await
        .expect("put schedule");
}

fn every_second(kind: &str) -> Value {
    json!({"cron": "* * * * * *", "task": {"kind": kind, "payload": {"from": "schedule"}}})
}

/// `(task id, status)` of every task of schedule `name`, by id.
async fn ticks(s: &Stack, name: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT task_id, status FROM coordinator.tasks WHERE task_id LIKE $1 ORDER BY task_id",
    )
    .bind(format!("sched-{name}-%"))
    .fetch_all(&s.pg)
    .await
    .unwrap()
}

/// The unix seconds of each tick of `name` that became a task, sorted.
async fn tick_seconds(s: &Stack, name: &str) -> Vec<i64> {
    let mut out: Vec<i64> = ticks(s, name)
        .await
        .into_iter()
        .map(|(id, _)| {
            id.strip_prefix(&format!("sched-{name}-"))
                .and_then(|ts| ts.parse().ok())
                .unwrap_or_else(|| panic!("task id {id} is not sched-{name}-<unix seconds>"))
        })
        .collect();
    out.sort();
    out
}

async fn wait_ticks(s: &Stack, name: &str, at_least: usize) -> Vec<(String, String)> {
    eventually(
        &format!("{at_least} tasks of schedule {name}"),
        T,
        || async {
            let t = ticks(s, name).await;
            (t.len() >= at_least).then_some(t)
        },
    )
    .await
}

/// The value of the series `name` in a `/metrics` page (0 when absent).
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    body
}

#[tokio::test]
async fn a_schedule_every_second_runs_tasks_named_after_their_ticks() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let (_a, _at, runs) = s.echo_agent("sched-agent", 8);
    let kv = bucket(&s).await;
    let before = Utc::now().timestamp();
    put(&kv, "heartbeat", every_second("echo")).await;

    let first = wait_ticks(&s, "heartbeat", 3).await;
    let secs = tick_seconds(&s, "heartbeat").await;
    assert!(
        secs[0] >= before - 1 && secs[0] <= Utc::now().timestamp(),
        "first tick {} vs schedule written at {before}",
        secs[0]
    );
    // The tasks run through the normal pipeline and succeed with the schedule's payload.
    for (id, _) in &first {
        let row = s.wait_status(id, "succeeded", T).await;
        assert_eq!(row.result, Some(json!({"from": "schedule"})));
    }
    assert!(runs.load(Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn two_replicas_run_each_tick_exactly_once() {
    let s = Stack::new(30_000).await;
    let (_c1, _t1) = s.coordinator().await;
    let (_c2, _t2) = s.coordinator().await;
    let (_a, _at, runs) = s.echo_agent("sched-agent", 8);
    let kv = bucket(&s).await;

    let start = Utc::now().timestamp();
    put(&kv, "twice", every_second("echo")).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    kv.delete("twice").await.unwrap();
    let end = Utc::now().timestamp();
    // Let submissions in flight land, then wait for every task to finish.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = ticks(&s, "twice").await;
    eventually("every tick's task succeeded", T, || async {
        let t = ticks(&s, "twice").await;
        t.iter().all(|(_, st)| st == "succeeded").then_some(())
    })
    .await;

    let secs = tick_seconds(&s, "twice").await;
    let mut unique = secs.clone();
    unique.dedup();
    assert_eq!(unique, secs, "one task per tick");
    // Every second from the first tick to the last became a task: no gaps, no extras.
    assert_eq!(
        (secs[secs.len() - 1] - secs[0] + 1) as usize,
        secs.len(),
        "ticks {secs:?}"
    );
    // Ticks in [start, end] (the tick at `start` is caught up on arming), ±1 at the edges.
    let expected = (end - start + 1) as usize;
    assert!(
        secs.len() + 1 >= expected && secs.len() <= expected + 1,
        "{} tasks for {expected} ticks between {start} and {end}: {secs:?}",
        secs.len()
    );
    // Each ran once: the agent ran exactly as many tasks as there are, and none was rejected.
    assert_eq!(runs.load(Ordering::Relaxed), all.len() as u64);
    assert_eq!(s.count("rejected").await, 0);
}

#[tokio::test]
async fn pause_and_delete_stop_firing_and_resume_starts_again() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let (_a, _at, _runs) = s.echo_agent("sched-agent", 8);
    let kv = bucket(&s).await;
    put(&kv, "pulse", every_second("echo")).await;
    wait_ticks(&s, "pulse", 2).await;

    let quiet = |what: &'static str| {
        let s = &s;
        async move {
            // A submission already on its way may still land; after that, nothing.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let n = ticks(s, "pulse").await.len();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert_eq!(
                ticks(s, "pulse").await.len(),
                n,
                "a tick fired while {what}"
            );
            n
        }
    };

    let mut paused = every_second("echo");
    paused["paused"] = json!(true);
    put(&kv, "pulse", paused).await;
    let n = quiet("paused").await;

    put(&kv, "pulse", every_second("echo")).await;
    wait_ticks(&s, "pulse", n + 2).await;

    kv.delete("pulse").await.unwrap();
    quiet("deleted").await;
}

#[tokio::test]
async fn hostile_bucket_entries_are_counted_and_ignored() {
    let s = Stack::new(30_000).await;
    let kv = bucket(&s).await;
    let task = json!({"kind": "echo"});
    // Some before the coordinator starts, some while it runs.
    kv.put("not-json", "this is not json".into()).await.unwrap();
    put(
        &kv,
        "unknown-field",
        json!({"cron": "* * * * * *", "task": task, "bogus": 1}),
    )
    .await;
    put(&kv, "bad-cron", json!({"cron": "61 * * * *", "task": task})).await;

    let mut cfg = s.coordinator_config();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let token = CancellationToken::new();
    let coord = taskbus_coordinator::start(cfg, token.clone())
        .await
        .expect("coordinator starts");
    let addr = coord.http_addr.expect("serves metrics");
    let (_a, _at, _runs) = s.echo_agent("sched-agent", 8);

    put(&kv, "good", every_second("echo")).await;
    put(
        &kv,
        "bad-tz",
        json!({"cron": "* * * * * *", "timezone": "Mars/Olympus", "task": task}),
    )
    .await;
    put(
        &kv,
        "bad-pool",
        json!({"cron": "* * * * * *", "pool": "Not_A_Pool", "task": task}),
    )
    .await;
    put(
        &kv,
        "oversized",
        json!({"cron": "* * * * * *", "task": {"kind": "echo", "payload": "x".repeat(300 * 1024)}}),
    )
    .await;
    put(&kv, "Bad_Key", every_second("echo")).await;
    put(
        &kv,
        "with-id",
        json!({"cron": "* * * * * *", "task": {"kind": "echo", "id": "fixed"}}),
    )
    .await;
    kv.put("not-json", "still not json".into()).await.unwrap();

    wait_ticks(&s, "good", 3).await;
    let page = eventually("invalid entries counted", T, || async {
        let page = metrics(addr).await;
        (series(&page, "taskbus_coordinator_schedule_invalid_entries_total") >= 9.0).then_some(page)
    })
    .await;
    // One per invalid revision: 9 puts of invalid entries, each reported once.
    assert_eq!(
        series(&page, "taskbus_coordinator_schedule_invalid_entries_total"),
        9.0
    );
    assert!(
        series(
            &page,
            "taskbus_coordinator_schedule_ticks_fired_total{schedule=\"good\"}"
        ) >= 3.0
    );
    // The good schedule keeps firing; none of the others produced anything.
    let n = ticks(&s, "good").await.len();
    wait_ticks(&s, "good", n + 2).await;
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coordinator.tasks WHERE task_id NOT LIKE 'sched-good-%'",
    )
    .fetch_one(&s.pg)
    .await
    .unwrap();
    assert_eq!(others, 0);
    token.cancel();
    coord.wait().await;
}

/// Run the `taskbus` binary against `nats`; `(success, stdout, stderr)`.
async fn cli(nats: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(workspace_bin("taskbus"))
        .arg("--nats-url")
        .arg(nats)
        .arg("schedules")
        .args(args)
        .env_remove("TASKBUS_PREFIX")
        .output()
        .await
        .expect("run taskbus");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn keys(kv: &kv::Store) -> Vec<String> {
    let mut out = Vec::new();
    let mut k = kv.keys().await.unwrap();
    while let Some(k) = k.next().await {
        out.push(k.unwrap());
    }
    out
}

#[tokio::test]
async fn the_cli_refuses_bad_schedules_and_manages_good_ones() {
    let s = Stack::new(30_000).await;
    let kv = bucket(&s).await;
    let url = s.nats.url();

    let refusals: [(&[&str], &str); 5] = [
        (&["set", "c", "--cron", "* * *", "--kind", "k"], "cron"),
        (
            &["set", "c", "--cron", "0 0 31 2 *", "--kind", "k"],
            "never",
        ),
        (
            &[
                "set",
                "c",
                "--cron",
                "0 3 * * *",
                "--timezone",
                "Mars/Olympus",
                "--kind",
                "k",
            ],
            "Mars/Olympus",
        ),
        (
            &[
                "set",
                "c",
                "--cron",
                "0 3 * * *",
                "--kind",
                "k",
                "--payload",
                "{oops",
            ],
            "--payload",
        ),
        (
            &["set", "Bad_Name", "--cron", "0 3 * * *", "--kind", "k"],
            "Bad_Name",
        ),
    ];
    for (args, names) in refusals {
        let (ok, _, err) = cli(&url, args).await;
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    assert!(keys(&kv).await.is_empty(), "a refused set wrote something");

    let (ok, out, err) = cli(
        &url,
        &[
            "set",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--timezone",
            "Europe/Berlin",
            "--kind",
            "report",
            "--payload",
            r#"{"format":"pdf"}"#,
            "--priority",
            "low",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("nightly"), "{out}");

    let (ok, out, err) = cli(&url, &["get", "nightly", "--json"]).await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schedule"]["cron"], "0 3 * * *");
    assert_eq!(v["schedule"]["task"]["payload"]["format"], "pdf");
    let next = v["next"].as_array().unwrap();
    assert_eq!(next.len(), 5);
    for t in next {
        let local = chrono::DateTime::parse_from_rfc3339(t["local"].as_str().unwrap()).unwrap();
        let utc = chrono::DateTime::parse_from_rfc3339(t["utc"].as_str().unwrap()).unwrap();
        assert_eq!(local, utc);
        assert_eq!(local.format("%H:%M").to_string(), "03:00");
        assert!(local > Utc::now());
    }
    // The stored entry is what a coordinator reads.
    let stored = kv.get("nightly").await.unwrap().unwrap();
    let sched: taskbus_proto::Schedule = serde_json::from_slice(&stored).unwrap();
    assert_eq!(sched.timezone, "Europe/Berlin");

    let (ok, _, err) = cli(&url, &["pause", "nightly"]).await;
    assert!(ok, "{err}");
    let (_, out, _) = cli(&url, &["get", "nightly", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["schedule"]["paused"],
        true
    );
    let (ok, _, err) = cli(&url, &["resume", "nightly"]).await;
    assert!(ok, "{err}");

    kv.put("garbage", "not json".into()).await.unwrap();
    let (ok, out, err) = cli(&url, &["list", "--json"]).await;
    assert!(ok, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["name"], "garbage");
    assert!(list[0]["error"]
        .as_str()
        .unwrap()
        .contains("not a valid schedule"));
    assert_eq!(list[1]["name"], "nightly");
    assert_eq!(list[1]["schedule"]["paused"], false);
    let (ok, out, _) = cli(&url, &["list"]).await;
    assert!(
        ok && out.contains("nightly") && out.contains("invalid"),
        "{out}"
    );

    let (ok, _, err) = cli(&url, &["delete", "nightly"]).await;
    assert!(ok, "{err}");
    assert!(kv.get("nightly").await.unwrap().is_none());
    let (ok, _, err) = cli(&url, &["get", "nightly"]).await;
    assert!(!ok && err.contains("no schedule"), "{err}");
}
