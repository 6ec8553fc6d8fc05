//! Once a second: fold outcomes into reputation, expire queued tasks past their deadline, time
//! out running attempts that overran (when their agent did not report it), promote tasks held
//! by fairness limits, re-send attempts whose work message was never confirmed and terminal events
//! (`dead`, `cancelled`, `expired`) a crash left unannounced, and delete the records whose
//! retention ran out ([`crate::retention`]). Every 30 s: re-send work the work stream lost
//! ([`crate::lost`]). Safe on every replica at once: each step is one
//! guarded UPDATE or DELETE.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use taskbus_proto::events::{self, ClosedStatus, Event};
use taskbus_runtime::CancellationToken;
use tracing::warn;

use crate::dispatch::{self, Dispatch};
use crate::outcomes::{
    announce, closed, confirm_terminal, follow_up_failures, publish_event, with_closed,
};
use crate::store::{self, Failure};
use crate::Ctx;

/// Extra time an attempt gets past its `timeout_ms` before the coordinator declares it timed
/// out (agents enforce the timeout themselves and report at once; this catches silent ones).
const TIMEOUT_SLACK_MS: i64 = 10_000;
/// Age after which an unconfirmed dispatch is re-sent.
const STALE_DISPATCH_MS: i64 = 5_000;
/// Age after which a terminal event still marked due is re-sent.
const DUE_EVENT_MS: i64 = 5_000;

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = crate::lost::SWEEP_EVERY.min(ctx.lost_work_after.max(Duration::from_secs(1)));
    let mut lost = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    lost.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = lost.tick() => {
                if let Err(e) = crate::lost::sweep(&ctx, &shutdown).await {
                    warn!(error = %e, "lost-work sweep failed");
                    ctx.metrics.error("lost_work_sweep");
                }
                continue;
            }
        }
        if let Err(e) = once(&ctx).await {
            warn!(error = %e, "maintenance pass failed");
            ctx.metrics.error("maintenance");
        }
    }
}

pub(crate) async fn once(ctx: &Ctx) -> Result<(), sqlx::Error> {
    crate::registry::flush_reputation(ctx).await;
    let now = Utc::now();
    let mut pending = Vec::new();
    let mut terminal = Vec::new();
    let expired = store::expire_overdue(&ctx.db).await?;
    crate::outcomes::count(ctx, "expired", expired.len());
    for x in expired {
        let ev = Event::Expired(events::Expired {
            task_id: x.id.clone(),
            pool: x.pool.clone(),
            at: now,
            deadline: x.deadline,
        });
        let evs = with_closed(ev, x.priced, x.attempt);
        let tp = x.traceparent.as_deref();
        announce(ctx, &x.pool, &x.id, &evs, tp, &mut terminal).await;
    }
    confirm_terminal(ctx, terminal).await;
    resend_due_events(ctx).await?;

    let overdue = store::overdue_running(&ctx.db, TIMEOUT_SLACK_MS).await?;
    if !overdue.is_empty() {
        let failures: Vec<Failure> = overdue
            .iter()
            .map(|(id, attempt, agent)| Failure {
                id: id.clone(),
                attempt: *attempt,
                agent: agent.clone(),
                error: format!("attempt {attempt} timed out: no outcome within its timeout"),
                retryable: true,
                at: now,
            })
            .collect();
        let recorded = store::record_failed(&ctx.db, &failures).await?;
        for f in &recorded {
            let attempt = if f.status == "queued" {
                f.attempt - 1
            } else {
                f.attempt
            };
            let ev = Event::TimedOut(events::TimedOut {
                task_id: f.id.clone(),
                pool: f.pool.clone(),
                at: now,
                attempt: attempt as u32,
                agent_id: None,
            });
            let tp = f.traceparent.as_deref();
            publish_event(ctx, &f.pool, &f.id, &ev, tp, &mut pending).await;
        }
        follow_up_failures(ctx, recorded).await;
    }

    let held = store::pools_with_held(&ctx.db).await?;
    crate::fairness::promote(ctx, held.into_iter().collect()).await;

    let stale = store::stale_dispatches(&ctx.db, STALE_DISPATCH_MS).await?;
    if !stale.is_empty() {
        dispatch::dispatch_all(ctx, stale.into_iter().map(Dispatch::from).collect()).await;
    }
    for r in futures::future::join_all(pending.into_iter().map(|f| async move { f.await })).await {
        if let Err(e) = r {
            warn!(error = %e, "maintenance event not acknowledged");
        }
    }
    crate::retention::prune(ctx).await
}

/// Re-send the terminal events a crash left unannounced: the status was written (with its
/// outbox mark) but the event never reached JetStream. Message ids are the usual ones, so an
/// event that did arrive after all is dropped as a duplicate.
async fn resend_due_events(ctx: &Ctx) -> Result<(), sqlx::Error> {
    let due = store::events_due(&ctx.db, DUE_EVENT_MS).await?;
    if due.is_empty() {
        return Ok(());
    }
    let mut terminal = Vec::new();
    let mut stale = Vec::new();
    for d in due {
        let at = d.finished_at.unwrap_or_else(Utc::now);
        let terminal_event = match d.status.as_str() {
            "dead" => Some(Event::Dead(events::Dead {
                task_id: d.id.clone(),
                pool: d.pool.clone(),
                at,
                attempts: d.attempt.max(0) as u32,
                last_error: d.error.clone().unwrap_or_default(),
            })),
            "cancelled" => Some(Event::Cancelled(events::Cancelled {
                task_id: d.id.clone(),
                pool: d.pool.clone(),
                at,
                reason: d.error.clone(),
            })),
            "expired" => Some(Event::Expired(events::Expired {
                task_id: d.id.clone(),
                pool: d.pool.clone(),
                at,
                deadline: d.deadline.unwrap_or(at),
            })),
            // A priced success: only its `closed` event is the coordinator's to send.
            "succeeded" if d.priced => None,
            // No longer terminal (replayed since): nothing to announce.
            _ => {
                stale.push(d.id);
                continue;
            }
        };
        let evs = match terminal_event {
            Some(ev) => with_closed(ev, d.priced, d.attempt),
            None => vec![closed(
                &d.pool,
                &d.id,
                ClosedStatus::Succeeded,
                d.attempt,
                d.agent.clone(),
                d.reputation.clone(),
            )],
        };
        warn!(task_id = %d.id, status = %d.status, "re-sending terminal events a crash left unannounced");
        let tp = d.traceparent.as_deref();
        announce(ctx, &d.pool, &d.id, &evs, tp, &mut terminal).await;
    }
    store::clear_event_due(&ctx.db, &stale).await?;
    confirm_terminal(ctx, terminal).await;
    Ok(())
}
