//! The ledger against a real nats-server and a real PostgreSQL: holds, settlement, operator
//! operations, idempotency, hostile input and replicas. The invariant checker runs after every
//! step.

mod common;
#[path = "../../../tests/http_get.rs"]
mod http_get;

use std::time::Duration;

use common::*;
use serde_json::json;
use taskbus_ledger::api::{
    AccountsReply, AuditReply, BalanceReply, MoveReply, StatementReply, TransfersReply,
};
use taskbus_proto::api::{ApiError, HoldRequest, HoldResponse, HoldStatus};
use taskbus_proto::events::Event;
use taskbus_runtime::CancellationToken;

async fn balance(env: &Env, account: &str, currency: &str) -> (String, String) {
    let b: BalanceReply = env
        .call(
            "balance",
            &json!({"account": account, "currency": currency}),
        )
        .await
        .unwrap();
    let b = b
        .balances
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{account} has no {currency} balance"));
    (b.posted, b.available)
}

async fn holds(env: &Env, holds: Vec<taskbus_proto::api::Hold>) -> HoldResponse {
    env.call("hold", &HoldRequest { holds })
        .await
        .expect("hold reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_then_post_and_void_move_the_money() {
    let env = Env::new().await;
    // A budget in a currency the ledger does not have is refused before anything starts.
    let mut c = env.config();
    c.spend_budgets = vec!["EUR=5".parse().unwrap()];
    match taskbus_ledger::start(c, CancellationToken::new()).await {
        Err(e) => assert!(e.to_string().contains("--currencies"), "{e}"),
        Ok(_) => panic!("a budget in an unknown currency was accepted"),
    }
    let mut c = env.config();
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    c.spend_budgets = vec!["USD=250".parse().unwrap(), "SAT=1000000".parse().unwrap()];
    let (running, token) = env.start_with(c).await;
    let http = running.http_addr.unwrap();
    env.audit().await;
    env.deposit("alice", "10.00", "USD").await;
    env.audit().await;

    let r = holds(
        &env,
        vec![
            hold("t1", "alice", "1.00", Some("USD")),
            hold("t2", "alice", "2.5", None),
            hold("t3", "alice", "50", Some("USD")),
            hold("t4", "alice", "1.001", Some("USD")),
            hold("t5", "alice", "1", Some("EUR")),
            hold("t6", "nobody", "1", Some("USD")),
            hold("t 7", "alice", "1", Some("USD")),
        ],
    )
    .await;
    let statuses: Vec<HoldStatus> = r.results.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            HoldStatus::Held,
            HoldStatus::Held,
            HoldStatus::InsufficientFunds,
            HoldStatus::Invalid,
            HoldStatus::Invalid,
            HoldStatus::InsufficientFunds,
            HoldStatus::Invalid
        ]
    );
    assert_eq!(r.results[6].task_id, "t 7");
    assert!(
        r.results[2]
            .message
            .as_deref()
            .unwrap()
            .contains("6.50 USD available"),
        "{:?}",
        r.results[2]
    );
    assert!(r.results[3]
        .message
        .as_deref()
        .unwrap()
        .contains("never rounded"));
    env.audit().await;
    assert_eq!(
        balance(&env, "alice", "USD").await,
        ("10.00".into(), "6.50".into())
    );

    // The held events are on the stream with the amounts.
    let held = env.stream_events("held").await;
    assert_eq!(held.len(), 2);
    assert!(held.iter().any(|e| matches!(e, Event::Held(h) if h.task_id == "t2" && h.amount == "2.50" && h.currency == "USD")));

    env.publish(&succeeded("t1", "agent-1", Some("0.9"))).await;
    env.publish(&dead("t2")).await;
    env.wait_resolved(2).await;
    env.audit().await;
    // t1: payout 0.90 of 1.00 (fee 10% = 0.09, agent 0.81, refund 0.10); t2 voided.
    assert_eq!(
        balance(&env, "alice", "USD").await,
        ("9.10".into(), "9.10".into())
    );
    assert_eq!(
        balance(&env, "agent-1", "USD").await,
        ("0.81".into(), "0.81".into())
    );
    assert_eq!(
        balance(&env, "platform", "USD").await,
        ("0.09".into(), "0.09".into())
    );
    assert_eq!(
        balance(&env, "escrow", "USD").await,
        ("0.00".into(), "0.00".into())
    );
    // What alice paid for t1 (agent and platform shares), and the budgets for the alert.
    let (_, text) = http_get::http_get(http, "/metrics").await;
    for line in [
        r#"taskbus_ledger_spent_total{currency="USD",pool="default"} 0.9"#.to_string(),
        r#"taskbus_ledger_spend_budget_per_hour{currency="USD"} 250.0"#.to_string(),
        r#"taskbus_ledger_spend_budget_per_hour{currency="SAT"} 1000000.0"#.to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
    }

    let settled = {
        let env = &env;
        eventually(
            "two settled events",
            Duration::from_secs(10),
            || async move {
                let s = env.stream_events("settled").await;
                (s.len() == 2).then_some(s)
            },
        )
        .await
    };
    let s1 = settled
        .iter()
        .find_map(|e| match e {
            Event::Settled(s) if s.task_id == "t1" => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (
            s1.outcome.as_str(),
            s1.agent_amount.as_str(),
            s1.platform_amount.as_str(),
            s1.refund_amount.as_str()
        ),
        ("posted", "0.81", "0.09", "0.10")
    );
    assert_eq!(s1.agent_id.as_deref(), Some("agent-1"));
    let s2 = settled
        .iter()
        .find_map(|e| match e {
            Event::Settled(s) if s.task_id == "t2" => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (s2.outcome.as_str(), s2.refund_amount.as_str()),
        ("voided", "2.50")
    );

    // Transfers by task and the statement with its running balance.
    let t: TransfersReply = env
        .call("transfers", &json!({"task_id": "t1"}))
        .await
        .unwrap();
    let kinds: Vec<(&str, &str)> = t
        .transfers
        .iter()
        .map(|t| (t.kind.as_str(), t.amount.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [("hold", "1.00"), ("payout", "0.81"), ("fee", "0.09")]
    );
    assert_eq!(t.transfers[0].posted_amount.as_deref(), Some("0.90"));
    assert_eq!(t.transfers[0].outcome.as_deref(), Some("succeeded"));
    let st: StatementReply = env
        .call("statement", &json!({"account": "alice"}))
        .await
        .unwrap();
    let lines: Vec<(&str, &str, &str)> = st
        .lines
        .iter()
        .map(|l| (l.kind.as_str(), l.amount.as_str(), l.balance.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            ("deposit", "10.00", "10.00"),
            ("hold", "-0.90", "9.10"),
            ("hold", "0.00", "9.10")
        ]
    );
    let st: StatementReply = env
        .call("statement", &json!({"account": "alice", "limit": 1}))
        .await
        .unwrap();
    assert_eq!((st.lines.len(), st.omitted), (1, 2));

    // Escrow shards are statemented by a scan: every escrow line of the two holds is there.
    let mut escrow_lines = 0;
    for i in 0..8 {
        let st: StatementReply = env
            .call("statement", &json!({"account": format!("escrow.{i}")}))
            .await
            .unwrap();
        escrow_lines += st.lines.len();
        if let Some(last) = st.lines.last() {
            assert_eq!(last.balance, "0.00", "escrow.{i}: {st:?}");
        }
    }
    assert_eq!(escrow_lines, 4, "two holds, one payout, one fee");
    let st: StatementReply = env
        .call("statement", &json!({"account": "external"}))
        .await
        .unwrap();
    assert_eq!(st.lines.len(), 1);
    assert_eq!(st.lines[0].balance, "-10.00");
    let audit: AuditReply = env.call("audit", &json!({})).await.unwrap();
    assert!(audit.ok, "{:?}", audit.problems);
    let accounts: AccountsReply = env
        .call("accounts", &json!({"kind": "agent"}))
        .await
        .unwrap();
    assert_eq!(accounts.accounts.len(), 1);

    token.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_idempotent_and_resolves_at_most_once() {
    let env = Env::new().await;
    let (running, token) = env.start().await;
    env.deposit("bob", "5", "SAT").await;
    let h = || vec![hold("x1", "bob", "3", Some("SAT"))];
    assert_eq!(holds(&env, h()).await.results[0].status, HoldStatus::Held);
    let before = env.snapshot().await;
    // Same content: the original result, nothing moves.
    assert_eq!(holds(&env, h()).await.results[0].status, HoldStatus::Held);
    assert_eq!(env.snapshot().await, before);
    // Same key, different content: refused, nothing moves.
    let r = holds(&env, vec![hold("x1", "bob", "2", Some("SAT"))]).await;
    assert_eq!(r.results[0].status, HoldStatus::Invalid);
    assert!(r.results[0]
        .message
        .as_deref()
        .unwrap()
        .contains("different content"));
    // The same task twice in one request with different content.
    let r = holds(
        &env,
        vec![
            hold("x2", "bob", "1", Some("SAT")),
            hold("x2", "bob", "2", Some("SAT")),
        ],
    )
    .await;
    assert_eq!(
        r.results.iter().map(|r| r.status).collect::<Vec<_>>(),
        [HoldStatus::Held, HoldStatus::Invalid]
    );
    env.audit().await;
    // Only 1 SAT is left available: a third hold is refused and changes nothing.
    let before = env.snapshot().await;
    let r = holds(&env, vec![hold("x3", "bob", "2", Some("SAT"))]).await;
    assert_eq!(r.results[0].status, HoldStatus::InsufficientFunds);
    assert_eq!(env.snapshot().await, before);

    // An agent's own `succeeded` is a claim, not the coordinator's record: it settles nothing.
    env.publish(&agent_succeeded("x1", "agent-9")).await;
    // Two outcomes for x1 (a late success after a cancel): the first in the stream wins.
    env.publish(&cancelled("x1")).await;
    env.publish(&succeeded("x1", "agent-9", None)).await;
    env.publish(&expired("x2")).await;
    env.wait_resolved(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.audit().await;
    assert_eq!(balance(&env, "bob", "SAT").await, ("5".into(), "5".into()));
    let b: BalanceReply = env
        .call("balance", &json!({"account": "agent-9"}))
        .await
        .unwrap();
    assert!(b.balances.is_empty(), "the late success paid: {b:?}");
    // Replaying the outcome events changes nothing either.
    let before = env.snapshot().await;
    env.publish_raw(
        "taskbus.events.default.x1.closed",
        succeeded("x1", "agent-9", None).to_json(),
        "other-id",
    )
    .await;
    env.publish_raw(
        "taskbus.events.default.x2.closed",
        expired("x2").to_json(),
        "other-id-2",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(env.snapshot().await, before);
    // A resolved hold asked for again is refused (the task would run unpaid).
    let r = holds(&env, h()).await;
    assert_eq!(r.results[0].status, HoldStatus::Invalid);
    assert!(
        r.results[0]
            .message
            .as_deref()
            .unwrap()
            .contains("at most once"),
        "{:?}",
        r.results[0]
    );
    env.audit().await;
    token.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_operations_are_idempotent_and_validated() {
    let env = Env::new().await;
    let (running, token) = env.start().await;
    let dep = json!({"account": "carol", "amount": "7.25", "currency": "USD", "key": "k1"});
    let a: MoveReply = env.call("deposit", &dep).await.unwrap();
    let b: MoveReply = env.call("deposit", &dep).await.unwrap();
    assert!(!a.duplicate && b.duplicate);
    assert_eq!(a.transfer_id, b.transfer_id);
    assert_eq!(b.balance.posted, "7.25");
    env.audit().await;

    let before = env.snapshot().await;
    let refused: Vec<(&str, serde_json::Value, u16)> = vec![
        (
            "deposit",
            json!({"account": "carol", "amount": "8", "currency": "USD", "key": "k1"}),
            409,
        ),
        (
            "withdraw",
            json!({"account": "carol", "amount": "7.25", "currency": "USD", "key": "k1"}),
            409,
        ),
        (
            "withdraw",
            json!({"account": "carol", "amount": "7.26", "currency": "USD"}),
            422,
        ),
        (
            "withdraw",
            json!({"account": "nobody", "amount": "1", "currency": "USD"}),
            404,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "-1", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "1.005", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "1e3", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "0", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "99999999999999999999", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": 5, "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "1", "currency": "XXX"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "platform", "amount": "1", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "escrow.0", "amount": "1", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "a.b", "amount": "1", "currency": "USD"}),
            400,
        ),
        (
            "deposit",
            json!({"account": "carol", "amount": "1", "currency": "USD", "admin": true}),
            400,
        ),
        (
            "withdraw",
            json!({"account": "escrow.0", "amount": "1", "currency": "USD"}),
            400,
        ),
        ("statement", json!({"account": "carol", "limit": 0}), 400),
        ("statement", json!({"account": "nobody"}), 404),
        ("transfers", json!({"task_id": "a b"}), 400),
        ("accounts", json!({"kind": "bank"}), 400),
        ("balance", json!({}), 400),
    ];
    for (endpoint, body, code) in refused {
        let r: Result<serde_json::Value, ApiError> = env.call(endpoint, &body).await;
        let e = r.expect_err(&format!("{endpoint} {body} accepted"));
        assert_eq!(e.code, code, "{endpoint} {body}: {}", e.error);
        assert!(!e.error.is_empty());
        assert_eq!(
            env.snapshot().await,
            before,
            "{endpoint} {body} changed a balance"
        );
        env.audit().await;
    }
    for raw in [
        b"not json".to_vec(),
        b"[1,2]".to_vec(),
        vec![0xff, 0xfe],
        b"{\"holds\":5}".to_vec(),
    ] {
        for endpoint in ["hold", "deposit", "withdraw", "balance"] {
            let r: Result<serde_json::Value, ApiError> = env.call_raw(endpoint, raw.clone()).await;
            assert_eq!(r.expect_err("garbage accepted").code, 400);
        }
    }
    let too_many: Vec<_> = (0..10_001)
        .map(|i| hold(&format!("m{i}"), "carol", "0.01", None))
        .collect();
    let r: Result<HoldResponse, ApiError> =
        env.call("hold", &HoldRequest { holds: too_many }).await;
    assert_eq!(r.unwrap_err().code, 400);
    assert_eq!(env.snapshot().await, before);

    let w: MoveReply = env
        .call(
            "withdraw",
            &json!({"account": "carol", "amount": "7", "currency": "USD", "key": "w1"}),
        )
        .await
        .unwrap();
    assert_eq!(w.balance.posted, "0.25");
    let ext = balance(&env, "external", "USD").await;
    assert_eq!(ext.0, "-0.25");
    env.audit().await;
    token.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_change_nothing() {
    let env = Env::new().await;
    // Read `held` events too (as a ledger rebuilding from the stream does): a conflicting or
    // unaffordable one must change nothing either.
    let mut config = env.config();
    config.replay_held = true;
    let (running, token) = env.start_with(config).await;
    env.deposit("dave", "10", "USD").await;
    assert_eq!(
        holds(&env, vec![hold("h1", "dave", "4", None)])
            .await
            .results[0]
            .status,
        HoldStatus::Held
    );
    let before = env.snapshot().await;
    let ok = String::from_utf8(succeeded("h1", "agent-x", None).to_json()).unwrap();
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("taskbus.events.default.h1.closed", b"{not json".to_vec()),
        ("taskbus.events.default.h1.closed", vec![0xff; 10]),
        ("taskbus.events.default.h1.closed", b"{}".to_vec()),
        ("taskbus.events.default.h2.closed", ok.clone().into_bytes()),
        ("taskbus.events.other.h1.closed", ok.clone().into_bytes()),
        ("taskbus.events.default.h1.rejected", ok.clone().into_bytes()),
        ("taskbus.events.default.h1.closed", ok.replace("\"agent-x\"", "\"platform\"").into_bytes()),
        ("taskbus.events.default.h1.closed", ok.replace("\"agent-x\"", "\"a.b\"").into_bytes()),
        ("taskbus.events.default.h1.closed", ok.replace(",\"agent_id\":\"agent-x\"", "").into_bytes()),
        ("taskbus.events.default.h1.closed", ok.replace("\"succeeded\"", "\"paid\"").into_bytes()),
        (
            "taskbus.events.default.h1.closed",
            ok.replace("\"agent_id\":", "\"reputation\":\"-2\",\"agent_id\":").into_bytes(),
        ),
        (
            "taskbus.events.default.h1.closed",
            ok.replace("\"agent_id\":", "\"reputation\":\"1e9\",\"agent_id\":").into_bytes(),
        ),
        (
            "taskbus.events.default.h9.held",
            br#"{"event":"held","task_id":"h9","pool":"default","at":"2026-01-01T00:00:00Z","payer":"dave","amount":"100","currency":"USD"}"#.to_vec(),
        ),
        (
            "taskbus.events.default.h1.held",
            br#"{"event":"held","task_id":"h1","pool":"default","at":"2026-01-01T00:00:00Z","payer":"dave","amount":"5","currency":"USD"}"#.to_vec(),
        ),
    ];
    for (i, (subject, body)) in hostile.into_iter().enumerate() {
        env.publish_raw(subject, body, &format!("hostile-{i}"))
            .await;
    }
    // Let settlement see them all (they are before the good event in the stream).
    env.publish(&succeeded("h1", "agent-x", Some("0.5"))).await;
    env.wait_resolved(1).await;
    env.audit().await;
    let after = env.snapshot().await;
    // Only the good event moved money: 2 of 4 paid, 2 refunded.
    assert_ne!(before, after);
    assert_eq!(
        balance(&env, "dave", "USD").await,
        ("8.00".into(), "8.00".into())
    );
    assert_eq!(balance(&env, "agent-x", "USD").await.0, "1.80");
    let b: BalanceReply = env
        .call("balance", &json!({"account": "platform"}))
        .await
        .unwrap();
    assert_eq!(
        b.balances
            .iter()
            .find(|b| b.currency == "USD")
            .unwrap()
            .posted,
        "0.20"
    );
    token.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_voids_only_a_hold_made_before_it() {
    let env = Env::new().await;
    let (running, token) = env.start().await;
    env.deposit("erin", "10", "USD").await;
    assert_eq!(
        holds(&env, vec![hold("r1", "erin", "3", None)])
            .await
            .results[0]
            .status,
        HoldStatus::Held
    );
    // A rejection stamped before the hold (a stale one from an earlier submission) is ignored.
    let stale = Event::Rejected(taskbus_proto::events::Rejected {
        task_id: "r1".into(),
        pool: "default".into(),
        at: chrono::Utc::now() - chrono::Duration::minutes(5),
        reason: taskbus_proto::RejectReason::InsufficientFunds,
        message: "no funds".into(),
        submit_seq: Some(1),
    });
    env.publish_raw(
        "taskbus.events.default.r1.rejected",
        stale.to_json(),
        "stale",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(env.pending().await, 1);
    let fresh = Event::Rejected(taskbus_proto::events::Rejected {
        task_id: "r1".into(),
        pool: "default".into(),
        at: chrono::Utc::now(),
        reason: taskbus_proto::RejectReason::InvalidValue,
        message: "rejected after hold".into(),
        submit_seq: Some(2),
    });
    env.publish_raw(
        "taskbus.events.default.r1.rejected",
        fresh.to_json(),
        "fresh",
    )
    .await;
    env.wait_resolved(1).await;
    env.audit().await;
    assert_eq!(
        balance(&env, "erin", "USD").await,
        ("10.00".into(), "10.00".into())
    );
    token.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_work_and_hold_each_task_once() {
    let env = Env::new().await;
    let (r1, t1) = env.start().await;
    let (r2, t2) = env.start().await;
    env.deposit("fay", "1000", "SAT").await;
    // Both replicas answer hold requests (queue group); the same tasks asked many times at once.
    let reqs = (0..8).map(|_| {
        let hs: Vec<_> = (0..200)
            .map(|i| hold(&format!("c{i}"), "fay", "2", Some("SAT")))
            .collect();
        holds(&env, hs)
    });
    for r in futures::future::join_all(reqs).await {
        assert!(
            r.results.iter().all(|r| r.status == HoldStatus::Held),
            "{r:?}"
        );
    }
    env.audit().await;
    assert_eq!(
        balance(&env, "fay", "SAT").await,
        ("1000".into(), "600".into())
    );
    for i in 0..200 {
        let ev = if i % 2 == 0 {
            succeeded(&format!("c{i}"), "agent-r", None)
        } else {
            dead(&format!("c{i}"))
        };
        env.publish(&ev).await;
    }
    env.wait_resolved(200).await;
    env.audit().await;
    // 100 successes at 2 SAT: 200 SAT paid, fee 10% of 2 = 0 (whole SAT, rounded toward zero).
    assert_eq!(
        balance(&env, "fay", "SAT").await,
        ("800".into(), "800".into())
    );
    assert_eq!(balance(&env, "agent-r", "SAT").await.0, "200");
    t1.cancel();
    t2.cancel();
    r1.wait().await;
    r2.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_permanent_and_the_audit_finds_dangling_transfers() {
    let env = Env::new().await;
    let (running, token) = env.start().await;
    env.deposit("gina", "5", "USD").await;
    // The journal has no foreign keys (they cost 40 % of a settlement): accounts are
    // permanent instead, so an id once read stays valid.
    for sql in [
        "DELETE FROM ledger.accounts WHERE name = 'gina'",
        "UPDATE ledger.accounts SET id = id + 100000 WHERE name = 'gina'",
        "TRUNCATE ledger.accounts CASCADE",
    ] {
        let e = sqlx::query(sql)
            .execute(&env.pool)
            .await
            .expect_err(sql)
            .to_string();
        assert!(e.contains("permanent"), "{sql}: {e}");
    }
    env.audit().await;
    // A transfer naming a missing account can only be planted by hand; the audit reports it.
    sqlx::query(
        "INSERT INTO ledger.transfers (kind, status, debit_account, credit_account, currency, amount)
         SELECT 'deposit', 'posted', 987654321, id, 'USD', 1 FROM ledger.accounts WHERE name = 'gina'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let problems = taskbus_ledger::audit::check(&env.pool).await.unwrap();
    assert!(
        problems.iter().any(|p| p.contains("missing account")),
        "{problems:#?}"
    );
    token.cancel();
    running.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_from_before_closed_events_is_brought_up_to_date() {
    let env = Env::new().await;
    // First start creates the streams; then the consumer is put back as an older ledger left
    // it: settling on agents' outcome events, `held` included.
    let (running, token) = env.start().await;
    token.cancel();
    running.wait().await;
    let stream = env.js.get_stream("TASKBUS_EVENTS").await.unwrap();
    stream.delete_consumer("ledger").await.unwrap();
    let old: Vec<String> = [
        "held",
        "succeeded",
        "dead",
        "cancelled",
        "expired",
        "rejected",
    ]
    .iter()
    .map(|k| format!("taskbus.events.*.*.{k}"))
    .collect();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("ledger".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(3),
            filter_subjects: old,
            ..Default::default()
        })
        .await
        .unwrap();

    let (running, token) = env.start().await;
    let mut c: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("ledger").await.unwrap();
    let cfg = c.info().await.unwrap().config.clone();
    let mut filter = cfg.filter_subjects.clone();
    filter.sort();
    assert_eq!(
        filter,
        [
            "taskbus.events.*.*.closed",
            "taskbus.events.*.*.held",
            "taskbus.events.*.*.rejected"
        ],
        "`held` kept (the old consumer had it), agents' outcomes replaced by `closed`"
    );
    assert_eq!(
        cfg.ack_wait,
        Duration::from_secs(3),
        "its own settings kept"
    );
    // And it settles on `closed`, not on an agent's claim.
    env.deposit("ivan", "10", "USD").await;
    holds(&env, vec![hold("u1", "ivan", "2", None)]).await;
    env.publish(&agent_succeeded("u1", "agent-u")).await;
    env.publish(&succeeded("u1", "agent-v", None)).await;
    env.wait_resolved(1).await;
    env.audit().await;
    assert_eq!(balance(&env, "agent-v", "USD").await.0, "1.80");
    token.cancel();
    running.wait().await;
}
