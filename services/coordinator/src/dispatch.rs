//! Sending attempts to agents: a work message now, or a JetStream message schedule when the
//! attempt may not start yet (`not_before`, retry backoff).
//!
//! Delays use the server's message schedules (nats-server 2.12+, stream flag
//! `allow_msg_schedules`): the coordinator publishes the work item to
//! `taskbus.sched.<pool>.<id>.<attempt>` with `Nats-Schedule: @at <time>` and
//! `Nats-Schedule-Target: taskbus.work.<pool>.<priority>`; the server moves it to the work subject
//! when due, so a delayed attempt survives coordinator restarts and needs no timer of ours.
//! Schedules have one-second resolution: the time is rounded up to the next whole second, so an
//! attempt never starts early and may start up to a second late.

use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage;
use chrono::{DateTime, SubsecRound, Utc};
use taskbus_proto::envelope::work_item_json;
use taskbus_proto::Priority;
use tracing::warn;

use crate::store::{self, PendingDispatch};
use crate::Ctx;

/// One attempt to hand out.
#[derive(Debug, Clone)]
pub(crate) struct Dispatch {
    pub id: String,
    pub pool: String,
    pub priority: Priority,
    pub attempt: u32,
    pub envelope: String,
    pub not_before: Option<DateTime<Utc>>,
    /// The task's `traceparent`, put on the work message.
    pub traceparent: Option<String>,
    /// Appended to the work message's id: a message re-sent because the work stream lost the
    /// first one must not be dropped as its duplicate (see `crate::lost`).
    pub resend: Option<String>,
}

impl From<PendingDispatch> for Dispatch {
    fn from(p: PendingDispatch) -> Self {
        Dispatch {
            priority: p
                .priority
                .as_deref()
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            id: p.id,
            pool: p.pool,
            attempt: p.attempt.max(1) as u32,
            envelope: p.envelope.unwrap_or_else(|| "{}".into()),
            not_before: p.not_before,
            traceparent: p.traceparent,
            resend: None,
        }
    }
}

/// Publish the attempt's work (or schedule) message; the returned future resolves on
/// JetStream's ack. Message ids make a repeated send a no-op within the duplicate window.
pub(crate) async fn send(ctx: &Ctx, d: &Dispatch) -> Result<PublishAckFuture, PublishError> {
    let body = work_item_json(d.attempt, &d.pool, &d.envelope);
    let target = ctx.subjects.work(&d.pool, d.priority);
    let mut p = PublishMessage::build().payload(body.into());
    if let Some(tp) = &d.traceparent {
        p = p.header(taskbus_proto::HDR_TRACEPARENT, tp.as_str());
    }
    match d.not_before {
        Some(nb) if nb > Utc::now() + chrono::Duration::milliseconds(20) => {
            // Round up to the next whole second: never start early.
            let at = if nb.nanosecond() > 0 {
                nb.trunc_subsecs(0) + chrono::Duration::seconds(1)
            } else {
                nb
            };
            let p = p
                .header(
                    "Nats-Schedule",
                    format!("@at {}", at.format("%Y-%m-%dT%H:%M:%SZ")),
                )
                .header("Nats-Schedule-Target", target)
                .message_id(format!("{}:{}:sched", d.id, d.attempt));
            ctx.js
                .send_publish(ctx.subjects.sched(&d.pool, &d.id, d.attempt), p)
                .await
        }
        _ => {
            let id = match &d.resend {
                Some(r) => format!("{}:{}:{r}", d.id, d.attempt),
                None => format!("{}:{}", d.id, d.attempt),
            };
            let p = p.message_id(id);
            ctx.js.send_publish(target, p).await
        }
    }
}

use chrono::Timelike;

/// Send attempts queued through the outbox (retries, replays, reconciliation) and clear their
/// outbox mark once JetStream has them. Returns how many were confirmed.
pub(crate) async fn dispatch_all(ctx: &Ctx, items: Vec<Dispatch>) -> usize {
    // In chunks: the JetStream context allows a bounded number of unacknowledged publishes.
    let mut n = 0;
    for chunk in items.chunks(CHUNK) {
        n += dispatch_chunk(ctx, chunk).await;
    }
    n
}

/// Publishes in flight at once per call (async-nats allows 5,000 per context in all).
const CHUNK: usize = 500;

async fn dispatch_chunk(ctx: &Ctx, items: &[Dispatch]) -> usize {
    let mut pending = Vec::with_capacity(items.len());
    for d in items {
        match send(ctx, d).await {
            Ok(f) => pending.push((d, f)),
            Err(e) => {
                warn!(task_id = %d.id, error = %e, "dispatch failed; the reconciler will retry")
            }
        }
    }
    let acked = futures::future::join_all(pending.into_iter().map(|(d, f)| async move {
        match tokio::time::timeout(Duration::from_secs(10), f).await {
            Ok(Ok(_)) => Some((d.id.clone(), d.attempt as i32, d.not_before)),
            _ => None,
        }
    }))
    .await;
    let done: Vec<_> = acked.into_iter().flatten().collect();
    let n = done.len();
    if let Err(e) = store::mark_dispatched(&ctx.db, &done).await {
        warn!(error = %e, "cannot clear dispatch marks; the reconciler will re-send (deduplicated)");
    }
    n
}
