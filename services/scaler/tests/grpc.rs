//! A tonic client drives the four External Scaler RPCs against a real scaler over a real
//! nats-server, while tasks are published to and consumed from the real work stream.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{http_get, http_json, take, Env};
use futures::StreamExt;
use taskbus_proto::pool::FreezeWindow;
use taskbus_proto::{PoolSettings, Priority};
use taskbus_runtime::CancellationToken;
use taskbus_scaler::pb::external_scaler_client::ExternalScalerClient;
use taskbus_scaler::pb::{GetMetricsRequest, ScaledObjectRef};
use tonic::transport::Channel;

fn sref(meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "agents".into(),
        namespace: "default".into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

async fn metric(
    c: &mut ExternalScalerClient<Channel>,
    pool: &str,
    metric: &str,
) -> (i64, f64, String) {
    let r = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(sref(&[("pool", pool), ("metric", metric)])),
            metric_name: format!("s0-taskbus-{pool}-{metric}"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.metric_values.len(), 1);
    let v = &r.metric_values[0];
    (v.metric_value, v.metric_value_float, v.metric_name.clone())
}

/// Wait until the backlog metric reads `want`, returning how long that took.
async fn backlog_becomes(c: &mut ExternalScalerClient<Channel>, pool: &str, want: i64) -> Duration {
    let t0 = Instant::now();
    loop {
        let (v, f, _) = metric(c, pool, "backlog").await;
        if v == want {
            assert_eq!(f, want as f64, "int and float fields agree");
            eprintln!(
                "backlog metric of {pool} reached {want} after {:?}",
                t0.elapsed()
            );
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "backlog metric stuck at {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_rpcs_track_the_real_queue() {
    let env = Env::start().await;
    let settings = PoolSettings {
        target_per_replica: 5,
        max_replicas: 20,
        ..Default::default()
    };
    let consumer = env.pool("cpu", &settings).await;
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(env.config(), shutdown.clone())
        .await
        .unwrap();
    let mut c = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    // Spec: desired (default) has target 1, backlog has target_per_replica; both fields filled.
    let spec = c
        .get_metric_spec(sref(&[("pool", "cpu")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].metric_name, "taskbus-cpu-desired");
    assert_eq!(
        (
            spec.metric_specs[0].target_size,
            spec.metric_specs[0].target_size_float
        ),
        (1, 1.0)
    );
    let spec = c
        .get_metric_spec(sref(&[("pool", "cpu"), ("metric", "backlog")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].metric_name, "taskbus-cpu-backlog");
    assert_eq!(
        (
            spec.metric_specs[0].target_size,
            spec.metric_specs[0].target_size_float
        ),
        (5, 5.0)
    );

    // Idle pool: inactive, zero.
    assert!(
        !c.is_active(sref(&[("pool", "cpu")]))
            .await
            .unwrap()
            .into_inner()
            .result
    );
    assert_eq!(metric(&mut c, "cpu", "backlog").await.0, 0);
    assert_eq!(metric(&mut c, "cpu", "desired").await.0, 0);

    // Push mode: one stream, opened while idle.
    let mut stream = c
        .stream_is_active(sref(&[("pool", "cpu")]))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // First task of an idle pool: the stream fires within a second, and the metric follows.
    let t0 = Instant::now();
    env.publish("cpu", 1).await;
    let first = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("StreamIsActive fired within a second")
        .unwrap()
        .unwrap();
    assert!(first.result);
    assert!(t0.elapsed() < Duration::from_secs(1));
    eprintln!(
        "StreamIsActive fired {:?} after the first task was published",
        t0.elapsed()
    );
    assert!(backlog_becomes(&mut c, "cpu", 1).await < Duration::from_secs(1));
    assert!(
        c.is_active(sref(&[("pool", "cpu")]))
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let (v, f, name) = metric(&mut c, "cpu", "desired").await;
    assert_eq!((v, f), (1, 1.0));
    assert_eq!(
        name, "s0-taskbus-cpu-desired",
        "answers under the name KEDA asked for"
    );

    // More tasks: the metric tracks them, the stream stays quiet (no new transition).
    env.publish("cpu", 11).await;
    assert!(backlog_becomes(&mut c, "cpu", 12).await < Duration::from_secs(1));
    // 12 waiting, 5 per replica, 1 s default service time, 5 s target: ceil(12/5 × 1 / 5) = 1;
    // never fewer than the in-flight work needs.
    assert!(metric(&mut c, "cpu", "desired").await.0 >= 1);

    // The pool's figures sum its three priority bands.
    env.publish_band("cpu", Priority::High, 2).await;
    env.publish_band("cpu", Priority::Low, 3).await;
    assert!(backlog_becomes(&mut c, "cpu", 17).await < Duration::from_secs(1));
    take(&env.band("cpu", Priority::High).await, 2, true).await;
    take(&env.band("cpu", Priority::Low).await, 3, true).await;
    assert!(backlog_becomes(&mut c, "cpu", 12).await < Duration::from_secs(1));

    // A stream opened while the pool is already active reports it once, at once.
    let mut late = c
        .stream_is_active(sref(&[("pool", "cpu")]))
        .await
        .unwrap()
        .into_inner();
    let now_active = tokio::time::timeout(Duration::from_secs(1), late.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(now_active.result);
    assert!(
        tokio::time::timeout(Duration::from_millis(400), late.next())
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(10), stream.next())
            .await
            .is_err()
    );

    // Consume: 4 acked leave the queue; 3 taken without ack stay in flight.
    take(&consumer, 4, true).await;
    assert!(backlog_becomes(&mut c, "cpu", 8).await < Duration::from_secs(1));
    let held = take(&consumer, 3, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&mut c, "cpu", "backlog").await.0,
        8,
        "pending 5 + in flight 3"
    );

    // The external metrics API returns the same figures.
    let base = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default";
    let (code, list) = http_json(
        running.http_addr,
        &format!("{base}/taskbus-backlog?labelSelector=pool%3Dcpu"),
    )
    .await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["kind"], "ExternalMetricValueList");
    assert_eq!(list["apiVersion"], "external.metrics.k8s.io/v1beta1");
    let item = &list["items"][0];
    assert_eq!(item["metricName"], "taskbus-backlog");
    assert_eq!(item["metricLabels"]["pool"], "cpu");
    assert_eq!(item["value"], "8");
    assert!(item["timestamp"].as_str().unwrap().ends_with('Z'));
    let (_, pending) = http_json(
        running.http_addr,
        &format!("{base}/taskbus-pending?labelSelector=pool%3Dcpu"),
    )
    .await;
    assert_eq!(pending["items"][0]["value"], "5");
    let (_, inflight) = http_json(
        running.http_addr,
        &format!("{base}/taskbus-in-flight?labelSelector=pool%3Dcpu"),
    )
    .await;
    assert_eq!(inflight["items"][0]["value"], "3");
    let (_, desired) = http_json(
        running.http_addr,
        &format!("{base}/taskbus-desired-replicas?labelSelector=pool%3D%3Dcpu"),
    )
    .await;
    assert_eq!(
        desired["items"][0]["value"],
        metric(&mut c, "cpu", "desired").await.0.to_string()
    );
    let (_, age) = http_json(
        running.http_addr,
        &format!("{base}/taskbus-oldest-age-seconds?labelSelector=pool%3Dcpu"),
    )
    .await;
    assert_ne!(
        age["items"][0]["value"], "0",
        "tasks have been waiting: {age}"
    );

    // Discovery lists the metrics.
    let (code, disc) = http_json(running.http_addr, "/apis/external.metrics.k8s.io/v1beta1").await;
    assert_eq!(code, 200);
    assert_eq!(disc["kind"], "APIResourceList");
    assert!(disc["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "taskbus-desired-replicas"));

    // Prometheus has every figure for the pool.
    let (code, text) = http_get(running.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    for m in [
        "taskbus_scaler_backlog{pool=\"cpu\"} 5",
        "taskbus_scaler_in_flight{pool=\"cpu\"} 3",
        "taskbus_scaler_oldest_age_seconds{pool=\"cpu\"}",
        "taskbus_scaler_arrival_rate{pool=\"cpu\"}",
        "taskbus_scaler_completion_rate{pool=\"cpu\"}",
        "taskbus_scaler_service_time_seconds{pool=\"cpu\"}",
        "taskbus_scaler_desired_replicas{pool=\"cpu\"}",
        "taskbus_scaler_published_replicas{pool=\"cpu\"}",
        "taskbus_scaler_delayed{pool=\"cpu\"} 0",
        "taskbus_scaler_agents{pool=\"cpu\"} 0",
        "taskbus_scaler_frozen{pool=\"cpu\"} 0",
        "taskbus_scaler_last_refresh_timestamp_seconds{pool=\"cpu\"}",
    ] {
        assert!(text.contains(m), "{m} missing from /metrics:\n{text}");
    }

    // Drain everything: inactive again; the next task fires the stream a second time.
    for m in held {
        m.double_ack().await.unwrap();
    }
    take(&consumer, 5, true).await;
    assert!(backlog_becomes(&mut c, "cpu", 0).await < Duration::from_secs(1));
    assert!(
        !c.is_active(sref(&[("pool", "cpu")]))
            .await
            .unwrap()
            .into_inner()
            .result
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "no event for active→inactive"
    );
    env.publish("cpu", 1).await;
    let again = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(again.result);

    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let env = Env::start().await;
    env.pool("cpu", &PoolSettings::default()).await;
    // A pool whose settings the scaler cannot use (unknown time zone).
    env.kv
        .put(
            "broken",
            br#"{"freeze_windows":[{"from":"01:00","to":"02:00","tz":"Mars/Base"}]}"#
                .to_vec()
                .into(),
        )
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(env.config(), shutdown.clone())
        .await
        .unwrap();
    let mut c = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    let cases: Vec<(ScaledObjectRef, tonic::Code, &str)> = vec![
        (
            sref(&[]),
            tonic::Code::InvalidArgument,
            "must name the pool",
        ),
        (
            sref(&[("pool", "nope")]),
            tonic::Code::NotFound,
            "\"nope\" is not configured",
        ),
        (
            sref(&[("pool", "Bad_Name")]),
            tonic::Code::InvalidArgument,
            "not a valid pool name",
        ),
        (
            sref(&[("pool", "cpu"), ("metric", "latency")]),
            tonic::Code::InvalidArgument,
            "backlog, desired",
        ),
        (
            sref(&[("pool", "cpu"), ("pol", "x")]),
            tonic::Code::InvalidArgument,
            "unknown scalerMetadata key",
        ),
        (
            sref(&[("pool", "broken")]),
            tonic::Code::FailedPrecondition,
            "Mars/Base",
        ),
    ];
    for (r, code, want) in &cases {
        let e = c.is_active(r.clone()).await.unwrap_err();
        assert_eq!(e.code(), *code, "IsActive {r:?}: {e}");
        assert!(
            e.message().contains(want),
            "IsActive {r:?}: {}",
            e.message()
        );
        let e = c.get_metric_spec(r.clone()).await.unwrap_err();
        assert_eq!(e.code(), *code, "GetMetricSpec {r:?}");
        let e = c
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(r.clone()),
                metric_name: "m".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), *code, "GetMetrics {r:?}");
        let e = c.stream_is_active(r.clone()).await.unwrap_err();
        assert_eq!(e.code(), *code, "StreamIsActive {r:?}");
    }
    let e = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("no scaledObjectRef"));

    // The scaler keeps serving good requests after bad ones.
    assert!(
        !c.is_active(sref(&[("pool", "cpu")]))
            .await
            .unwrap()
            .into_inner()
            .result
    );

    // HTTP: Kubernetes Status errors with a reason.
    let base = "/apis/external.metrics.k8s.io/v1beta1/namespaces";
    let http_cases = [
        (
            format!("{base}/default/taskbus-backlog?labelSelector=pool%3Dnope"),
            404,
            "not configured",
        ),
        (
            format!("{base}/default/no-such-metric"),
            404,
            "no external metric",
        ),
        (
            format!("{base}/default/taskbus-backlog?labelSelector=app%3Dx"),
            400,
            "only the `pool` label",
        ),
        (
            format!("{base}/default/taskbus-backlog?labelSelector=pool%3DBAD"),
            400,
            "not a valid pool name",
        ),
        (
            format!("{base}/default/taskbus-backlog?labelSelector=pool%21%3Dcpu"),
            400,
            "only `pool=<pool>`",
        ),
        (
            format!("{base}/Not_A_NS/taskbus-backlog"),
            400,
            "not a valid namespace",
        ),
        (
            format!("{base}/default/taskbus-backlog?labelSelector=pool%3Dbroken"),
            400,
            "Mars/Base",
        ),
        (
            format!("{base}/default/taskbus-backlog?labelSelector=%ZZ"),
            400,
            "is not `pool=<pool>`",
        ),
        (
            format!(
                "{base}/default/taskbus-backlog?labelSelector=pool%3D{}",
                "a".repeat(3000)
            ),
            400,
            "longer than",
        ),
    ];
    for (path, code, want) in http_cases {
        let (got, body) = http_get(running.http_addr, &path).await;
        assert_eq!(got, code, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(v["kind"], "Status", "{path}");
        assert!(
            v["message"].as_str().unwrap().contains(want),
            "{path}: {body}"
        );
    }
    // No selector: every usable pool.
    let (code, all) = http_json(
        running.http_addr,
        &format!("{base}/default/taskbus-backlog"),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(all["items"].as_array().unwrap().len(), 1, "{all}");

    // A pool removed from the bucket disappears.
    env.kv.delete("cpu").await.unwrap();
    eventually(3, || async {
        let e = c.clone().is_active(sref(&[("pool", "cpu")])).await.err()?;
        (e.code() == tonic::Code::NotFound).then_some(())
    })
    .await;

    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_holds_the_published_metric_until_the_window_ends() {
    let env = Env::start().await;
    // A window covering every minute of every day.
    let always = FreezeWindow {
        from: "00:00".into(),
        to: "00:00".into(),
        tz: "Europe/Berlin".into(),
        weekdays: vec![],
    };
    let frozen = PoolSettings {
        target_per_replica: 2,
        freeze_windows: vec![always],
        ..Default::default()
    };
    env.pool("batch", &frozen).await;
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(env.config(), shutdown.clone())
        .await
        .unwrap();
    let mut c = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();

    env.publish("batch", 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Started inside the freeze with nothing running: held at 0 replicas.
    assert_eq!(metric(&mut c, "batch", "desired").await.0, 0);
    assert_eq!(
        metric(&mut c, "batch", "backlog").await.0,
        0,
        "held at 0 replicas × 2"
    );
    assert!(
        !c.is_active(sref(&[("pool", "batch")]))
            .await
            .unwrap()
            .into_inner()
            .result
    );
    let (_, lag) = http_json(running.http_addr, "/v1/lag").await;
    assert_eq!(lag[0]["backlog"], 10, "the raw figure stays visible: {lag}");
    assert_eq!(lag[0]["frozen"], true);

    // The window is removed: the live value is published within a second.
    env.kv
        .put(
            "batch",
            serde_json::to_vec(&PoolSettings {
                target_per_replica: 2,
                ..Default::default()
            })
            .unwrap()
            .into(),
        )
        .await
        .unwrap();
    assert!(backlog_becomes(&mut c, "batch", 10).await < Duration::from_secs(1));
    let d = metric(&mut c, "batch", "desired").await.0;
    assert!(d >= 1, "{d}");

    // Frozen again while work waits: held at the last published replica count.
    let always = FreezeWindow {
        from: "07:00".into(),
        to: "07:00".into(),
        tz: "UTC".into(),
        weekdays: vec![],
    };
    env.kv
        .put(
            "batch",
            serde_json::to_vec(&PoolSettings {
                target_per_replica: 2,
                freeze_windows: vec![always],
                ..Default::default()
            })
            .unwrap()
            .into(),
        )
        .await
        .unwrap();
    eventually(3, || async {
        let (_, lag) = http_json(running.http_addr, "/v1/lag").await;
        (lag[0]["frozen"] == true).then_some(())
    })
    .await;
    let held = metric(&mut c, "batch", "desired").await.0;
    assert_eq!(held, d);
    env.publish("batch", 200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&mut c, "batch", "desired").await.0,
        held,
        "more work does not move a frozen metric"
    );
    assert_eq!(metric(&mut c, "batch", "backlog").await.0, held * 2);

    // With agents sending heartbeats, a freeze holds the live agent count (the replicas that
    // actually run), not the last published number.
    let settings = |windows: Vec<FreezeWindow>| {
        serde_json::to_vec(&PoolSettings {
            target_per_replica: 2,
            freeze_windows: windows,
            ..Default::default()
        })
        .unwrap()
    };
    env.kv.put("batch", settings(vec![]).into()).await.unwrap();
    let nc = async_nats::connect(env.nats.url()).await.unwrap();
    eventually(5, || async {
        for a in ["a1", "a2", "a3"] {
            nc.publish(format!("taskbus.agents.batch.{a}.heartbeat"), "{}".into())
                .await
                .unwrap();
        }
        nc.flush().await.unwrap();
        let (_, lag) = http_json(running.http_addr, "/v1/lag").await;
        (lag[0]["agents"] == 3 && lag[0]["frozen"] == false).then_some(())
    })
    .await;
    let live = metric(&mut c, "batch", "desired").await.0;
    assert_ne!(
        live, 3,
        "the unfrozen metric follows the queue, not the agents"
    );
    let window = FreezeWindow {
        from: "00:00".into(),
        to: "00:00".into(),
        tz: "UTC".into(),
        weekdays: vec![],
    };
    env.kv
        .put("batch", settings(vec![window]).into())
        .await
        .unwrap();
    eventually(3, || async {
        let (_, lag) = http_json(running.http_addr, "/v1/lag").await;
        (lag[0]["frozen"] == true).then_some(())
    })
    .await;
    assert_eq!(metric(&mut c, "batch", "desired").await.0, 3);
    assert_eq!(metric(&mut c, "batch", "backlog").await.0, 6);

    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_attempts_are_counted_until_due() {
    let env = Env::start().await;
    env.pool("retry", &PoolSettings::default()).await;
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(env.config(), shutdown.clone())
        .await
        .unwrap();

    // A retry as the coordinator schedules it: a JetStream message schedule that the server
    // moves to the work subject when due.
    let at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Schedule",
        format!("@at {}", at.format("%Y-%m-%dT%H:%M:%SZ")).as_str(),
    );
    headers.insert("Nats-Schedule-Target", "taskbus.work.retry.normal");
    env.js
        .publish_with_headers("taskbus.sched.retry.t1.2", headers, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let figures =
        |lag: &serde_json::Value| (lag[0]["delayed"].as_u64(), lag[0]["backlog"].as_u64());
    eventually(3, || async {
        let (_, lag) = http_json(running.http_addr, "/v1/lag").await;
        (figures(&lag) == (Some(1), Some(0))).then_some(())
    })
    .await;
    let base = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default";
    let (_, v) = http_json(
        running.http_addr,
        &format!("{base}/taskbus-delayed?labelSelector=pool%3Dretry"),
    )
    .await;
    assert_eq!(v["items"][0]["value"], "1");
    // Due: it leaves the schedule and joins the backlog.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (_, lag) = http_json(running.http_addr, "/v1/lag").await;
        if figures(&lag) == (Some(0), Some(1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "schedule never became work: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    shutdown.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_nats_restart() {
    let mut env = Env::start().await;
    env.pool("cpu", &PoolSettings::default()).await;
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(env.config(), shutdown.clone())
        .await
        .unwrap();
    let mut c = ExternalScalerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    env.publish("cpu", 3).await;
    backlog_becomes(&mut c, "cpu", 3).await;

    env.nats.kill().await;
    eventually(5, || async {
        let (code, _) = http_get(running.http_addr, "/readyz").await;
        (code == 503).then_some(())
    })
    .await;
    env.nats.restart().await.unwrap();
    // The test's own client reconnects too; publish once JetStream answers again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = env.js.publish("taskbus.work.cpu.normal", "{}".into()).await;
        if let Ok(ack) = r {
            if ack.await.is_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "JetStream did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&mut c, "cpu", "backlog").await.0 != 4 {
        assert!(
            Instant::now() < deadline,
            "the scaler did not follow the queue after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _) = http_get(running.http_addr, "/readyz").await;
    assert_eq!(code, 200, "ready again once the pools can be read");
    // Pool changes made after the restart still arrive through the re-established watch.
    env.pool("late", &PoolSettings::default()).await;
    eventually(20, || async {
        c.clone()
            .is_active(sref(&[("pool", "late")]))
            .await
            .ok()
            .map(|_| ())
    })
    .await;

    shutdown.cancel();
    running.wait().await;
}

/// Poll `f` until it returns `Some`, failing after `secs`.
async fn eventually<F, Fut>(secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while f().await.is_none() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
