//! Property tests: random interleavings of outcomes, timeouts, expiries and cancellations (with
//! repeats and stale attempt numbers) always leave a task in exactly one terminal state, and a
//! terminal state never changes afterwards; a batch of failures of one task is recorded as if
//! they came one by one. Runs the coordinator's own SQL on a real PostgreSQL.

use chrono::Utc;
use proptest::prelude::*;
use taskbus_coordinator::store::{self, CancelOutcome, Failure, NewTask, Success};
use taskbus_tests::TestDb;

#[derive(Debug, Clone)]
enum Op {
    Started(i32),
    Succeeded(i32),
    Failed(i32, bool),
    TimedOut(i32),
    Expired(i32),
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    let a = 1..4i32;
    prop_oneof![
        a.clone().prop_map(Op::Started),
        a.clone().prop_map(Op::Succeeded),
        (a.clone(), any::<bool>()).prop_map(|(a, r)| Op::Failed(a, r)),
        a.clone().prop_map(Op::TimedOut),
        a.clone().prop_map(Op::Expired),
        Just(Op::Cancel),
    ]
}

const TERMINAL: [&str; 4] = ["succeeded", "dead", "cancelled", "expired"];

/// A fresh, migrated database and a runtime to drive it from a (synchronous) property test.
fn property_db() -> (tokio::runtime::Runtime, sqlx::PgPool, TestDb) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db, guard) = rt.block_on(async {
        let t = TestDb::new().await;
        let pool = taskbus_runtime::db::connect_and_migrate(&t.url, 4)
            .await
            .unwrap();
        (pool, t)
    });
    (rt, db, guard)
}

/// Admit task `id` (queued, attempt 1), priced when `payer` is given.
async fn admit(db: &sqlx::PgPool, id: &str, max_attempts: i32, seq: i64, payer: Option<&str>) {
    let task = NewTask {
        id: id.into(),
        pool: "default".into(),
        kind: "k".into(),
        priority: "normal".into(),
        max_attempts,
        envelope: "{}".into(),
        submit_seq: seq,
        payer: payer.map(Into::into),
        deadline: None,
        not_before: None,
        timeout_ms: 1000,
        held: false,
        fair_key: None,
        traceparent: None,
    };
    store::insert_admitted(db, &[task], &mut Default::default())
        .await
        .unwrap();
}

async fn status(db: &sqlx::PgPool, id: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, attempt FROM coordinator.tasks WHERE task_id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn apply(db: &sqlx::PgPool, id: &str, op: &Op) {
    let now = Utc::now();
    let fail = |a: i32, retryable: bool| Failure {
        id: id.into(),
        attempt: a,
        agent: Some("p".into()),
        error: "e".into(),
        retryable,
        at: now,
    };
    match op {
        Op::Started(a) => {
            store::record_started(db, &[(id.into(), *a, "p".into(), now)])
                .await
                .unwrap();
        }
        Op::Succeeded(a) => {
            store::record_succeeded(
                db,
                &[Success {
                    id: id.into(),
                    attempt: *a,
                    agent: "p".into(),
                    result: "1".into(),
                    at: now,
                    reputation: None,
                }],
            )
            .await
            .unwrap();
        }
        Op::Failed(a, r) => {
            store::record_failed(db, &[fail(*a, *r)]).await.unwrap();
        }
        Op::TimedOut(a) => {
            store::record_failed(db, &[fail(*a, true)]).await.unwrap();
        }
        Op::Expired(a) => {
            store::record_expired(db, &[(id.into(), *a)]).await.unwrap();
        }
        Op::Cancel => {
            let _: CancelOutcome = store::cancel(db, id, "test").await.unwrap();
        }
    }
}

#[test]
fn every_interleaving_ends_in_exactly_one_terminal_state() {
    let (rt, db, _guard) = property_db();
    let n = std::sync::atomic::AtomicU32::new(0);
    let mut config = ProptestConfig::with_cases(150);
    config.failure_persistence = None;
    proptest!(config, |(max_attempts in 1..4i32, ops in proptest::collection::vec(op(), 1..14))| {
        let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let id = format!("p{n}");
        rt.block_on(async {
            admit(&db, &id, max_attempts, n as i64, None).await;
            let mut terminal: Option<(String, i32)> = None;
            // Every op twice in a row (replays), then a final cancel so the task must end.
            for op in ops.iter().flat_map(|o| [o.clone(), o.clone()]).chain([Op::Cancel]) {
                apply(&db, &id, &op).await;
                let now = status(&db, &id).await;
                match &terminal {
                    Some(t) => prop_assert_eq!(t, &now, "terminal state changed after {:?}", op),
                    None if TERMINAL.contains(&now.0.as_str()) => terminal = Some(now.clone()),
                    None => prop_assert!(["queued", "running"].contains(&now.0.as_str()), "bad state {:?}", now),
                }
                prop_assert!(now.1 >= 1 && now.1 <= max_attempts, "attempt {} outside 1..={}", now.1, max_attempts);
            }
            prop_assert!(terminal.is_some(), "never terminal: {:?}", status(&db, &id).await);
            Ok(())
        })?;
    });
}

/// A batch can hold two successes of one task: a late one of an attempt already retried and
/// the current one. Only the current one is recorded, and what `record_succeeded` returns (the
/// ledger's `closed` event is built from it) names that attempt's agent, whatever the order.
#[tokio::test]
async fn the_recorded_success_is_the_current_attempts() {
    let t = TestDb::new().await;
    let db = taskbus_runtime::db::connect_and_migrate(&t.url, 2)
        .await
        .unwrap();
    admit(&db, "two", 3, 1, Some("acme")).await;
    let failure = Failure {
        id: "two".into(),
        attempt: 1,
        agent: Some("agent-a".into()),
        error: "timed out".into(),
        retryable: true,
        at: Utc::now(),
    };
    store::record_failed(&db, &[failure]).await.unwrap();
    let success = |attempt: i32, agent: &str, rep: &str| Success {
        id: "two".into(),
        attempt,
        agent: agent.into(),
        result: "1".into(),
        at: Utc::now(),
        reputation: Some(rep.into()),
    };
    let done = store::record_succeeded(
        &db,
        &[success(1, "agent-a", "0.5"), success(2, "agent-b", "0.9")],
    )
    .await
    .unwrap();
    assert_eq!(
        done.get("two"),
        Some(&store::RecordedSuccess {
            pool: "default".into(),
            priced: true,
            attempt: 2,
            agent: Some("agent-b".into()),
            reputation: Some("0.9".into()),
            traceparent: None,
        })
    );
    assert_eq!(status(&db, "two").await, ("succeeded".into(), 2));
}

/// A batch can hold a replayed failure of attempt 1 (its first delivery went to a coordinator
/// that crashed before acking it) next to the failure of attempt 2. Both must count, as if
/// they had come one by one: the real failure of attempt 2 may not be lost behind the replay
/// (once, a task stayed `queued` at attempt 2 for good, with no work message left to run it).
#[tokio::test]
async fn a_replayed_failure_in_the_same_batch_does_not_hide_the_next_attempts() {
    let t = TestDb::new().await;
    let db = taskbus_runtime::db::connect_and_migrate(&t.url, 2)
        .await
        .unwrap();
    let fail = |id: &str, attempt: i32| Failure {
        id: id.into(),
        attempt,
        agent: Some(format!("agent-{attempt}")),
        error: format!("attempt {attempt}"),
        retryable: true,
        at: Utc::now(),
    };
    // (max_attempts, the batch's attempts in its order, the expected end)
    let cases: [(i32, &[i32], (&str, i32)); 6] = [
        (2, &[1, 2], ("dead", 2)),
        (2, &[2, 1], ("dead", 2)),
        (3, &[1, 2], ("queued", 3)),
        (3, &[2, 1], ("queued", 3)),
        (3, &[2, 1, 2, 1], ("queued", 3)),
        (3, &[1, 2, 1, 2], ("queued", 3)),
    ];
    for (n, (max_attempts, batch, want)) in cases.into_iter().enumerate() {
        let id = format!("replay-{n}");
        admit(&db, &id, max_attempts, n as i64 + 1, None).await;
        // Attempt 1 failed and was recorded: the task waits for attempt 2.
        store::record_failed(&db, &[fail(&id, 1)]).await.unwrap();
        assert_eq!(status(&db, &id).await, ("queued".into(), 2));

        let rows: Vec<Failure> = batch.iter().map(|a| fail(&id, *a)).collect();
        let out = store::record_failed(&db, &rows).await.unwrap();
        let got = status(&db, &id).await;
        assert_eq!(
            (got.0.as_str(), got.1),
            want,
            "batch {batch:?} with max_attempts {max_attempts}"
        );
        // One answer per task: its state after the whole batch, which the follow-ups use.
        let mine: Vec<_> = out.iter().filter(|o| o.id == id).collect();
        assert_eq!(mine.len(), 1, "batch {batch:?}: {out:?}");
        assert_eq!((mine[0].status.as_str(), mine[0].attempt), want);
        assert_eq!(mine[0].error, "attempt 2");
        assert!(mine[0].fresh, "batch {batch:?} recorded a failure");
        assert_eq!(mine[0].agent.as_deref(), Some("agent-2"));

        // The same failures once more (a later crash's redelivery): nothing changes, and the
        // answer says so, so that metrics and reputation do not count them again.
        let again = store::record_failed(&db, &rows).await.unwrap();
        assert_eq!(status(&db, &id).await, got);
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(!again[0].fresh, "a replay is not fresh: {again:?}");
    }
}

/// Recording a batch of failures of one task, in any order, ends where recording them one by
/// one in attempt order does.
#[test]
fn a_batch_of_failures_is_recorded_as_if_one_by_one() {
    let (rt, db, _guard) = property_db();
    let n = std::sync::atomic::AtomicU32::new(0);
    let mut config = ProptestConfig::with_cases(80);
    config.failure_persistence = None;
    let failures = proptest::collection::vec((1..4i32, any::<bool>()), 1..7);
    proptest!(config, |(max_attempts in 1..4i32, batch in failures)| {
        let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (one_by_one, batched) = (format!("seq{n}"), format!("batch{n}"));
        rt.block_on(async {
            for (k, id) in [&one_by_one, &batched].into_iter().enumerate() {
                admit(&db, id, max_attempts, 2 * n as i64 + k as i64, None).await;
            }
            let fail = |id: &str, (attempt, retryable): (i32, bool)| Failure {
                id: id.into(), attempt, agent: Some("p".into()), error: "e".into(), retryable, at: Utc::now(),
            };
            let mut sorted = batch.clone();
            sorted.sort_by_key(|f| f.0);
            for f in &sorted {
                store::record_failed(&db, &[fail(&one_by_one, *f)]).await.unwrap();
            }
            let rows: Vec<Failure> = batch.iter().map(|f| fail(&batched, *f)).collect();
            store::record_failed(&db, &rows).await.unwrap();
            prop_assert_eq!(status(&db, &one_by_one).await, status(&db, &batched).await, "batch {:?}", batch);
            Ok(())
        })?;
    });
}
