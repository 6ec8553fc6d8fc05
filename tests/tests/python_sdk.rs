//! The Python agent SDK (`sdk/python`, `python -m taskbus_agent`) against a real coordinator and
//! nats-server, with the handlers of `tests/python/sdk_handlers.py`: every kind of outcome
//! (success with the trace context passed on, a permanent and a retryable failure, a result JSON
//! cannot carry, a timeout), its concurrency bound, hostile work messages, a task whose deadline
//! passed, heartbeats, cancellation of a running and of a queued task, and SIGTERM handing back
//! a task that outlives the grace period. Needs python3 with nats-py, like python_agent.rs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use taskbus_tests::stack::Stack;
use taskbus_tests::{ask, eventually};
use tokio::io::AsyncBufReadExt;

const T: Duration = Duration::from_secs(30);
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A Python SDK agent serving `default`, and the lines its handlers print.
struct PyAgent {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl PyAgent {
    fn start(python: &std::path::Path, s: &Stack, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = taskbus_tests::python_sdk_agent(python)
            .args(args)
            .env("TASKBUS_NATS_URL", s.nats.url())
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the Python SDK agent");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        tokio::spawn(async move {
            let mut out = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = out.next_line().await {
                l.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn saw(&self, line: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == line)
    }

    async fn wait_line(&self, line: &str) {
        eventually(&format!("the handler to print {line:?}"), T, || async {
            self.saw(line).then_some(())
        })
        .await;
    }

    /// SIGTERM, then wait for a clean exit.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("agent pid") as i32;
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .expect("the agent exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "exit after SIGTERM: {status}");
        let lines = self.lines.lock().unwrap().clone();
        lines
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_reports_every_kind_of_outcome() {
    let Some(python) = taskbus_tests::python_with_nats_or_skip() else {
        return;
    };
    let s = Stack::new(5_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let agent = PyAgent::start(
        &python,
        &s,
        &["--agent-id", "py-sdk", "--concurrency", "2"],
        &[],
    );

    let mut echo_events = s
        .client
        .subscribe("taskbus.events.default.sdk-echo.*")
        .await
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("traceparent", TP);
    let body =
        json!({"kind": "echo", "id": "sdk-echo", "payload": {"x": 1}, "labels": {"team": "a"}});
    s.js.publish_with_headers("taskbus.submit.default", h, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    for (id, kind, attempts) in [
        ("sdk-permanent", "permanent", 3),
        ("sdk-flaky", "flaky", 2),
        ("sdk-not-json", "not-json", 3),
    ] {
        s.submit(
            "default",
            json!({"kind": kind, "id": id, "max_attempts": attempts}),
        )
        .await;
    }
    s.submit(
        "default",
        json!({"kind": "sleep", "id": "sdk-timeout", "timeout_ms": 300, "payload": {"ms": 60000}}),
    )
    .await;

    let echo = s.wait_status("sdk-echo", "succeeded", T).await;
    assert_eq!(echo.agent_id.as_deref(), Some("py-sdk"));
    assert_eq!(
        echo.result,
        Some(json!({"echo": {"x": 1}, "traceparent": TP, "labels": {"team": "a"}}))
    );
    let mut traced = std::collections::BTreeMap::new();
    while traced.len() < 2 {
        let m = tokio::time::timeout(T, futures::StreamExt::next(&mut echo_events))
            .await
            .expect("events of sdk-echo")
            .unwrap();
        let kind = m.subject.rsplit('.').next().unwrap().to_string();
        if kind == "started" || kind == "succeeded" {
            let tp = m.headers.as_ref().and_then(|h| h.get("traceparent"));
            traced.insert(kind, tp.map(|v| v.as_str().to_string()));
        }
    }
    assert!(
        traced.values().all(|tp| tp.as_deref() == Some(TP)),
        "{traced:?}"
    );

    let permanent = s.wait_status("sdk-permanent", "dead", T).await;
    assert_eq!(permanent.attempt, 1, "not retried: {permanent:?}");
    assert!(permanent
        .error
        .unwrap()
        .contains("the input can never work"));
    let flaky = s.wait_status("sdk-flaky", "dead", T).await;
    assert_eq!(flaky.attempt, 2, "retried once: {flaky:?}");
    assert!(flaky.error.unwrap().contains("flaky on attempt 2"));
    let not_json = s.wait_status("sdk-not-json", "dead", T).await;
    assert_eq!(not_json.attempt, 1, "{not_json:?}");
    assert!(not_json.error.unwrap().contains("cannot be sent as JSON"));
    let timed_out = s.wait_status("sdk-timeout", "dead", T).await;
    assert!(
        timed_out.error.unwrap().contains("timed out"),
        "the agent reported the timeout"
    );
    agent.wait_line("told to stop sdk-timeout").await;
    // The handler ignored the signal: its coroutine was cancelled 2 s later.
    agent.wait_line("cancelled sdk-timeout").await;

    // No more than `--concurrency` at once, and that many when there is work.
    for i in 0..6 {
        s.submit(
            "default",
            json!({"kind": "sleep", "id": format!("sdk-par-{i}"), "payload": {"ms": 400}}),
        )
        .await;
    }
    let mut most = 0;
    for i in 0..6 {
        let t = s.wait_status(&format!("sdk-par-{i}"), "succeeded", T).await;
        most = most.max(t.result.unwrap()["most_at_once"].as_u64().unwrap());
    }
    assert_eq!(most, 2);

    // Work messages the coordinator did not write are taken off the queue; the agent goes on.
    let mut expired = s
        .client
        .subscribe("taskbus.events.default.sdk-ghost.expired")
        .await
        .unwrap();
    for body in [
        "not json".to_string(),
        json!({"attempt": "1", "task": {"id": "sdk-bad-1", "kind": "echo"}}).to_string(),
        json!({"attempt": 1, "task": {"id": "a.b.>", "kind": "echo"}}).to_string(),
        json!({"attempt": 1, "task": {"id": "sdk-bad-3", "kind": "echo", "timeout_ms": -5}})
            .to_string(),
        json!({"attempt": 1, "task": {"id": "sdk-bad-4", "kind": "echo", "deadline": "soon"}})
            .to_string(),
        // A task whose deadline passed while it waited: reported expired, not run.
        json!({"attempt": 1, "pool": "default",
               "task": {"id": "sdk-ghost", "kind": "echo", "deadline": "2020-01-01T00:00:00Z"}})
        .to_string(),
    ] {
        s.js.publish("taskbus.work.default.normal", body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let ghost = tokio::time::timeout(T, futures::StreamExt::next(&mut expired))
        .await
        .expect("an expired event for the ghost task")
        .unwrap();
    let ev: serde_json::Value = serde_json::from_slice(&ghost.payload).unwrap();
    assert_eq!(ev["deadline"], "2020-01-01T00:00:00Z");
    assert_eq!(
        ghost
            .headers
            .as_ref()
            .and_then(|h| h.get("Taskbus-Attempt"))
            .map(|v| v.as_str()),
        Some("1")
    );
    s.wait_stream_empty("TASKBUS_WORK", T).await;
    s.submit("default", json!({"kind": "echo", "id": "sdk-after"}))
        .await;
    s.wait_status("sdk-after", "succeeded", T).await;
    let lines = agent.lines.lock().unwrap().clone();
    for never in ["sdk-ghost", "sdk-bad-1", "sdk-bad-3", "sdk-bad-4", "a.b.>"] {
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with(&format!("start {never} "))),
            "{never} ran: {lines:?}"
        );
    }

    // Its heartbeats make it one of the pool's agents.
    let agents = eventually("py-sdk in the agents list", T, || async {
        let v = ask(&s.client, "taskbus.api.agents.list", b"{}".to_vec()).await?;
        let list = v["ok"].as_array()?.clone();
        list.into_iter().find(|a| a["agent_id"] == "py-sdk")
    })
    .await;
    assert_eq!(agents["capacity"], 2);
    assert_eq!(agents["health"], "healthy");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_stops_cancelled_tasks_and_hands_back_on_sigterm() {
    let Some(python) = taskbus_tests::python_with_nats_or_skip() else {
        return;
    };
    let s = Stack::new(5_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let a = PyAgent::start(
        &python,
        &s,
        &["--agent-id", "py-a", "--concurrency", "1", "--grace", "0.5"],
        &[],
    );
    let cancel = |id: &str| {
        let body = serde_json::to_vec(&json!({"id": id})).unwrap();
        let client = s.client.clone();
        async move {
            let v = ask(&client, "taskbus.api.task.cancel", body)
                .await
                .expect("cancel answered");
            assert!(v.get("ok").is_some(), "{v}");
        }
    };

    // A running task is told to stop when it is cancelled.
    s.submit(
        "default",
        json!({"kind": "sleep", "id": "sdk-cancel", "payload": {"ms": 60000}}),
    )
    .await;
    a.wait_line("start sdk-cancel 1").await;
    cancel("sdk-cancel").await;
    s.wait_status("sdk-cancel", "cancelled", T).await;
    a.wait_line("told to stop sdk-cancel").await;

    // A task outliving the grace period is handed back on SIGTERM; one cancelled while it
    // waited in the queue is never run.
    s.submit(
        "default",
        json!({"kind": "sleep", "id": "sdk-handback", "payload": {"ms": 60000}}),
    )
    .await;
    a.wait_line("start sdk-handback 1").await;
    s.submit(
        "default",
        json!({"kind": "sleep", "id": "sdk-precancel", "payload": {"ms": 100}}),
    )
    .await;
    s.wait_status("sdk-precancel", "queued", T).await;
    cancel("sdk-precancel").await;
    let lines = a.stop().await;
    assert!(
        !lines.iter().any(|l| l.starts_with("start sdk-precancel")),
        "{lines:?}"
    );

    let b = PyAgent::start(
        &python,
        &s,
        &["--agent-id", "py-b"],
        &[("SLEEP_CAP_MS", "100")],
    );
    let done = s.wait_status("sdk-handback", "succeeded", T).await;
    assert_eq!(done.agent_id.as_deref(), Some("py-b"));
    assert_eq!(done.attempt, 1, "handed back, not failed: {done:?}");
    s.wait_stream_empty("TASKBUS_WORK", T).await;
    assert_eq!(s.task("sdk-precancel").await.unwrap().status, "cancelled");
    let lines = b.stop().await;
    assert!(
        !lines.iter().any(|l| l.starts_with("start sdk-precancel")),
        "{lines:?}"
    );
}
