//! Shared helpers of the ledger's integration tests: a real nats-server, a fresh PostgreSQL
//! database, the ledger started in-process, API calls, event publishing and the invariant
//! checker.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{PgPool, Row};
use taskbus_ledger::{Config, Running};
use taskbus_proto::api::{ApiError, Reply};
use taskbus_proto::events::{self, ClosedStatus, Event};
use taskbus_proto::Subjects;
use taskbus_runtime::CancellationToken;
pub use taskbus_tests::{eventually, NatsServer, TestDb};

pub struct Env {
    pub nats: NatsServer,
    pub db: TestDb,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub pool: PgPool,
    pub subjects: Subjects,
}

impl Env {
    pub async fn new() -> Self {
        taskbus_tests::init_logging();
        let nats = NatsServer::start().await.expect("nats-server starts");
        let db = TestDb::new().await;
        let client = async_nats::connect(nats.url())
            .await
            .expect("connect to NATS");
        let js = jetstream::new(client.clone());
        let pool = db.pool().await;
        Self {
            nats,
            db,
            client,
            js,
            pool,
            subjects: Subjects::default(),
        }
    }

    pub fn config(&self) -> Config {
        let mut c = Config::new(self.nats.url(), self.db.url.clone());
        c.ack_wait = Duration::from_secs(2);
        c.db_max_connections = 4;
        c
    }

    pub async fn start(&self) -> (Running, CancellationToken) {
        self.start_with(self.config()).await
    }

    pub async fn start_with(&self, config: Config) -> (Running, CancellationToken) {
        let token = CancellationToken::new();
        let running = taskbus_ledger::start(config, token.clone())
            .await
            .expect("ledger starts");
        (running, token)
    }

    /// Request/reply to `taskbus.ledger.<endpoint>`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        endpoint: &str,
        req: &Req,
    ) -> Result<Resp, ApiError> {
        self.call_raw(endpoint, serde_json::to_vec(req).unwrap())
            .await
    }

    pub async fn call_raw<Resp: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: Vec<u8>,
    ) -> Result<Resp, ApiError> {
        let msg = self
            .client
            .request(
                taskbus_ledger::api::subject("taskbus", endpoint),
                body.into(),
            )
            .await
            .expect("ledger answers");
        match serde_json::from_slice::<Reply<Resp>>(&msg.payload) {
            Ok(Reply::Ok(v)) => Ok(v),
            Ok(Reply::Error(e)) => Err(e),
            Err(e) => panic!(
                "unreadable reply from {endpoint}: {e}: {}",
                String::from_utf8_lossy(&msg.payload)
            ),
        }
    }

    pub async fn deposit(&self, account: &str, amount: &str, currency: &str) {
        let r: Result<taskbus_ledger::api::MoveReply, _> = self
            .call(
                "deposit",
                &serde_json::json!({"account": account, "amount": amount, "currency": currency}),
            )
            .await;
        r.expect("deposit accepted");
    }

    /// Publish an event with JetStream (awaiting the ack), with the coordinator's message id.
    pub async fn publish(&self, ev: &Event) {
        let (pool, id) = ev.task();
        let subject = self.subjects.event(pool, id, ev.kind());
        // Contradicting `closed` events of one task (which the coordinator never sends, but a
        // test may) must not be dropped as duplicates of each other.
        let msg_id = match ev {
            Event::Closed(c) => format!("{id}:closed:{}", c.status.as_str()),
            _ => format!("{id}:{}", ev.kind().as_str()),
        };
        self.publish_raw(&subject, ev.to_json(), &msg_id).await;
    }

    pub async fn publish_raw(&self, subject: &str, body: Vec<u8>, msg_id: &str) {
        let p = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(msg_id);
        self.js
            .send_publish(subject.to_string(), p)
            .await
            .expect("publish")
            .await
            .expect("publish acknowledged");
    }

    /// Assert every ledger invariant.
    pub async fn audit(&self) {
        audit(&self.pool).await;
    }

    pub async fn snapshot(&self) -> BTreeMap<(String, String), [String; 4]> {
        snapshot(&self.pool).await
    }

    /// Pending holds left.
    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM ledger.transfers WHERE kind = 'hold' AND status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Wait until `n` holds are resolved.
    pub async fn wait_resolved(&self, n: i64) {
        let pool = self.pool.clone();
        eventually(&format!("{n} holds resolved"), Duration::from_secs(60), || {
            let pool = pool.clone();
            async move {
                let c: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM ledger.transfers WHERE kind = 'hold' AND status IN ('settled', 'voided')",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                (c >= n).then_some(())
            }
        })
        .await;
    }

    /// Durable events of one kind on the stream, by task id (count).
    pub async fn stream_events(&self, kind: &str) -> Vec<Event> {
        let stream = self.js.get_stream("TASKBUS_EVENTS").await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("taskbus.events.*.*.{kind}"),
                ..Default::default()
            })
            .await
            .unwrap();
        let total = consumer.cached_info().num_pending as usize;
        let mut out = Vec::new();
        if total == 0 {
            return out;
        }
        let mut msgs = consumer.messages().await.unwrap();
        while out.len() < total {
            let m =
                tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut msgs))
                    .await
                    .expect("stream read")
                    .unwrap()
                    .unwrap();
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
        out
    }
}

pub async fn audit(pool: &PgPool) {
    let problems = taskbus_ledger::audit::check(pool)
        .await
        .expect("audit runs");
    assert!(
        problems.is_empty(),
        "ledger invariants broken: {problems:#?}"
    );
}

/// Every account's four balance columns, by (name, currency).
pub async fn snapshot(pool: &PgPool) -> BTreeMap<(String, String), [String; 4]> {
    sqlx::query(
        "SELECT name, currency, debits_pending::text, debits_posted::text, credits_pending::text, credits_posted::text
         FROM ledger.accounts",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        let n = |i: usize| {
            r.get::<String, _>(i)
                .parse::<rust_decimal::Decimal>()
                .unwrap()
                .normalize()
                .to_string()
        };
        ((r.get(0), r.get(1)), [n(2), n(3), n(4), n(5)])
    })
    .collect()
}

pub fn hold(
    task_id: &str,
    payer: &str,
    amount: &str,
    currency: Option<&str>,
) -> taskbus_proto::api::Hold {
    taskbus_proto::api::Hold {
        task_id: task_id.into(),
        pool: "default".into(),
        payer: payer.into(),
        amount: amount.into(),
        currency: currency.map(Into::into),
    }
}

/// The coordinator's `closed` event of a task it recorded as succeeded by `agent`.
pub fn succeeded(task_id: &str, agent: &str, reputation: Option<&str>) -> Event {
    closed(task_id, ClosedStatus::Succeeded, Some(agent), reputation)
}

/// The coordinator's `closed` event of a dead task.
pub fn dead(task_id: &str) -> Event {
    closed(task_id, ClosedStatus::Dead, None, None)
}

/// The coordinator's `closed` event of a cancelled task.
pub fn cancelled(task_id: &str) -> Event {
    closed(task_id, ClosedStatus::Cancelled, None, None)
}

/// The coordinator's `closed` event of an expired task.
pub fn expired(task_id: &str) -> Event {
    closed(task_id, ClosedStatus::Expired, None, None)
}

fn closed(
    task_id: &str,
    status: ClosedStatus,
    agent: Option<&str>,
    reputation: Option<&str>,
) -> Event {
    Event::Closed(events::Closed {
        task_id: task_id.into(),
        pool: "default".into(),
        at: Utc::now(),
        status,
        attempt: 1,
        agent_id: agent.map(Into::into),
        reputation: reputation.map(Into::into),
    })
}

/// An agent's own `succeeded` event (a claim the ledger does not settle on).
pub fn agent_succeeded(task_id: &str, agent: &str) -> Event {
    Event::Succeeded(events::Succeeded {
        task_id: task_id.into(),
        pool: "default".into(),
        at: Utc::now(),
        attempt: 1,
        agent_id: agent.into(),
        result: serde_json::Value::Null,
        duration_ms: 1,
        reputation: None,
    })
}
