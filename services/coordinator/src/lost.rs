//! Work the work stream lost: a task PostgreSQL holds as `queued` whose work message is no
//! longer in `TASKBUS_WORK`, with no outcome on its way. Nothing in taskbus drops a work message
//! unrecorded, but an operator can (`nats stream purge TASKBUS_WORK`, a stream restored from
//! an old backup, a single-replica server that lost its disk), and so could a bug: such a task
//! would wait forever. Every [`SWEEP_EVERY`] (or every `lost_work_after`, when shorter), each
//! replica looks for such tasks and sends their attempt again.
//!
//! The work stream is a work queue: a message stays in it until an agent acks it, so the oldest
//! message of a pool's priority band is the oldest attempt of that band not yet done. A queued
//! task that was last handed out (`updated_at`, or `not_before` for a delayed attempt) more
//! than `lost_work_after` before that oldest message (or before now, when the band is empty)
//! has no message left. Its attempt might still have ended, with the outcome not yet recorded
//! (an agent stores its outcome before it acks the work): so after reading the work stream the
//! sweep reads the events stream's last sequence and waits, up to 10 s, until the coordinators'
//! outcome consumer has acknowledged everything up to it (its ack floor passed it, or it has
//! nothing pending at all). Under steady load that takes one batch. An outcome waiting for its
//! task's row (see `outcomes::wait_for_row`) holds the floor back, and sweeps are skipped until
//! it is recorded or dropped.
//!
//! A re-sent attempt goes through the dispatch outbox (its `dispatch_at` mark) under a new
//! message id (`<id>:<attempt>:lost-<ms>`: the lost message's id may still be in the duplicate
//! window), and its `updated_at` moves to now, so it is not found again while it waits.

use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use taskbus_proto::Priority;
use taskbus_runtime::CancellationToken;
use tracing::{debug, warn};

use crate::dispatch::{self, Dispatch};
use crate::{store, CoordinatorError, Ctx};

/// How often a replica looks for lost work (at most).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Most attempts re-sent per pool band and sweep.
const LIMIT: i64 = 500;

/// The shortest `--lost-work-after` the command line accepts.
pub const MIN_LOST_WORK_AFTER: Duration = Duration::from_secs(30);

/// Parse `--lost-work-after` from the command line: a duration such as `3min` or `90s`, at
/// least [`MIN_LOST_WORK_AFTER`].
pub fn parse_lost_work_after(s: &str) -> Result<Duration, String> {
    crate::retention::duration_at_least(
        s,
        MIN_LOST_WORK_AFTER,
        "3min or 90s",
        "the NATS and PostgreSQL hosts' clocks may differ by seconds, and work still on its way \
         could be sent twice; the default is 3min",
    )
}

/// One sweep: re-send the attempts of every pool whose work message is gone. Returns how many
/// were re-sent.
pub(crate) async fn sweep(
    ctx: &Ctx,
    shutdown: &CancellationToken,
) -> Result<usize, CoordinatorError> {
    let stream = ctx
        .js
        .get_stream_no_info(ctx.subjects.work_stream())
        .await
        .map_err(CoordinatorError::js)?;
    let now = Utc::now();
    let after = chrono::Duration::from_std(ctx.lost_work_after).unwrap_or(chrono::Duration::MAX);
    // 1. For each pool band, the time before which a queued task's message would be found.
    let mut bands = Vec::new();
    for pool in ctx.pools.names() {
        for priority in Priority::ALL {
            let subject = ctx.subjects.work(&pool, priority);
            let oldest = match stream.get_first_raw_message_by_subject(&subject, 0).await {
                Ok(m) => m.time,
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => now,
                Err(e) => return Err(CoordinatorError::js(e)),
            };
            bands.push((pool.clone(), priority, oldest.min(now) - after));
        }
    }
    // 2. Every outcome stored so far is recorded.
    let events = ctx
        .js
        .get_stream(ctx.subjects.events_stream())
        .await
        .map_err(CoordinatorError::js)?;
    let stored = events.cached_info().state.last_sequence;
    if !outcomes_recorded_through(&events, stored, shutdown).await? {
        return Ok(0);
    }
    // 3. Queued tasks handed out before their band's cutoff have no message: send them again.
    let mut sent = 0;
    for (pool, priority, cutoff) in bands {
        sent += resend(ctx, &pool, priority, cutoff).await?;
    }
    Ok(sent)
}

/// How long a sweep waits for the outcome consumer to record what was stored before it looked.
const OUTCOME_WAIT: Duration = Duration::from_secs(10);

/// Wait (up to [`OUTCOME_WAIT`]) until the coordinators' outcome consumer has recorded every
/// outcome the events stream held up to sequence `stored`. False when it has not by then (an
/// outcome waiting for its task's row holds the floor back) or on shutdown: the sweep is
/// skipped and tried again next time.
async fn outcomes_recorded_through(
    events: &jetstream::stream::Stream,
    stored: u64,
    shutdown: &CancellationToken,
) -> Result<bool, CoordinatorError> {
    let deadline = tokio::time::Instant::now() + OUTCOME_WAIT;
    loop {
        let info = events
            .consumer_info(crate::outcomes::CONSUMER)
            .await
            .map_err(CoordinatorError::js)?;
        let floor = info.ack_floor.stream_sequence;
        if recorded_through(floor, info.num_pending, info.num_ack_pending, stored) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            debug!(
                stored,
                ack_floor = floor,
                pending = info.num_pending,
                ack_pending = info.num_ack_pending,
                "outcomes stored before the sweep are not all recorded yet; it waits for the next"
            );
            return Ok(false);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Whether a consumer whose acknowledgement floor is at stream sequence `ack_floor`, with
/// `pending` messages not yet delivered and `ack_pending` delivered but not acknowledged, has
/// acknowledged every message of its stream up to `stored`. The floor is the highest sequence
/// up to which every message the consumer takes is acknowledged (nats-server moves it past
/// messages outside the consumer's filter), so a busy consumer passes `stored` within one
/// batch; an idle one may leave it below messages it does not take.
fn recorded_through(ack_floor: u64, pending: u64, ack_pending: usize, stored: u64) -> bool {
    ack_floor >= stored || (pending == 0 && ack_pending == 0)
}

async fn resend(
    ctx: &Ctx,
    pool: &str,
    priority: Priority,
    cutoff: DateTime<Utc>,
) -> Result<usize, CoordinatorError> {
    let lost = store::claim_lost_work(&ctx.db, pool, priority.as_str(), cutoff, LIMIT).await?;
    if lost.is_empty() {
        return Ok(0);
    }
    let sample: Vec<&str> = lost.iter().take(10).map(|p| p.id.as_str()).collect();
    warn!(
        pool,
        priority = priority.as_str(),
        tasks = lost.len(),
        first = ?sample,
        "queued tasks have no work message (the work stream lost them); sending them again"
    );
    for p in &lost {
        debug!(task_id = %p.id, attempt = p.attempt, "re-sending lost work");
    }
    for _ in &lost {
        ctx.metrics.error("lost_work");
    }
    let n = lost.len();
    // The lost message's id may still be in the duplicate window: a new one.
    let resend = format!("lost-{}", Utc::now().timestamp_millis());
    let items: Vec<Dispatch> = lost
        .into_iter()
        .map(|p| Dispatch {
            // Its time came long ago: straight to the work subject.
            not_before: None,
            resend: Some(resend.clone()),
            ..Dispatch::from(p)
        })
        .collect();
    dispatch::dispatch_all(ctx, items).await;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_as_recorded_once_the_floor_passes_or_nothing_waits() {
        // Busy: more outcomes keep coming, but everything up to 100 is acknowledged.
        assert!(recorded_through(100, 40, 12, 100));
        assert!(recorded_through(130, 40, 12, 100));
        // Busy and behind: outcome 100 (or one before it) is not acknowledged yet.
        assert!(!recorded_through(99, 40, 12, 100));
        assert!(!recorded_through(99, 0, 1, 100));
        assert!(!recorded_through(99, 1, 0, 100));
        // Idle: the floor may sit below events the consumer does not take.
        assert!(recorded_through(90, 0, 0, 100));
        // An empty stream.
        assert!(recorded_through(0, 0, 0, 0));
    }

    #[test]
    fn lost_work_after_parses_with_units_and_refuses_bad_or_short_values() {
        for (input, secs) in [("3min", 180), ("90s", 90), (" 30s ", 30), ("1h", 3_600)] {
            assert_eq!(
                parse_lost_work_after(input),
                Ok(Duration::from_secs(secs)),
                "{input}"
            );
        }
        for bad in ["", "180", "soon", "-3min", "29s", "0s", "3min; rm -rf /"] {
            let e = parse_lost_work_after(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_lost_work_after("10s")
            .unwrap_err()
            .contains("minimum of 30s"));
    }
}
