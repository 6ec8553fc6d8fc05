//! The committed JSON Schemas agree with the Rust types, and real messages validate against them.

use chrono::Utc;
use serde_json::{json, Value};
use taskbus_proto::events::*;
use taskbus_proto::validate::RejectReason;
use taskbus_proto::{schema, Priority, TaskEnvelope, WorkItem};

fn committed(name: &str) -> Value {
    let path = manifest_dir().join("schema").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}); run `cargo run -p taskbus-proto --example gen-schemas`",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("committed schema is JSON")
}

#[test]
fn committed_schemas_match_types() {
    for (name, generated) in schema::all() {
        assert_eq!(
            committed(&name),
            generated,
            "proto/schema/{name} is stale; run `cargo run -p taskbus-proto --example gen-schemas`"
        );
    }
}

fn assert_valid(schema_name: &str, instance: &Value) {
    let schema = committed(schema_name);
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{schema_name} refuses {instance}: {errors:?}"
    );
}

fn assert_invalid(schema_name: &str, instance: &Value) {
    let schema = committed(schema_name);
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    assert!(
        !validator.is_valid(instance),
        "{schema_name} accepts {instance}"
    );
}

#[test]
fn envelopes_validate() {
    let env: TaskEnvelope = serde_json::from_value(json!({
        "kind": "echo", "payload": {"x": 1}, "id": "t1", "priority": "high", "price": "0.25",
        "payer": "alice", "labels": {"team": "a"}, "resources": {"gpus": 1}
    }))
    .unwrap();
    assert_valid("envelope.schema.json", &serde_json::to_value(&env).unwrap());
    assert_invalid("envelope.schema.json", &json!({"kind": "a", "bogus": 1}));
    assert_invalid("envelope.schema.json", &json!({"payload": 1}));
    assert_invalid(
        "envelope.schema.json",
        &json!({"kind": "a", "priority": "urgent"}),
    );
    let item = WorkItem {
        attempt: 1,
        pool: "default".into(),
        task: env,
    };
    assert_valid(
        "work-item.schema.json",
        &serde_json::to_value(&item).unwrap(),
    );
}

#[test]
fn schedules_validate() {
    let s: taskbus_proto::Schedule = serde_json::from_value(json!({
        "cron": "*/10 * * * * *", "timezone": "Europe/Berlin", "pool": "default",
        "task": {"kind": "report", "payload": {"day": 1}, "priority": "low", "labels": {"team": "a"}},
        "paused": true, "misfire_grace_s": 30
    }))
    .unwrap();
    s.validate(&Default::default()).unwrap();
    assert_valid("schedule.schema.json", &serde_json::to_value(&s).unwrap());
    assert_valid(
        "schedule.schema.json",
        &json!({"cron": "0 3 * * *", "task": {"kind": "k"}}),
    );
    assert_invalid(
        "schedule.schema.json",
        &json!({"cron": "0 3 * * *", "task": {"kind": "k"}, "bogus": 1}),
    );
    assert_invalid(
        "schedule.schema.json",
        &json!({"cron": "0 3 * * *", "task": {"kind": "k", "bogus": 1}}),
    );
    assert_invalid("schedule.schema.json", &json!({"task": {"kind": "k"}}));
    assert_invalid("schedule.schema.json", &json!({"cron": "0 3 * * *"}));
}

#[test]
fn every_event_validates_against_its_schema() {
    let at = Utc::now();
    let (t, p) = ("t1".to_string(), "default".to_string());
    let events = vec![
        Event::Admitted(Admitted {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            kind: "k".into(),
            priority: Priority::Low,
        }),
        Event::Rejected(Rejected {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            reason: RejectReason::UnknownField,
            message: "m".into(),
            submit_seq: Some(3),
        }),
        Event::Queued(Queued {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 1,
            priority: Priority::High,
        }),
        Event::Started(Started {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 1,
            agent_id: "a".into(),
        }),
        Event::Progress(Progress {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 1,
            agent_id: "a".into(),
            data: json!({"pct": 5}),
        }),
        Event::Succeeded(Succeeded {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 1,
            agent_id: "a".into(),
            result: json!(1),
            duration_ms: 4,
            reputation: Some("1.2".into()),
        }),
        Event::Failed(Failed {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 2,
            agent_id: "a".into(),
            error: "e".into(),
            retryable: true,
            duration_ms: 1,
        }),
        Event::TimedOut(TimedOut {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 1,
            agent_id: None,
        }),
        Event::RetryScheduled(RetryScheduled {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempt: 2,
            not_before: at,
        }),
        Event::Dead(Dead {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            attempts: 3,
            last_error: "e".into(),
        }),
        Event::Cancelled(Cancelled {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            reason: None,
        }),
        Event::Expired(Expired {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            deadline: at,
        }),
        Event::Held(Held {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            payer: "alice".into(),
            amount: "1.00".into(),
            currency: "USD".into(),
        }),
        Event::Settled(Settled {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            outcome: "posted".into(),
            currency: "USD".into(),
            agent_amount: "0.9".into(),
            platform_amount: "0.1".into(),
            refund_amount: "0".into(),
            agent_id: Some("a".into()),
        }),
        Event::Closed(Closed {
            task_id: t.clone(),
            pool: p.clone(),
            at,
            status: ClosedStatus::Succeeded,
            attempt: 1,
            agent_id: Some("a".into()),
            reputation: Some("0.9".into()),
        }),
    ];
    assert_eq!(events.len(), EventKind::ALL.len());
    for e in &events {
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["event"], e.kind().as_str());
        assert_valid(&format!("events/{}.schema.json", e.kind().as_str()), &v);
        assert_valid("event.schema.json", &v);
        let back: Event = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(&back, e);
        // A body with another event's tag is refused by the per-event schema.
        let mut wrong = v.clone();
        wrong["event"] = json!(if e.kind() == EventKind::Dead {
            "admitted"
        } else {
            "dead"
        });
        assert_invalid(&format!("events/{}.schema.json", e.kind().as_str()), &wrong);
    }
}

/// The package's directory, read when the test runs (cargo and nextest set it): a compile-time
/// `env!` would keep pointing at wherever the shared target directory was last built from.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("run the tests through cargo or cargo-nextest, which set CARGO_MANIFEST_DIR")
        .into()
}
