//! Direct mode against kube-rs's tower-test mock API server (the one part with no real server
//! here), with a real nats-server and real work messages driving the lag.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_get, take, Env};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use taskbus_proto::pool::FreezeWindow;
use taskbus_proto::PoolSettings;
use taskbus_runtime::CancellationToken;
use taskbus_scaler::{DirectConfig, DirectPolicy};
use tokio::task::JoinHandle;
use tower_test::mock;

/// What the fake API server saw and holds.
#[derive(Default)]
struct Cluster {
    /// Deployment name → replicas.
    replicas: std::collections::HashMap<String, i32>,
    gets: Vec<String>,
    patches: Vec<(String, i32)>,
}

fn scale_json(ns: &str, name: &str, replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas},
    })
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "NotFound", "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// A stateful fake of the `deployments/scale` subresource in namespace `agents`.
fn fake_api(cluster: Arc<Mutex<Cluster>>) -> (kube::Client, JoinHandle<()>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let path = parts.uri.path().to_string();
            let name = path
                .strip_prefix("/apis/apps/v1/namespaces/agents/deployments/")
                .and_then(|r| r.strip_suffix("/scale"))
                .map(str::to_string);
            let Some(name) = name else {
                send.send_response(status(
                    StatusCode::BAD_REQUEST,
                    &format!("unexpected path {path}"),
                ));
                continue;
            };
            if name == "flaky" {
                send.send_response(status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "etcd is having a day",
                ));
                continue;
            }
            let bytes = body.collect_bytes().await.unwrap();
            let mut c = cluster.lock().unwrap();
            let Some(&current) = c.replicas.get(&name) else {
                send.send_response(status(StatusCode::NOT_FOUND, "deployments.apps not found"));
                continue;
            };
            let replicas = match parts.method {
                Method::GET => {
                    c.gets.push(name.clone());
                    current
                }
                Method::PATCH => {
                    assert_eq!(
                        parts.headers.get("content-type").unwrap(),
                        "application/merge-patch+json",
                        "a merge patch of the scale subresource"
                    );
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    let n = v["spec"]["replicas"].as_i64().unwrap() as i32;
                    c.patches.push((name.clone(), n));
                    c.replicas.insert(name.clone(), n);
                    n
                }
                ref m => panic!("unexpected method {m}"),
            };
            drop(c);
            let body = serde_json::to_vec(&scale_json("agents", &name, replicas)).unwrap();
            send.send_response(Response::builder().body(Body::from(body)).unwrap());
        }
    });
    (kube::Client::new(svc, "agents"), task)
}

fn direct(client: kube::Client, policy: DirectPolicy) -> DirectConfig {
    let mut d = DirectConfig::new("agents");
    d.client = Some(client);
    d.deployment_prefix = "agent-".into();
    d.interval = Duration::from_millis(100);
    d.policy = policy;
    d
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_the_deployment_with_step_limits_and_cool_down() {
    let env = Env::start().await;
    let settings = PoolSettings {
        target_per_replica: 5,
        max_replicas: 4,
        target_latency_s: 1.0,
        ..Default::default()
    };
    let consumer = env.pool("web", &settings).await;
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    cluster
        .lock()
        .unwrap()
        .replicas
        .insert("agent-web".into(), 0);
    let (client, api) = fake_api(cluster.clone());
    let mut config = env.config();
    config.smoothing = Duration::from_millis(500);
    config.direct = Some(direct(
        client,
        DirectPolicy {
            max_step_up: 1,
            max_step_down: 3,
            scale_down_cooldown: Duration::from_secs(1),
        },
    ));
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(config, shutdown.clone())
        .await
        .unwrap();

    // Idle pool at 0 with min 0: nothing to patch.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(cluster.lock().unwrap().patches.is_empty());
    assert!(
        !cluster.lock().unwrap().gets.is_empty(),
        "the scaler reads the scale subresource"
    );

    // 40 tasks, 1 s target latency: 40/s × 1 s / 5 per replica = 8 → max 4, one step at a time.
    env.publish("web", 40).await;
    until("scaled up to max", 5, || {
        cluster.lock().unwrap().replicas["agent-web"] == 4
    })
    .await;
    let ups: Vec<i32> = cluster
        .lock()
        .unwrap()
        .patches
        .iter()
        .map(|p| p.1)
        .collect();
    assert_eq!(ups, vec![1, 2, 3, 4], "max_step_up 1");

    // Drain: after the cool-down it scales down by at most 3 per step.
    let t0 = Instant::now();
    take(&consumer, 40, true).await;
    until("scaled down to 0", 10, || {
        cluster.lock().unwrap().replicas["agent-web"] == 0
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "waited for the cool-down"
    );
    let downs: Vec<i32> = cluster
        .lock()
        .unwrap()
        .patches
        .iter()
        .skip(4)
        .map(|p| p.1)
        .collect();
    assert_eq!(downs, vec![1, 0], "max_step_down 3: 4 → 1 → 0");

    let (_, text) = http_get(running.http_addr, "/metrics").await;
    assert!(
        text.contains("taskbus_scaler_scale_actions_total{pool=\"web\",outcome=\"scaled\"} 6"),
        "{text}"
    );

    shutdown.cancel();
    running.wait().await;
    api.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_scales_inside_a_freeze_window_and_survives_api_errors() {
    let env = Env::start().await;
    let always = FreezeWindow {
        from: "12:00".into(),
        to: "12:00".into(),
        tz: "America/New_York".into(),
        weekdays: vec![],
    };
    env.pool(
        "night",
        &PoolSettings {
            freeze_windows: vec![always],
            ..Default::default()
        },
    )
    .await;
    env.pool("ghost", &PoolSettings::default()).await;
    env.pool("flaky", &PoolSettings::default()).await;
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    cluster
        .lock()
        .unwrap()
        .replicas
        .insert("agent-night".into(), 1);
    let (client, api) = fake_api(cluster.clone());
    let mut config = env.config();
    let mut d = direct(client, DirectPolicy::default());
    d.deployment_prefix = String::new();
    config.direct = Some(d);
    cluster.lock().unwrap().replicas.insert("night".into(), 1);
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(config, shutdown.clone())
        .await
        .unwrap();

    env.publish("night", 100).await;
    env.publish("ghost", 5).await;
    env.publish("flaky", 5).await;
    until("several rounds", 5, || {
        cluster.lock().unwrap().gets.len() >= 8
    })
    .await;
    let patches = cluster.lock().unwrap().patches.clone();
    assert!(
        patches.is_empty(),
        "no patch inside a freeze window: {patches:?}"
    );
    assert_eq!(cluster.lock().unwrap().replicas["night"], 1);

    let (_, text) = http_get(running.http_addr, "/metrics").await;
    for want in [
        "taskbus_scaler_scale_actions_total{pool=\"night\",outcome=\"held\"}",
        "taskbus_scaler_scale_actions_total{pool=\"ghost\",outcome=\"missing\"}",
        "taskbus_scaler_scale_actions_total{pool=\"flaky\",outcome=\"failed\"}",
        "taskbus_scaler_frozen{pool=\"night\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    // Still serving after API errors.
    let (code, _) = http_get(running.http_addr, "/readyz").await;
    assert_eq!(code, 200);

    shutdown.cancel();
    running.wait().await;
    api.abort();
}
