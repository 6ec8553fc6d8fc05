//! Events on `taskbus.events.<pool>.<task_id>.<event>`.
//!
//! Every event body is a JSON object with an `event` tag equal to the subject's last token, the
//! `task_id`, the `pool` and an `at` timestamp. Consumers must ignore fields they do not know.
//! Which events are durable (JetStream) and which are core NATS only is listed in
//! [`EventKind::is_durable`] and in docs/PROTOCOL.md.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::Priority;
use crate::validate::RejectReason;

/// The last token of an event subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Admitted,
    Rejected,
    Queued,
    Started,
    Progress,
    Succeeded,
    Failed,
    TimedOut,
    RetryScheduled,
    Dead,
    Cancelled,
    Expired,
    Held,
    Settled,
    Closed,
}

impl EventKind {
    pub const ALL: [EventKind; 15] = [
        EventKind::Admitted,
        EventKind::Rejected,
        EventKind::Queued,
        EventKind::Started,
        EventKind::Progress,
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::TimedOut,
        EventKind::RetryScheduled,
        EventKind::Dead,
        EventKind::Cancelled,
        EventKind::Expired,
        EventKind::Held,
        EventKind::Settled,
        EventKind::Closed,
    ];

    /// The outcomes of an attempt, which the coordinator records (its outcome consumer's filter).
    pub const OUTCOMES: [EventKind; 4] = [
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::TimedOut,
        EventKind::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Admitted => "admitted",
            EventKind::Rejected => "rejected",
            EventKind::Queued => "queued",
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::TimedOut => "timed_out",
            EventKind::RetryScheduled => "retry_scheduled",
            EventKind::Dead => "dead",
            EventKind::Cancelled => "cancelled",
            EventKind::Expired => "expired",
            EventKind::Held => "held",
            EventKind::Settled => "settled",
            EventKind::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Durable events go through JetStream (`TASKBUS_EVENTS`); the others are informational and
    /// published on core NATS only (same subject, not stored), to keep the per-task write budget.
    pub fn is_durable(self) -> bool {
        !matches!(
            self,
            EventKind::Admitted | EventKind::Queued | EventKind::Started | EventKind::Progress
        )
    }

    /// Terminal task states (no further transition except an explicit replay of a dead task).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Rejected
                | EventKind::Succeeded
                | EventKind::Dead
                | EventKind::Cancelled
                | EventKind::Expired
        )
    }
}

/// `rejected`: the submit message was refused at admission (terminal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rejected {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    /// Machine-readable reason code.
    pub reason: RejectReason,
    /// One sentence for humans saying what is wrong and what to do.
    pub message: String,
    /// Stream sequence of the refused message on the submit stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_seq: Option<u64>,
}

/// `admitted`: the task was validated and recorded (core NATS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Admitted {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub priority: Priority,
}

/// `queued`: an attempt was put on the work stream (core NATS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Queued {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempt: u32,
    pub priority: Priority,
}

/// `started`: an agent began an attempt (core NATS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Started {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempt: u32,
    pub agent_id: String,
}

/// `progress`: optional handler progress (core NATS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Progress {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempt: u32,
    pub agent_id: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `succeeded`: the attempt finished well (terminal, durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Succeeded {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempt: u32,
    pub agent_id: String,
    #[serde(default)]
    pub result: serde_json::Value,
    /// Handler wall time.
    pub duration_ms: u64,
    /// Reputation multiplier of the agent, snapshotted by the coordinator (decimal string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<String>,
}

/// `failed`: the attempt failed; the coordinator retries or declares the task dead (durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Failed {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempt: u32,
    pub agent_id: String,
    pub error: String,
    /// `false` when retrying cannot help (the task goes straight to `dead`).
    #[serde(default = "yes")]
    pub retryable: bool,
    pub duration_ms: u64,
}

fn yes() -> bool {
    true
}

/// `timed_out`: the attempt overran its `timeout_ms` (durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TimedOut {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// `retry_scheduled`: another attempt will be queued at `not_before` (durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetryScheduled {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    /// The attempt that will run next.
    pub attempt: u32,
    pub not_before: DateTime<Utc>,
}

/// `dead`: attempts are exhausted (terminal, durable; `taskbus dlq replay` re-admits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Dead {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub attempts: u32,
    pub last_error: String,
}

/// `cancelled` (terminal, durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cancelled {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `expired`: the deadline passed before the task started (terminal, durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Expired {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
}

/// `held`: the ledger put the task's price on hold, payer → escrow (durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Held {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    pub payer: String,
    /// Decimal string.
    pub amount: String,
    pub currency: String,
}

/// `settled`: the ledger resolved the hold (durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Settled {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    /// `posted` (paid) or `voided` (released).
    pub outcome: String,
    pub currency: String,
    /// Decimal strings.
    pub agent_amount: String,
    pub platform_amount: String,
    pub refund_amount: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// The terminal state a [`Closed`] event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClosedStatus {
    Succeeded,
    Dead,
    Cancelled,
    Expired,
}

impl ClosedStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedStatus::Succeeded => "succeeded",
            ClosedStatus::Dead => "dead",
            ClosedStatus::Cancelled => "cancelled",
            ClosedStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<ClosedStatus> {
        [
            ClosedStatus::Succeeded,
            ClosedStatus::Dead,
            ClosedStatus::Cancelled,
            ClosedStatus::Expired,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// `closed`: the coordinator recorded the final state of a **priced** task (durable; published
/// only for tasks with a `price`, once the coordinator's record is written). It is the only
/// outcome the ledger settles on: agents' `succeeded`/`expired` are claims the coordinator may
/// refuse (a late success of a timed-out attempt, a success that lost to a cancellation), so
/// paying on them could disagree with the task's recorded state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Closed {
    pub task_id: String,
    pub pool: String,
    pub at: DateTime<Utc>,
    /// The recorded terminal state.
    pub status: ClosedStatus,
    /// The attempt the state belongs to.
    pub attempt: u32,
    /// The agent whose success was recorded (`succeeded` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The reputation multiplier from the recorded `succeeded` event (decimal string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<String>,
}

/// Any event, tagged by `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
#[schemars(title = "taskbus event")]
pub enum Event {
    Admitted(Admitted),
    Rejected(Rejected),
    Queued(Queued),
    Started(Started),
    Progress(Progress),
    Succeeded(Succeeded),
    Failed(Failed),
    TimedOut(TimedOut),
    RetryScheduled(RetryScheduled),
    Dead(Dead),
    Cancelled(Cancelled),
    Expired(Expired),
    Held(Held),
    Settled(Settled),
    Closed(Closed),
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Admitted(_) => EventKind::Admitted,
            Event::Rejected(_) => EventKind::Rejected,
            Event::Queued(_) => EventKind::Queued,
            Event::Started(_) => EventKind::Started,
            Event::Progress(_) => EventKind::Progress,
            Event::Succeeded(_) => EventKind::Succeeded,
            Event::Failed(_) => EventKind::Failed,
            Event::TimedOut(_) => EventKind::TimedOut,
            Event::RetryScheduled(_) => EventKind::RetryScheduled,
            Event::Dead(_) => EventKind::Dead,
            Event::Cancelled(_) => EventKind::Cancelled,
            Event::Expired(_) => EventKind::Expired,
            Event::Held(_) => EventKind::Held,
            Event::Settled(_) => EventKind::Settled,
            Event::Closed(_) => EventKind::Closed,
        }
    }

    /// `(pool, task_id)` of the event.
    pub fn task(&self) -> (&str, &str) {
        macro_rules! pt {
            ($e:expr) => {
                (&$e.pool, &$e.task_id)
            };
        }
        let (p, t): (&String, &String) = match self {
            Event::Admitted(e) => pt!(e),
            Event::Rejected(e) => pt!(e),
            Event::Queued(e) => pt!(e),
            Event::Started(e) => pt!(e),
            Event::Progress(e) => pt!(e),
            Event::Succeeded(e) => pt!(e),
            Event::Failed(e) => pt!(e),
            Event::TimedOut(e) => pt!(e),
            Event::RetryScheduled(e) => pt!(e),
            Event::Dead(e) => pt!(e),
            Event::Cancelled(e) => pt!(e),
            Event::Expired(e) => pt!(e),
            Event::Held(e) => pt!(e),
            Event::Settled(e) => pt!(e),
            Event::Closed(e) => pt!(e),
        };
        (p, t)
    }

    /// JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialize")
    }
}
