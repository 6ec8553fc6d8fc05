//! The coordinator and the ledger agree on how a priced task ended, even when an agent's
//! success loses: to a cancellation that was recorded first although the success reached the
//! events stream first, or because its attempt had already been timed out and retried. The
//! ledger settles only on the coordinator's `closed` event (its record), never on an agent's
//! `succeeded` claim. Real nats-server and PostgreSQL; the coordinator and the ledger run
//! in-process; the test plays the agent by hand so that it controls the order.

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use serde_json::json;
use sqlx::Row;
use taskbus_proto::events::{self, Event};
use taskbus_proto::WorkItem;
use taskbus_runtime::CancellationToken;
use taskbus_tests::stack::Stack;
use taskbus_tests::{ask, deposit, eventually, stream_events};

const WAIT: Duration = Duration::from_secs(20);

/// The ledger and the coordinator in-process, with payer `acme` funded with 10.00 USD.
struct Services {
    ledger: (taskbus_ledger::Running, CancellationToken),
    coordinator: (taskbus_coordinator::Running, CancellationToken),
}

impl Services {
    async fn start(s: &Stack) -> Self {
        let mut c = taskbus_ledger::Config::new(s.nats.url(), s.db.url.clone());
        c.ack_wait = Duration::from_secs(2);
        c.db_max_connections = 4;
        let token = CancellationToken::new();
        let ledger = taskbus_ledger::start(c, token.clone())
            .await
            .expect("ledger starts");
        deposit(&s.client, "acme", "10.00", "fund-acme").await;
        Self {
            ledger: (ledger, token),
            coordinator: s.coordinator().await,
        }
    }

    /// Check the ledger's invariants, then stop both.
    async fn audit_and_stop(self, s: &Stack) {
        let problems = taskbus_ledger::audit::check(&s.pg).await.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        self.coordinator.1.cancel();
        self.coordinator.0.wait().await;
        self.ledger.1.cancel();
        self.ledger.0.wait().await;
    }
}

/// Take the next work message of pool `default` (normal band) as an agent would.
async fn take_work(s: &Stack) -> WorkItem {
    let stream = s.js.get_stream("TASKBUS_WORK").await.unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("work-default-normal").await.unwrap();
    eventually("a work message", WAIT, || async {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .ok()?;
        let m = batch.next().await?.ok()?;
        m.ack().await.ok()?;
        Some(serde_json::from_slice::<WorkItem>(&m.payload).expect("a work item"))
    })
    .await
}

/// `(status, agent_id)` of the task's hold in the ledger, once it is resolved.
async fn resolved_hold(s: &Stack, id: &str) -> (String, Option<String>) {
    eventually(&format!("the hold of {id} resolved"), WAIT, || async {
        let r = sqlx::query(
            "SELECT status, agent_id FROM ledger.transfers WHERE task_id = $1 AND kind = 'hold'",
        )
        .bind(id)
        .fetch_optional(&s.pg)
        .await
        .ok()??;
        let status: String = r.get(0);
        (status != "pending").then(|| (status, r.get(1)))
    })
    .await
}

async fn balance(s: &Stack, account: &str) -> serde_json::Value {
    let body = serde_json::to_vec(&json!({"account": account, "currency": "USD"})).unwrap();
    let v = ask(&s.client, "taskbus.ledger.balance", body)
        .await
        .expect("the ledger answers");
    v["ok"]["balances"].clone()
}

/// Sessions of this test's database waiting for a row lock on a statement containing `what`.
async fn lock_waiters(s: &Stack, what: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
    )
    .bind(format!("%{what}%"))
    .fetch_one(&s.pg)
    .await
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_that_lost_to_a_cancellation_is_not_paid() {
    let s = Stack::new(30_000).await;
    let services = Services::start(&s).await;
    s.submit(
        "default",
        json!({"id": "race-1", "kind": "k", "price": "2.00", "payer": "acme", "currency": "USD"}),
    )
    .await;
    s.wait_status("race-1", "queued", WAIT).await;
    let work = take_work(&s).await;
    assert_eq!(work.task_id(), "race-1");

    // Hold the task's row, so that neither the cancellation nor the outcome is written yet.
    let mut blocker = s.pg.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM coordinator.tasks WHERE task_id = 'race-1' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // The cancellation asks first and queues for the row ...
    let client = s.client.clone();
    let cancel = tokio::spawn(async move {
        let body = serde_json::to_vec(&json!({"id": "race-1"})).unwrap();
        let reply =
            tokio::time::timeout(WAIT, client.request("taskbus.api.task.cancel", body.into()))
                .await
                .expect("the cancellation is answered")
                .expect("request");
        serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
    });
    eventually("the cancellation waits for the row", WAIT, || async {
        (lock_waiters(&s, "'cancelled'").await >= 1).then_some(())
    })
    .await;
    // ... then the agent's success reaches the events stream (before any `cancelled` event)
    // and the outcome writer queues behind the cancellation.
    s.publish_succeeded("race-1", work.attempt, "agent-late")
        .await;
    eventually("the outcome waits for the row", WAIT, || async {
        (lock_waiters(&s, "'succeeded'").await >= 1).then_some(())
    })
    .await;
    blocker.commit().await.unwrap();

    let reply = cancel.await.unwrap();
    assert_eq!(reply["ok"]["status"], "cancelled", "{reply}");
    // The coordinator recorded the cancellation; the success came too late.
    let row = s.wait_status("race-1", "cancelled", WAIT).await;
    assert_eq!(row.status, "cancelled");
    // In the stream the success is first: a ledger paying on it would disagree.
    let events = s.js.get_stream("TASKBUS_EVENTS").await.unwrap();
    let mut seq = Vec::new();
    for kind in [events::EventKind::Succeeded, events::EventKind::Cancelled] {
        let m = events
            .get_last_raw_message_by_subject(&s.subjects.event("default", "race-1", kind))
            .await
            .expect("the event is on the stream");
        seq.push(m.sequence);
    }
    assert!(seq[0] < seq[1], "succeeded before cancelled: {seq:?}");

    // The ledger follows the coordinator: the hold is voided, nobody is paid.
    assert_eq!(resolved_hold(&s, "race-1").await, ("voided".into(), None));
    assert_eq!(balance(&s, "agent-late").await, json!([]));
    let acme = balance(&s, "acme").await;
    assert_eq!(acme[0]["available"], "10.00", "{acme}");
    let closed = stream_events(&s.js, "closed").await;
    assert!(
        matches!(&closed[..], [Event::Closed(c)] if c.status == events::ClosedStatus::Cancelled),
        "{closed:?}"
    );
    services.audit_and_stop(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_success_of_a_timed_out_attempt_is_not_paid() {
    let s = Stack::new(30_000).await;
    let services = Services::start(&s).await;
    s.submit(
        "default",
        json!({"id": "late-1", "kind": "k", "price": "2.00", "payer": "acme", "currency": "USD",
               "timeout_ms": 100, "max_attempts": 2, "retry": {"base_ms": 10, "max_ms": 20}}),
    )
    .await;
    // Agent A takes attempt 1, says it started, then goes silent.
    let first = take_work(&s).await;
    assert_eq!((first.task_id(), first.attempt), ("late-1", 1));
    let started = Event::Started(events::Started {
        task_id: "late-1".into(),
        pool: "default".into(),
        at: Utc::now(),
        attempt: 1,
        agent_id: "agent-a".into(),
    });
    s.client
        .publish(
            s.subjects
                .event("default", "late-1", events::EventKind::Started),
            started.to_json().into(),
        )
        .await
        .unwrap();
    s.wait_status("late-1", "running", WAIT).await;
    // The coordinator times the attempt out (after its timeout plus 10 s of slack) and queues
    // attempt 2.
    eventually(
        "attempt 1 timed out and retried",
        Duration::from_secs(40),
        || async {
            s.task("late-1")
                .await
                .filter(|t| t.attempt == 2)
                .map(|_| ())
        },
    )
    .await;
    // Agent A's success arrives late: the first success in the stream, for a dead attempt.
    s.publish_succeeded("late-1", 1, "agent-a").await;
    // Agent B runs attempt 2 and succeeds.
    let second = take_work(&s).await;
    assert_eq!((second.task_id(), second.attempt), ("late-1", 2));
    s.publish_succeeded("late-1", 2, "agent-b").await;
    let row = s.wait_status("late-1", "succeeded", WAIT).await;
    assert_eq!(row.agent_id.as_deref(), Some("agent-b"));

    // The ledger pays the success the coordinator recorded: agent B, 2.00 × 1, less 10 %.
    assert_eq!(
        resolved_hold(&s, "late-1").await,
        ("settled".into(), Some("agent-b".into()))
    );
    assert_eq!(balance(&s, "agent-a").await, json!([]));
    let b = balance(&s, "agent-b").await;
    assert_eq!(b[0]["posted"], "1.80", "{b}");
    services.audit_and_stop(&s).await;
}
