//! Stream and consumer specifications. Every service that needs a stream creates or updates it
//! with these specs on start, so the first service up sets the streams up.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};

use crate::envelope::Priority;
use crate::events::EventKind;
use crate::subjects::Subjects;

/// Knobs for the streams; defaults suit a single node. Replicas > 1 needs a JetStream cluster.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub replicas: usize,
    pub events_max_age: Duration,
    pub duplicate_window: Duration,
    pub max_message_bytes: i32,
    pub storage: stream::StorageType,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            max_message_bytes: 1024 * 1024,
            storage: stream::StorageType::File,
        }
    }
}

/// `TASKBUS_SUBMIT`: work queue of raw producer messages.
pub fn submit_stream(s: &Subjects, o: &StreamOptions) -> stream::Config {
    stream::Config {
        name: s.submit_stream(),
        description: Some("taskbus: tasks as published by producers".into()),
        subjects: vec![s.submit_all()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: o.storage,
        num_replicas: o.replicas,
        duplicate_window: o.duplicate_window,
        max_message_size: o.max_message_bytes,
        ..Default::default()
    }
}

/// `TASKBUS_WORK`: admitted attempts, one durable consumer per pool. Delayed attempts
/// (`not_before`, retry backoff) wait on `taskbus.sched.>` as JetStream message schedules
/// (nats-server 2.12+) and are moved to their work subject by the server when due.
pub fn work_stream(s: &Subjects, o: &StreamOptions) -> stream::Config {
    stream::Config {
        name: s.work_stream(),
        description: Some("taskbus: admitted task attempts for agents".into()),
        subjects: vec![s.work_all(), s.sched_all()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: o.storage,
        num_replicas: o.replicas,
        duplicate_window: o.duplicate_window,
        max_message_size: o.max_message_bytes,
        allow_message_schedules: true,
        ..Default::default()
    }
}

/// `TASKBUS_EVENTS`: durable task events, kept for `events_max_age`.
///
/// The stream lists one subject per durable event kind rather than `taskbus.events.>`: a stream
/// stores every message published on its subjects, core NATS publishes included, so a catch-all
/// would store each informational event (`admitted`, `queued`, `started`, `progress`) too — one
/// more file-store write per task for an event nothing recovers from.
pub fn events_stream(s: &Subjects, o: &StreamOptions) -> stream::Config {
    stream::Config {
        name: s.events_stream(),
        description: Some("taskbus: durable task events".into()),
        subjects: EventKind::ALL
            .into_iter()
            .filter(|k| k.is_durable())
            .map(|k| s.event_kind_all(k))
            .collect(),
        retention: stream::RetentionPolicy::Limits,
        storage: o.storage,
        num_replicas: o.replicas,
        max_age: o.events_max_age,
        duplicate_window: o.duplicate_window,
        max_message_size: o.max_message_bytes,
        ..Default::default()
    }
}

/// The coordinator's durable consumer on the submit stream (shared by every replica).
pub fn submit_consumer() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some("coordinator".into()),
        description: Some("taskbus coordinator admission".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(10),
        max_ack_pending: 20_000,
        max_batch: 1000,
        ..Default::default()
    }
}

/// The coordinator's durable consumer of outcome events.
pub fn outcome_consumer(s: &Subjects) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some("coordinator-outcomes".into()),
        description: Some("taskbus coordinator outcome recording".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        max_batch: 1000,
        filter_subjects: EventKind::OUTCOMES
            .into_iter()
            .map(|k| s.event_kind_all(k))
            .collect(),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// The durable consumer the agents of `pool` share for one priority band. Agents pull the
/// bands in priority order (see docs/PROTOCOL.md, "Priorities").
pub fn work_consumer(
    s: &Subjects,
    pool: &str,
    priority: Priority,
    ack_wait: Duration,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(s.work_consumer(pool, priority)),
        description: Some(format!(
            "taskbus agents of pool {pool}, {} priority",
            priority.as_str()
        )),
        filter_subject: s.work(pool, priority),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: 100_000,
        max_batch: 1000,
        ..Default::default()
    }
}
