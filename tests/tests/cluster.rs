//! The spine on a 3-node JetStream cluster with replicated (R3) streams.

use std::time::Duration;

use serde_json::json;
use taskbus_agent::{Agent, AgentConfig, CancellationToken, TaskContext, TaskError};
use taskbus_tests::{eventually, NatsCluster, TestDb};

#[tokio::test]
async fn tasks_flow_on_a_three_node_cluster_with_r3_streams() {
    taskbus_tests::init_logging();
    let cluster = NatsCluster::start(3).await.expect("cluster starts");
    let db = TestDb::new().await;
    // JetStream needs a moment to elect a meta leader.
    let client = eventually(
        "cluster JetStream ready",
        Duration::from_secs(30),
        || async {
            let urls: Vec<async_nats::ServerAddr> = cluster
                .nodes
                .iter()
                .map(|n| n.url().parse().unwrap())
                .collect();
            let c = match async_nats::connect(urls.as_slice()).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("connect: {e}");
                    return None;
                }
            };
            let js = async_nats::jetstream::new(c.clone());
            // Asked with a short limit: before the meta leader is elected the request gets no
            // answer, and the client's own 10 s limit made the test wait that long for nothing.
            match tokio::time::timeout(Duration::from_secs(1), js.query_account()).await {
                Ok(Ok(_)) => Some(c),
                Ok(Err(e)) => {
                    eprintln!("account: {e}");
                    None
                }
                Err(_) => {
                    eprintln!("account: no answer yet");
                    None
                }
            }
        },
    )
    .await;
    let mut cfg = taskbus_coordinator::Config::new(cluster.url(), db.url.clone());
    cfg.streams.replicas = 3;
    let token = CancellationToken::new();
    let _coord = taskbus_coordinator::start(cfg, token.clone())
        .await
        .expect("coordinator on cluster");
    let js = async_nats::jetstream::new(client.clone());
    let info = js
        .get_stream("TASKBUS_WORK")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);

    // The agent connects to a different node than the producer.
    let mut ac = AgentConfig::new(cluster.nodes[2].url(), "default");
    ac.agent_id = "cluster-agent".into();
    let agent = Agent::new(
        ac,
        |t: TaskContext| async move { Ok::<_, TaskError>(t.payload) },
    );
    let at = token.clone();
    let _a = tokio::spawn(async move { agent.run(at).await });
    let producer =
        async_nats::jetstream::new(async_nats::connect(cluster.nodes[1].url()).await.unwrap());
    for i in 0..50 {
        let body =
            serde_json::to_vec(&json!({"kind": "echo", "id": format!("c{i}"), "payload": i}))
                .unwrap();
        producer
            .publish("taskbus.submit.default", body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let pg = db.pool().await;
    eventually("all 50 succeeded", Duration::from_secs(60), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks WHERE status = 'succeeded'")
                .fetch_one(&pg)
                .await
                .ok()?;
        (n == 50).then_some(())
    })
    .await;
    token.cancel();
}
