//! The Python agent that docs/PROTOCOL.md points producers' colleagues to
//! (`docs/examples/agent.py`, nats-py) runs against a real coordinator: an echo task succeeds
//! with its result (and its `traceparent` on the agent's `started` and `succeeded` events), a failing task is retried and ends dead, a task submitted with high
//! priority is taken too, and on SIGTERM it finishes the task it holds before exiting. It needs `python3` with nats-py (scripts/test.sh installs it into
//! its virtualenv); without them the test says so and passes, unless `TASKBUS_REQUIRE_PYTHON`
//! is set, as scripts/test.sh does, so that CI cannot skip it silently.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use taskbus_tests::stack::Stack;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_agent_runs_tasks() {
    let Some(python) = taskbus_tests::python_with_nats_or_skip() else {
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/agent.py");
    let s = Stack::new(5_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let mut agent = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("default")
        .env("TASKBUS_NATS_URL", s.nats.url())
        .env("TASKBUS_AGENT_ID", "py-test")
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python agent");

    // With a trace context, which the agent passes on to its events.
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut echo_events = s
        .client
        .subscribe("taskbus.events.default.py-echo.*")
        .await
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("traceparent", TP);
    s.js.publish_with_headers(
        "taskbus.submit.default",
        h,
        json!({"kind": "echo", "id": "py-echo", "payload": {"x": 1}})
            .to_string()
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    s.submit(
        "default",
        json!({"kind": "echo", "id": "py-high", "priority": "high", "payload": [1, 2]}),
    )
    .await;
    s.submit(
        "default",
        json!({"kind": "fail", "id": "py-fail", "max_attempts": 2, "payload": null}),
    )
    .await;

    let echo = s.wait_status("py-echo", "succeeded", T).await;
    let mut traced = std::collections::BTreeMap::new();
    while traced.len() < 2 {
        let m = tokio::time::timeout(T, futures::StreamExt::next(&mut echo_events))
            .await
            .expect("events of py-echo")
            .unwrap();
        let kind = m.subject.rsplit('.').next().unwrap().to_string();
        if kind != "started" && kind != "succeeded" {
            continue; // the coordinator's own events
        }
        let tp = m
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str().to_string());
        traced.insert(kind, tp);
    }
    assert_eq!(
        traced,
        [
            ("started".to_string(), Some(TP.to_string())),
            ("succeeded".to_string(), Some(TP.to_string()))
        ]
        .into()
    );
    assert_eq!(echo.agent_id.as_deref(), Some("py-test"));
    assert_eq!(
        echo.result,
        Some(json!({"echo": {"x": 1}, "by": "python"})),
        "the handler's result is recorded"
    );
    let high = s.wait_status("py-high", "succeeded", T).await;
    assert_eq!(high.result, Some(json!({"echo": [1, 2], "by": "python"})));
    let dead = s.wait_status("py-fail", "dead", T).await;
    assert_eq!(dead.attempt, 2, "both attempts ran: {dead:?}");
    assert!(
        dead.error
            .as_deref()
            .unwrap_or("")
            .contains("asked to fail"),
        "{dead:?}"
    );
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent is still serving"
    );

    // SIGTERM while a task runs: the task still succeeds, on this agent, and the agent exits.
    s.submit(
        "default",
        json!({"kind": "sleep", "id": "py-drain", "payload": {"ms": 1500}}),
    )
    .await;
    s.wait_status("py-drain", "running", T).await;
    let pid = agent.id().expect("agent pid") as i32;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(T, agent.wait())
        .await
        .expect("the agent exits after draining")
        .unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    let drained = s.wait_status("py-drain", "succeeded", T).await;
    assert_eq!(
        drained.agent_id.as_deref(),
        Some("py-test"),
        "finished by the draining agent before it exited"
    );
}
