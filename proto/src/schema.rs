//! JSON Schemas of the wire types, generated from the Rust types. The files under
//! `proto/schema/` are these values pretty-printed; `tests/schemas.rs` fails when they differ,
//! and `cargo run -p taskbus-proto --example gen-schemas` rewrites them.

use schemars::{schema_for, JsonSchema};
use serde_json::{json, Value};

use crate::events::{self, EventKind};

fn of<T: JsonSchema>() -> Value {
    serde_json::to_value(schema_for!(T)).expect("schemas serialize")
}

/// Schema of one event body: the struct's schema plus the `event` tag.
fn event<T: JsonSchema>(kind: EventKind) -> Value {
    let mut v = of::<T>();
    v["title"] = json!(format!("taskbus event: {}", kind.as_str()));
    v["properties"]["event"] = json!({ "const": kind.as_str() });
    if let Some(req) = v["required"].as_array_mut() {
        req.insert(0, json!("event"));
    }
    v
}

/// `(file name under proto/schema/, schema)` for every wire type.
pub fn all() -> Vec<(String, Value)> {
    use EventKind::*;
    let mut out = vec![
        (
            "envelope.schema.json".to_string(),
            of::<crate::TaskEnvelope>(),
        ),
        ("work-item.schema.json".to_string(), of::<crate::WorkItem>()),
        ("event.schema.json".to_string(), of::<events::Event>()),
        (
            "pool-settings.schema.json".to_string(),
            of::<crate::PoolSettings>(),
        ),
        ("schedule.schema.json".to_string(), of::<crate::Schedule>()),
    ];
    let per_event = [
        (Admitted, event::<events::Admitted>(Admitted)),
        (Rejected, event::<events::Rejected>(Rejected)),
        (Queued, event::<events::Queued>(Queued)),
        (Started, event::<events::Started>(Started)),
        (Progress, event::<events::Progress>(Progress)),
        (Succeeded, event::<events::Succeeded>(Succeeded)),
        (Failed, event::<events::Failed>(Failed)),
        (TimedOut, event::<events::TimedOut>(TimedOut)),
        (
            RetryScheduled,
            event::<events::RetryScheduled>(RetryScheduled),
        ),
        (Dead, event::<events::Dead>(Dead)),
        (Cancelled, event::<events::Cancelled>(Cancelled)),
        (Expired, event::<events::Expired>(Expired)),
        (Held, event::<events::Held>(Held)),
        (Settled, event::<events::Settled>(Settled)),
        (Closed, event::<events::Closed>(Closed)),
    ];
    for (k, s) in per_event {
        out.push((format!("events/{}.schema.json", k.as_str()), s));
    }
    out
}

/// Pretty JSON with a trailing newline, as committed.
pub fn render(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("schemas serialize");
    s.push('\n');
    s
}
