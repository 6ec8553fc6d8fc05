//! Settlement: a durable consumer of the events that move money.
//!
//! - `held` (only with `replay_held`): re-applies the hold (a no-op when it exists; a fresh
//!   ledger replaying the stream rebuilds its holds from these);
//! - `succeeded`: posts the hold (payout to the agent and the platform, the rest back to the
//!   payer);
//! - `dead`, `cancelled`, `expired`: voids the hold;
//! - `rejected`: voids a hold made at or before the rejection.
//!
//! A batch of events is one transaction. `settled` events are published after the commit and
//! acknowledged by JetStream before the batch is acknowledged; a redelivered event whose hold it
//! already resolved publishes its `settled` again (deduplicated by `Nats-Msg-Id`). Events that
//! are malformed, or whose subject and body disagree, are logged, counted and acknowledged
//! without changing anything.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use taskbus_proto::events::{self, ClosedStatus, Event, EventKind};
use taskbus_proto::ids::is_valid_agent_id;
use taskbus_proto::Subjects;
use taskbus_runtime::{CancellationToken, TaskTracker};
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::money::parse_multiplier;
use crate::store::{
    HoldInput, HoldOutcome, Resolution, SettledRecord, StoreError, TaskResolution, RESERVED_NAMES,
};
use crate::{Ctx, LedgerError};

/// The event kinds settlement reads. Outcomes come only from the coordinator's `closed`
/// events (its record of a priced task's final state), never from agents' `succeeded`: an
/// agent's success may lose to a cancellation or belong to an attempt already timed out.
pub const SETTLEMENT_EVENTS: [EventKind; 3] =
    [EventKind::Held, EventKind::Closed, EventKind::Rejected];

/// Kinds the ledger settled on before `closed` existed: a durable consumer created then has
/// them in its filter and is brought up to date on start.
const RETIRED_EVENTS: [EventKind; 4] = [
    EventKind::Succeeded,
    EventKind::Dead,
    EventKind::Cancelled,
    EventKind::Expired,
];

/// The durable consumer spec (shared by every replica). Without `replay_held` the consumer
/// leaves out `held` events: a live ledger made those holds itself (before publishing the
/// event), so reading them back would only cost a delivery, an ack and a lookup per task.
pub fn consumer_config(
    subjects: &Subjects,
    name: &str,
    ack_wait: Duration,
    replay_held: bool,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        description: Some("taskbus ledger settlement".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: 50_000,
        filter_subjects: SETTLEMENT_EVENTS
            .iter()
            .filter(|k| replay_held || **k != EventKind::Held)
            .map(|k| subjects.event_kind_all(*k))
            .collect(),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

pub(crate) async fn consumer(
    ctx: &Ctx,
    name: &str,
    ack_wait: Duration,
) -> Result<PullConsumer, LedgerError> {
    let config = consumer_config(&ctx.subjects, name, ack_wait, ctx.replay_held);
    let stream = ctx
        .js
        .get_stream(ctx.subjects.events_stream())
        .await
        .map_err(LedgerError::js)?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(name, config.clone())
        .await
        .map_err(LedgerError::js)?;
    // A consumer from before `closed` events: same settings, today's filter (keeping `held`
    // if it had it). Its unread outcome events of the old kinds are no longer delivered.
    let filter = &consumer.cached_info().config.filter_subjects;
    let retired: Vec<String> = RETIRED_EVENTS
        .iter()
        .map(|k| ctx.subjects.event_kind_all(*k))
        .collect();
    if filter.iter().any(|f| retired.contains(f)) {
        let held = ctx.subjects.event_kind_all(EventKind::Held);
        let keep_held = filter.contains(&held);
        let existing_wait = consumer.cached_info().config.ack_wait;
        let mut updated = consumer_config(&ctx.subjects, name, existing_wait, keep_held);
        updated.description = consumer.cached_info().config.description.clone();
        tracing::info!(
            consumer = name,
            "settling on `closed` events from now on (consumer filter updated)"
        );
        return stream
            .create_consumer(updated)
            .await
            .map_err(LedgerError::js);
    }
    Ok(consumer)
}

/// One event, read.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Hold(HoldInput),
    Resolve(TaskResolution),
    /// An event settlement does not use.
    Ignore,
    /// Unusable: the reason.
    Bad(String),
}

/// Read one event message. Never panics; checks that subject and body agree.
pub fn parse(subjects: &Subjects, subject: &str, payload: &[u8], seq: u64) -> Parsed {
    let Some((pool, task_id, kind)) = subjects.parse_event(subject) else {
        return Parsed::Bad(format!("subject {subject:?} is not an event subject"));
    };
    let event: Event = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => return Parsed::Bad(format!("body is not a taskbus event: {e}")),
    };
    if event.kind().as_str() != kind {
        return Parsed::Bad(format!(
            "body is a {} event but the subject says {kind}",
            event.kind().as_str()
        ));
    }
    if event.task() != (pool, task_id) {
        let (p, t) = event.task();
        return Parsed::Bad(format!(
            "body names task {t:?} in pool {p:?} but the subject names task {task_id:?} in pool {pool:?}"
        ));
    }
    let resolve = |resolution| {
        Parsed::Resolve(TaskResolution {
            task_id: task_id.to_string(),
            seq,
            resolution,
        })
    };
    match event {
        Event::Held(h) => Parsed::Hold(HoldInput {
            task_id: h.task_id,
            pool: h.pool,
            payer: h.payer,
            amount: h.amount,
            currency: Some(h.currency),
            at: Some(h.at),
        }),
        Event::Closed(c) if c.status == ClosedStatus::Succeeded => {
            let Some(agent_id) = c.agent_id else {
                return Parsed::Bad("a closed event of a success names no agent_id".into());
            };
            if !is_valid_agent_id(&agent_id) || RESERVED_NAMES.contains(&agent_id.as_str()) {
                return Parsed::Bad(format!(
                    "agent_id {:?} cannot name an account",
                    crate::money::truncate(&agent_id, 40)
                ));
            }
            match parse_multiplier(c.reputation.as_deref()) {
                Ok(multiplier) => resolve(Resolution::Succeeded {
                    agent_id,
                    multiplier,
                }),
                Err(e) => Parsed::Bad(e),
            }
        }
        Event::Closed(c) => resolve(Resolution::Void {
            outcome: c.status.as_str().into(),
        }),
        Event::Rejected(r) => resolve(Resolution::Rejected { at: r.at }),
        _ => Parsed::Ignore,
    }
}

/// Errors of one settlement batch (the batch is redelivered).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("settled events not acknowledged by JetStream: {0}")]
    Publish(String),
}

/// Advisory lock key of the settling replica (`ledger` in ASCII).
const SETTLER_LOCK: i64 = 0x6c65_6467_6572;

/// Hold the settler lock on a dedicated connection: one replica settles at a time (the others
/// answer the API and take over when it dies, as PostgreSQL then drops its lock).
async fn become_settler(
    ctx: &Ctx,
    shutdown: &CancellationToken,
) -> Option<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        match ctx.ledger.db().acquire().await {
            Ok(mut conn) => {
                match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                    .bind(SETTLER_LOCK)
                    .fetch_one(&mut *conn)
                    .await
                {
                    Ok(true) => {
                        tracing::info!("this replica settles");
                        return Some(conn);
                    }
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "cannot take the settler lock; retrying"),
                }
            }
            Err(e) => warn!(error = %e, "no database connection for the settler lock; retrying"),
        }
        crate::pause(shutdown, Duration::from_secs(1)).await;
    }
}

/// The settlement loop. Events are applied in stream order: a batch runs only when every
/// unacknowledged event of the consumer is in hand (`num_ack_pending` equals the buffer), so
/// after a crash the events the dead replica held (redelivered after `ack_wait`) are applied
/// before later ones. A late, contradicting outcome for a task therefore never overtakes the
/// first one, and a live ledger settles exactly as a replay of the stream does.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    consumer: PullConsumer,
    ack_wait: Duration,
    shutdown: CancellationToken,
) {
    let Some(_settler) = become_settler(&ctx, &shutdown).await else {
        return;
    };
    let mut buffer: BTreeMap<u64, async_nats::jetstream::Message> = BTreeMap::new();
    let mut waiting_since: Option<Instant> = None;
    // Events of a batch that failed and is being retried in process: the failure may have come
    // after the commit (the `settled` publish), so they are treated as redelivered.
    let mut retried: HashSet<u64> = HashSet::new();
    let mut last_progress = Instant::now();
    let mut idle = Duration::from_millis(5);
    // The publish-and-ack stage of the last settled batch (the tail) runs while the next batch
    // is fetched and settled (one tail at a time). Its events count as in hand for the order
    // check only while it has not begun to acknowledge them (checked after the consumer state
    // was read, so none of them can have been acknowledged when it was). If its publishes
    // fail it hands the events back (nak); they come back as redeliveries, which publish their
    // `settled` again.
    let tails = TaskTracker::new();
    let mut tail: Option<Tail> = None;
    while !shutdown.is_cancelled() {
        if tail.as_ref().is_some_and(|t| t.handle.is_finished()) {
            if let Some(t) = tail.take() {
                let _ = t.handle.await;
            }
        }
        // Always fetch: while we wait for older events, only a fetch brings their redelivery
        // (the consumer's max_ack_pending bounds the buffer).
        {
            match consumer
                .fetch()
                .max_messages(ctx.batch_size)
                .messages()
                .await
            {
                Ok(mut batch) => {
                    while let Some(m) = batch.next().await {
                        match m {
                            Ok(m) => {
                                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                                buffer.insert(seq, m);
                            }
                            Err(e) => {
                                debug!(error = %e, "fetch status");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot pull events; retrying");
                    ctx.metrics.error("pull");
                    crate::pause(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if buffer.is_empty() {
            crate::pause(&shutdown, idle).await;
            idle = (idle * 2).min(Duration::from_millis(200));
            continue;
        }
        idle = Duration::from_millis(5);
        let outstanding = match consumer.get_info().await {
            Ok(info) => info.num_ack_pending,
            Err(e) => {
                warn!(error = %e, "cannot read the consumer state; retrying");
                ctx.metrics.error("consumer_info");
                crate::pause(&shutdown, Duration::from_millis(500)).await;
                continue;
            }
        };
        let in_tail = match &tail {
            None => 0,
            Some(t) if !t.acking.load(Ordering::SeqCst) => t.events,
            Some(_) => {
                // Its acks may or may not be counted yet: let it finish and look again.
                if let Some(t) = tail.take() {
                    let _ = t.handle.await;
                }
                continue;
            }
        };
        if outstanding > buffer.len() + in_tail {
            // Older events are out with a dead replica (or our last acks are still on their
            // way): keep ours alive and wait for the redelivery.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() > ack_wait * 3 {
                warn!(
                    outstanding,
                    held = buffer.len(),
                    "events never came back; releasing ours"
                );
                for m in buffer.values() {
                    let _ = m
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(100))))
                        .await;
                }
                buffer.clear();
                waiting_since = None;
                continue;
            }
            if last_progress.elapsed() > ack_wait / 3 {
                for m in buffer.values() {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
                last_progress = Instant::now();
            }
            ctx.metrics.error("waiting_for_order");
            crate::pause(&shutdown, Duration::from_millis(20)).await;
            continue;
        }
        waiting_since = None;
        let all: Vec<async_nats::jetstream::Message> =
            std::mem::take(&mut buffer).into_values().collect();
        for chunk in all.chunks(ctx.batch_size) {
            ctx.metrics.settle_batch.observe(chunk.len() as f64);
            let result = settle_batch(&ctx, chunk, &retried).await;
            if result.is_ok() && !retried.is_empty() {
                for m in chunk {
                    if let Ok(i) = m.info() {
                        retried.remove(&i.stream_sequence);
                    }
                }
            }
            match result {
                Ok(records) => {
                    if let Some(t) = tail.take() {
                        let _ = t.handle.await;
                    }
                    let acking = Arc::new(AtomicBool::new(false));
                    let (ctx, msgs, flag) = (ctx.clone(), chunk.to_vec(), acking.clone());
                    let events = msgs.len();
                    let handle = tails.spawn(async move {
                        let published = publish_settled(&ctx, &records).await;
                        flag.store(true, Ordering::SeqCst);
                        match published {
                            Ok(()) => {
                                futures::future::join_all(msgs.iter().map(|m| m.ack())).await;
                            }
                            Err(e) => {
                                warn!(error = %e, events = msgs.len(), "settled events not published; the batch is handed back");
                                ctx.metrics.error("settle");
                                for m in &msgs {
                                    let _ = m
                                        .ack_with(AckKind::Nak(Some(Duration::from_millis(100))))
                                        .await;
                                }
                            }
                        }
                    });
                    tail = Some(Tail {
                        handle,
                        events,
                        acking,
                    });
                }
                Err(e) => {
                    warn!(error = %e, events = chunk.len(), "settlement batch failed; it will be redelivered");
                    ctx.metrics.error("settle");
                    crate::pause(&shutdown, Duration::from_millis(500)).await;
                    // Keep the rest in hand (in order) and retry from this chunk on.
                    let first = chunk
                        .first()
                        .and_then(|m| m.info().ok().map(|i| i.stream_sequence));
                    for m in all
                        .iter()
                        .filter(|m| m.info().ok().map(|i| i.stream_sequence) >= first)
                    {
                        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                        retried.insert(seq);
                        buffer.insert(seq, m.clone());
                    }
                    break;
                }
            }
        }
    }
    if let Some(t) = tail.take() {
        let _ = t.handle.await;
    }
    tails.close();
    tails.wait().await;
}

/// The database part of a batch: apply it (one transaction) and return the `settled` records
/// to publish (also those of redelivered events that had resolved a hold before).
async fn settle_batch(
    ctx: &Ctx,
    batch: &[async_nats::jetstream::Message],
    retried: &HashSet<u64>,
) -> Result<Vec<SettledRecord>, BatchError> {
    let mut holds = Vec::new();
    let mut resolutions = Vec::new();
    let mut redelivered = Vec::new();
    for m in batch {
        let (seq, delivered) = m
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 1));
        match parse(&ctx.subjects, m.subject.as_str(), &m.payload, seq) {
            // A consumer created before `replay_held` was off still delivers them: skip.
            Parsed::Hold(h) if ctx.replay_held => holds.push(h),
            Parsed::Hold(_) => {}
            Parsed::Resolve(r) => {
                if delivered > 1 || retried.contains(&seq) {
                    redelivered.push((r.task_id.clone(), r.seq));
                }
                resolutions.push(r);
            }
            Parsed::Ignore => {}
            Parsed::Bad(reason) => {
                warn!(subject = %m.subject, seq, reason = %reason, "event refused; nothing changed");
                Metrics::count(&ctx.metrics.bad_events, "malformed", 1);
            }
        }
    }
    if !holds.is_empty() {
        let result = ctx.ledger.hold_repeats(&holds).await?;
        for (h, o) in holds.iter().zip(&result.outcomes) {
            match o {
                HoldOutcome::New => debug!(task_id = %h.task_id, "hold rebuilt from a held event"),
                HoldOutcome::Pending | HoldOutcome::Resolved(_) => {}
                HoldOutcome::Conflict(m)
                | HoldOutcome::InsufficientFunds(m)
                | HoldOutcome::Invalid(m) => {
                    warn!(task_id = %h.task_id, reason = %m, "held event could not be applied");
                    Metrics::count(&ctx.metrics.bad_events, "held_not_applied", 1);
                }
            }
        }
    }
    let mut records = ctx.ledger.settle(&resolutions).await?;
    for r in &records {
        Metrics::count(&ctx.metrics.settlements, &r.outcome, 1);
        if r.outcome == "posted" {
            ctx.metrics.spend(r);
        }
    }
    if !redelivered.is_empty() {
        let done: HashSet<String> = records.iter().map(|r| r.task_id.clone()).collect();
        for r in ctx.ledger.settled_by(&redelivered).await? {
            if !done.contains(&r.task_id) {
                records.push(r);
            }
        }
    }
    Ok(records)
}

/// A settled batch whose `settled` events are being published, then its events acknowledged.
struct Tail {
    handle: tokio::task::JoinHandle<()>,
    events: usize,
    /// Set once it starts acknowledging (or handing back) its events.
    acking: Arc<AtomicBool>,
}

/// The `settled` event of a resolved hold.
pub fn settled_event(r: &SettledRecord) -> Event {
    Event::Settled(events::Settled {
        task_id: r.task_id.clone(),
        pool: r.pool.clone(),
        at: r.at,
        outcome: r.outcome.clone(),
        currency: r.currency.clone(),
        agent_amount: r.agent_amount.clone(),
        platform_amount: r.platform_amount.clone(),
        refund_amount: r.refund_amount.clone(),
        agent_id: r.agent_id.clone(),
    })
}

async fn publish_settled(ctx: &Ctx, records: &[SettledRecord]) -> Result<(), BatchError> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let p = PublishMessage::build()
            .payload(settled_event(r).to_json().into())
            .message_id(format!("{}:settled", r.task_id));
        let f = ctx
            .js
            .send_publish(
                ctx.subjects.event(&r.pool, &r.task_id, EventKind::Settled),
                p,
            )
            .await
            .map_err(|e| BatchError::Publish(e.to_string()))?;
        pending.push(f);
    }
    for r in futures::future::join_all(pending.into_iter().map(|f| async move { f.await })).await {
        r.map_err(|e| BatchError::Publish(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subj() -> Subjects {
        Subjects::default()
    }

    #[test]
    fn refuses_mismatched_and_malformed_events() {
        let s = subj();
        let ok = br#"{"event":"closed","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","status":"dead","attempt":3}"#;
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", ok, 7),
            Parsed::Resolve(TaskResolution { seq: 7, resolution: Resolution::Void { outcome }, .. }) if outcome == "dead"
        ));
        assert!(
            matches!(parse(&s, "taskbus.events.p.t2.closed", ok, 7), Parsed::Bad(m) if m.contains("t2"))
        );
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.dead", ok, 7),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1", ok, 7),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", b"not json", 7),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", b"{}", 7),
            Parsed::Bad(_)
        ));
        let unknown_status = br#"{"event":"closed","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","status":"paid","attempt":1}"#;
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", unknown_status, 1),
            Parsed::Bad(_)
        ));
        let no_agent = br#"{"event":"closed","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","status":"succeeded","attempt":1}"#;
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", no_agent, 1),
            Parsed::Bad(m) if m.contains("agent_id")
        ));
        let bad_rep = br#"{"event":"closed","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","status":"succeeded","attempt":1,"agent_id":"a","reputation":"-1"}"#;
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", bad_rep, 1),
            Parsed::Bad(_)
        ));
        let reserved = br#"{"event":"closed","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","status":"succeeded","attempt":1,"agent_id":"platform"}"#;
        assert!(matches!(
            parse(&s, "taskbus.events.p.t1.closed", reserved, 1),
            Parsed::Bad(_)
        ));
        let good = br#"{"event":"closed","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","status":"succeeded","attempt":1,"agent_id":"a-1","reputation":"0.5","extra":1}"#;
        match parse(&s, "taskbus.events.p.t1.closed", good, 1) {
            Parsed::Resolve(TaskResolution {
                resolution:
                    Resolution::Succeeded {
                        agent_id,
                        multiplier,
                    },
                ..
            }) => {
                assert_eq!(agent_id, "a-1");
                assert_eq!(multiplier, "0.5".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        // An agent's own `succeeded` is a claim: settlement does not use it.
        let claim = br#"{"event":"succeeded","task_id":"t1","pool":"p","at":"2026-01-01T00:00:00Z","attempt":1,"agent_id":"a-1","duration_ms":1}"#;
        assert_eq!(
            parse(&s, "taskbus.events.p.t1.succeeded", claim, 1),
            Parsed::Ignore
        );
    }
}
