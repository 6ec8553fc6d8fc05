//! An agent's `/healthz`, `/readyz` and `/metrics` (AgentConfig::http_listen, the binary's
//! --http-listen), and the NATS-aware readiness of the coordinator, against real servers.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use taskbus_agent::{Agent, AgentConfig, CancellationToken, TaskContext, TaskError};
use taskbus_runtime::devservers::free_port;
use taskbus_tests::stack::Stack;
use taskbus_tests::{eventually, http_get, workspace_bin};

const T: Duration = Duration::from_secs(30);

/// The value of the series `name` (with its labels, as printed) in a `/metrics` page.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The status of `GET path`, or `None` while nothing listens on `addr`.
async fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(http_get(addr, path).await.0)
}

async fn metrics(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_health_and_metrics_and_is_unready_while_draining() {
    let s = Stack::new(30_000).await;
    let (_coord, _ct) = s.coordinator().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let mut cfg = AgentConfig::new(s.nats.url(), "default");
    cfg.agent_id = "metered".into();
    cfg.http_listen = Some(addr);
    cfg.grace = Duration::from_secs(20);
    // The draining task runs until the test has seen the agent unready and still alive (a
    // fixed sleep could end first on a loaded machine, and the agent would be gone).
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let agent = Agent::new(cfg, move |t: TaskContext| {
        let gate = gate.clone();
        async move {
            match t.kind.as_str() {
                "fail" => Err(TaskError::Fatal("no".into())),
                "sleep" => {
                    let _ = gate.acquire().await;
                    Ok(json!(null))
                }
                _ => Ok(t.payload),
            }
        }
    });
    let stats = agent.stats();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(agent.run(shutdown.clone()));

    eventually("the agent to be ready", T, || async {
        (status(addr, "/readyz").await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);

    for i in 0..3 {
        s.submit(
            "default",
            json!({"kind": "echo", "id": format!("m{i}"), "payload": i}),
        )
        .await;
    }
    s.submit(
        "default",
        json!({"kind": "fail", "id": "m-fail", "max_attempts": 1}),
    )
    .await;
    for i in 0..3 {
        s.wait_status(&format!("m{i}"), "succeeded", T).await;
    }
    s.wait_status("m-fail", "dead", T).await;

    let page = metrics(addr).await;
    let pool = r#"pool="default""#;
    let tasks = |outcome: &str| {
        value(
            &page,
            &format!(r#"taskbus_agent_tasks_total{{{pool},outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(tasks("succeeded"), Some(3.0), "{page}");
    assert_eq!(tasks("failed"), Some(1.0), "{page}");
    assert_eq!(tasks("handed_back"), Some(0.0), "{page}");
    assert_eq!(
        value(&page, &format!("taskbus_agent_in_flight{{{pool}}}")),
        Some(0.0),
        "{page}"
    );
    assert_eq!(
        value(
            &page,
            &format!("taskbus_agent_task_duration_seconds_count{{{pool}}}")
        ),
        Some(4.0),
        "{page}"
    );
    assert_eq!(
        stats.succeeded.load(std::sync::atomic::Ordering::Relaxed),
        3
    );

    // A task in flight, then shutdown: not ready (and says so) while draining, still alive, the
    // in-flight gauge shows the task; the server goes away once the agent has stopped.
    s.submit("default", json!({"kind": "sleep", "id": "m-drain"}))
        .await;
    s.wait_status("m-drain", "running", T).await;
    let page = metrics(addr).await;
    assert_eq!(
        value(&page, &format!("taskbus_agent_in_flight{{{pool}}}")),
        Some(1.0),
        "{page}"
    );
    shutdown.cancel();
    eventually("not ready while draining", T, || async {
        let (code, _) = http_get(addr, "/readyz").await;
        (code == 503).then_some(())
    })
    .await;
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "alive while draining"
    );
    release.add_permits(1);
    run.await.unwrap().expect("agent stops cleanly");
    s.wait_status("m-drain", "succeeded", T).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the HTTP server stops with the agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_nats_connection() {
    let mut s = Stack::new(30_000).await;
    let mut cfg = s.coordinator_config();
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let coord = taskbus_coordinator::start(cfg, shutdown.clone())
        .await
        .unwrap();
    let http = coord.http_addr.expect("http address");
    assert_eq!(http_get(http, "/readyz").await.0, 200);

    s.nats.kill().await;
    let body = eventually("not ready without NATS", T, || async {
        let (code, body) = http_get(http, "/readyz").await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("NATS"), "{body}");
    assert_eq!(
        http_get(http, "/healthz").await.0,
        200,
        "alive all the same"
    );

    s.nats.restart().await.unwrap();
    eventually("ready again once NATS is back", T, || async {
        let (code, _) = http_get(http, "/readyz").await;
        (code == 200).then_some(())
    })
    .await;
    shutdown.cancel();
    coord.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_refuses_a_bad_listen_address_and_a_taken_port() {
    let out = tokio::process::Command::new(workspace_bin("taskbus-agent"))
        .args([
            "--pool",
            "p",
            "--handler",
            "echo",
            "--http-listen",
            "nowhere:x",
        ])
        .env_remove("TASKBUS_HTTP_LISTEN")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--http-listen"), "{stderr}");

    // A port someone else holds: a clear error, not a silent agent without metrics.
    let s = Stack::new(30_000).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = tokio::process::Command::new(workspace_bin("taskbus-agent"))
        .args(["--pool", "default", "--handler", "echo"])
        .args(["--nats-url", &s.nats.url()])
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot serve HTTP on 127.0.0.1:{port}")),
        "{stderr}"
    );
}
