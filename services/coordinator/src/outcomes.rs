//! Outcome recording: `succeeded`/`failed` from the events stream (durable), `started` from
//! core NATS (best effort). Writes are batched and guarded by attempt and status, so a late or
//! repeated outcome changes nothing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::AckKind;
use chrono::Utc;
use futures::StreamExt;
use taskbus_proto::envelope::work_item_json;
use taskbus_proto::events::{self, Event, EventKind};
use taskbus_proto::{streams, Priority};
use taskbus_runtime::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::OutcomeLabel;
use crate::store::{self, Failure, Success};
use crate::{CoordinatorError, Ctx};

pub(crate) async fn consumer(ctx: &Ctx) -> Result<PullConsumer, CoordinatorError> {
    let stream = ctx
        .js
        .get_stream(ctx.subjects.events_stream())
        .await
        .map_err(CoordinatorError::js)?;
    stream
        .get_or_create_consumer(
            "coordinator-outcomes",
            streams::outcome_consumer(&ctx.subjects),
        )
        .await
        .map_err(CoordinatorError::js)
}

pub(crate) async fn run(ctx: Arc<Ctx>, consumer: PullConsumer, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let messages = match consumer
            .stream()
            .max_messages_per_batch(ctx.batch_size)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull outcome events; retrying");
                ctx.metrics.error("outcome_pull");
                crate::pause(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut chunks = messages.ready_chunks(ctx.batch_size);
        loop {
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = chunks.next() => c,
            };
            let Some(chunk) = chunk else { break };
            let batch: Vec<_> = chunk.into_iter().filter_map(Result::ok).collect();
            if batch.is_empty() {
                continue;
            }
            if let Err(e) = handle_batch(&ctx, &batch).await {
                warn!(error = %e, "outcome batch failed; redelivering");
                ctx.metrics.error("outcomes");
                for m in &batch {
                    let _ = m
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                }
                crate::pause(&shutdown, Duration::from_millis(500)).await;
            }
        }
    }
}

async fn handle_batch(
    ctx: &Ctx,
    batch: &[async_nats::jetstream::Message],
) -> Result<(), sqlx::Error> {
    let mut successes = Vec::new();
    let mut failures = Vec::new();
    for m in batch {
        match serde_json::from_slice::<Event>(&m.payload) {
            Ok(Event::Succeeded(e)) => successes.push(Success {
                id: e.task_id,
                attempt: e.attempt as i32,
                agent: e.agent_id,
                result: serde_json::to_string(&e.result).unwrap_or_else(|_| "null".into()),
                at: e.at,
            }),
            Ok(Event::Failed(e)) => failures.push(Failure {
                id: e.task_id,
                attempt: e.attempt as i32,
                agent: e.agent_id,
                error: e.error,
                retryable: e.retryable,
                at: e.at,
            }),
            Ok(other) => debug!(event = other.kind().as_str(), "ignoring event"),
            Err(e) => {
                // A foreign publisher sent garbage: it cannot be recorded, so drop it loudly.
                warn!(subject = %m.subject, error = %e, "unreadable outcome event dropped");
                ctx.metrics.error("bad_outcome");
            }
        }
    }
    let done = store::record_succeeded(&ctx.db, &successes).await?;
    let failed = store::record_failed(&ctx.db, &failures).await?;
    let count = |o: &str, n: usize| {
        ctx.metrics
            .outcomes
            .get_or_create(&OutcomeLabel { outcome: o.into() })
            .inc_by(n as u64)
    };
    count("succeeded", done.len());

    let now = Utc::now();
    let mut pending = Vec::new();
    for f in failed {
        if f.status == "queued" {
            count("retried", 1);
            let env = f.envelope.as_deref().unwrap_or("{}");
            let priority = serde_json::from_str::<taskbus_proto::TaskEnvelope>(env)
                .ok()
                .and_then(|e| e.priority)
                .unwrap_or(Priority::Normal);
            let body = work_item_json(f.attempt as u32, &f.pool, env);
            let p = Publish::build()
                .payload(body.into())
                .message_id(format!("{}:{}", f.id, f.attempt));
            if let Ok(fut) = ctx
                .js
                .send_publish(ctx.subjects.work(&f.pool, priority), p)
                .await
            {
                pending.push(fut);
            }
            let ev = Event::RetryScheduled(events::RetryScheduled {
                task_id: f.id.clone(),
                pool: f.pool.clone(),
                at: now,
                attempt: f.attempt as u32,
                not_before: now,
            });
            publish_event(ctx, &f.pool, &f.id, &ev, &mut pending).await;
        } else {
            count("dead", 1);
            let ev = Event::Dead(events::Dead {
                task_id: f.id.clone(),
                pool: f.pool.clone(),
                at: now,
                attempts: f.attempt as u32,
                last_error: f.error.clone(),
            });
            publish_event(ctx, &f.pool, &f.id, &ev, &mut pending).await;
        }
    }
    for r in futures::future::join_all(pending.into_iter().map(|f| async move { f.await })).await {
        if let Err(e) = r {
            warn!(error = %e, "follow-up publish not acknowledged");
        }
    }
    futures::future::join_all(batch.iter().map(|m| m.ack())).await;
    Ok(())
}

async fn publish_event(
    ctx: &Ctx,
    pool: &str,
    id: &str,
    ev: &Event,
    pending: &mut Vec<async_nats::jetstream::context::PublishAckFuture>,
) {
    let kind = ev.kind();
    let p = Publish::build()
        .payload(ev.to_json().into())
        .message_id(event_msg_id(id, ev));
    match ctx
        .js
        .send_publish(ctx.subjects.event(pool, id, kind), p)
        .await
    {
        Ok(f) => pending.push(f),
        Err(e) => warn!(error = %e, "event publish failed"),
    }
}

/// Deterministic message ids, so a replayed follow-up is dropped by JetStream's dedupe.
fn event_msg_id(id: &str, ev: &Event) -> String {
    match ev {
        Event::RetryScheduled(r) => format!("{id}:retry:{}", r.attempt),
        other => format!("{id}:{}", other.kind().as_str()),
    }
}

pub(crate) async fn started_subscription(
    ctx: &Ctx,
) -> Result<async_nats::Subscriber, CoordinatorError> {
    ctx.client
        .queue_subscribe(
            ctx.subjects.event_kind_all(EventKind::Started),
            "taskbus-coordinator".into(),
        )
        .await
        .map_err(CoordinatorError::js)
}

pub(crate) async fn run_started(
    ctx: Arc<Ctx>,
    sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    let mut chunks = sub.ready_chunks(ctx.batch_size);
    loop {
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = chunks.next() => c,
        };
        let Some(chunk) = chunk else { return };
        let rows: Vec<_> = chunk
            .iter()
            .filter_map(|m| match serde_json::from_slice::<Event>(&m.payload) {
                Ok(Event::Started(s)) => Some((s.task_id, s.attempt as i32, s.agent_id, s.at)),
                _ => None,
            })
            .collect();
        if let Err(e) = store::record_started(&ctx.db, &rows).await {
            // Informational only: the outcome still lands.
            debug!(error = %e, "could not record started");
        }
    }
}
