//! The taskbus wire contract.
//!
//! Everything two taskbus processes (or a taskbus process and a foreign NATS client) must agree
//! on lives here: the task envelope a producer publishes, the validation rules applied to it,
//! the events every service emits, subject names, stream and consumer specs, pool settings and
//! schedules kept in JetStream KV buckets, and the request/reply API bodies. The JSON Schemas under
//! `proto/schema/` are generated from these types (`cargo run -p taskbus-proto --example
//! gen-schemas`) and a test fails when they drift.

pub mod api;
pub mod envelope;
pub mod events;
pub mod ids;
pub mod pool;
pub mod schedule;
pub mod schema;
pub mod streams;
pub mod subjects;
pub mod trace;
pub mod validate;

pub use envelope::{Priority, Resources, TaskEnvelope, WorkItem};
pub use events::{Event, EventKind};
pub use pool::PoolSettings;
pub use schedule::{CompiledSchedule, Schedule, ScheduleError};
pub use subjects::Subjects;
pub use validate::{Limits, RejectReason, Rejection, ValidTask};

/// Header carrying the attempt number on work messages (also in the body).
pub const HDR_ATTEMPT: &str = "Taskbus-Attempt";
/// W3C trace context header, forwarded from submit to every attempt's work message and from
/// there to the attempt's events ([`trace`]).
pub const HDR_TRACEPARENT: &str = trace::HEADER;
