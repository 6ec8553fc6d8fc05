//! Outcome recording: `succeeded`/`failed` from the events stream (durable), `started` from
//! core NATS (best effort). Writes are batched and guarded by attempt and status, so a late or
//! repeated outcome changes nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::AckKind;
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use taskbus_proto::envelope::RetryPolicy;
use taskbus_proto::events::{self, ClosedStatus, Event, EventKind};
use taskbus_proto::{streams, Priority};
use taskbus_runtime::CancellationToken;
use tracing::{debug, warn};

use crate::dispatch::{self, Dispatch};
use crate::metrics::OutcomeLabel;
use crate::pipeline::{Next, Pipeline};
use crate::store::{self, Failure, Success};
use crate::{CoordinatorError, Ctx};

/// The durable name of the coordinator's outcome consumer (shared by every replica).
pub(crate) const CONSUMER: &str = "coordinator-outcomes";

pub(crate) async fn consumer(ctx: &Ctx) -> Result<PullConsumer, CoordinatorError> {
    let stream = ctx
        .js
        .get_stream(ctx.subjects.events_stream())
        .await
        .map_err(CoordinatorError::js)?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(CONSUMER, streams::outcome_consumer(&ctx.subjects))
        .await
        .map_err(CoordinatorError::js)?;
    // With no outcome waiting, the `started` writer need not wait for the first one to be
    // recorded (without this, a fresh coordinator wrote `running` only after STARTED_MAX_WAIT
    // until some task had finished).
    let info = consumer.cached_info();
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        ctx.outcome_progress.handled(0, true);
    }
    Ok(consumer)
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
        // Up to OUTCOME_PIPELINE batches are written at once (each its own statement and
        // commit) while outcomes queue up, so a batch does not wait for the commit of the one
        // before it; batches sharing a task wait (see `pipeline`).
        let mut pipeline = Pipeline::new();
        let mut depth = 1;
        loop {
            let chunk = match pipeline.next_chunk(&mut chunks, depth, &shutdown).await {
                Next::Chunk(c) => c,
                Next::Ended => break,
                Next::Shutdown => return,
            };
            let mut batch: Vec<_> = chunk.into_iter().filter_map(Result::ok).collect();
            if batch.is_empty() {
                continue;
            }
            // Nothing is being written and the batch is small: gather outcomes a little longer.
            // Each write is a statement and a commit whatever its size; at a modest rate,
            // writing every few outcomes on their own cost PostgreSQL more CPU than the rest of
            // the task's path. Recording is not on the path of any task's start.
            if pipeline.is_empty() && batch.len() < ctx.batch_size {
                let until = tokio::time::Instant::now() + OUTCOME_LINGER;
                while batch.len() < ctx.batch_size {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = shutdown.cancelled() => break,
                        c = chunks.next() => match c {
                            Some(c) => batch.extend(c.into_iter().filter_map(Result::ok)),
                            None => break,
                        },
                    }
                }
            }
            // Overlap batches only when outcomes queue up (a big batch was ready): at a modest
            // rate, waiting for the previous commit gathers the next outcomes into one batch,
            // which costs the database (and the other processes on the machine) less.
            depth = if batch.len() >= PIPELINE_FROM {
                OUTCOME_PIPELINE
            } else {
                1
            };
            let ids: HashSet<String> = batch
                .iter()
                .filter_map(|m| ctx.subjects.parse_event(&m.subject))
                .map(|(_, id, _)| id.to_string())
                .collect();
            let ctx = &ctx;
            pipeline
                .start(ids, |_| async move {
                    let last = batch
                        .last()
                        .and_then(|m| m.info().ok())
                        .map(|i| (i.published.timestamp_millis(), i.pending == 0));
                    match handle_batch(ctx, &batch).await {
                        Ok(()) => {
                            if let Some((published_ms, caught_up)) = last {
                                ctx.outcome_progress.handled(published_ms, caught_up);
                            }
                            true
                        }
                        Err(e) => {
                            warn!(error = %e, "outcome batch failed; redelivering");
                            ctx.metrics.error("outcomes");
                            for m in &batch {
                                let _ = m
                                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                                    .await;
                            }
                            false
                        }
                    }
                })
                .await;
        }
        pipeline.drain().await;
    }
}

/// How long a small outcome batch waits for more outcomes before it is written.
const OUTCOME_LINGER: Duration = Duration::from_millis(20);
/// Outcome batches written at once when outcomes queue up.
const OUTCOME_PIPELINE: usize = 3;
/// A batch at least this big means outcomes are queueing: overlap the next ones.
const PIPELINE_FROM: usize = 100;

/// How far the outcome consumer has got: the publish time of the last outcome it recorded,
/// and whether nothing was waiting behind it. The `started` writer uses it to skip attempts
/// whose outcome is already in the stream (see [`run_started`]).
#[derive(Debug, Default)]
pub(crate) struct Progress {
    through_ms: AtomicI64,
    caught_up: AtomicBool,
}

impl Progress {
    fn handled(&self, published_ms: i64, caught_up: bool) {
        self.through_ms.fetch_max(published_ms, Ordering::Relaxed);
        self.caught_up.store(caught_up, Ordering::Relaxed);
    }

    /// Every outcome published up to `t` has been recorded (as far as this replica can tell).
    fn covers(&self, t: chrono::DateTime<Utc>) -> bool {
        self.caught_up.load(Ordering::Relaxed)
            || self.through_ms.load(Ordering::Relaxed) >= t.timestamp_millis()
    }
}

async fn handle_batch(
    ctx: &Ctx,
    batch: &[async_nats::jetstream::Message],
) -> Result<(), sqlx::Error> {
    let mut successes = Vec::new();
    let mut durations = HashMap::new();
    let mut failures = Vec::new();
    let mut expired = Vec::new();
    // The task of each message, for the ones that name one.
    let mut task_of = Vec::with_capacity(batch.len());
    for m in batch {
        let event = serde_json::from_slice::<Event>(&m.payload);
        task_of.push(
            event
                .as_ref()
                .ok()
                .filter(|e| EventKind::OUTCOMES.contains(&e.kind()))
                .map(|e| e.task().1.to_string()),
        );
        match event {
            Ok(Event::Succeeded(e)) => {
                durations.insert((e.task_id.clone(), e.agent_id.clone()), e.duration_ms);
                successes.push(Success {
                    id: e.task_id,
                    attempt: e.attempt as i32,
                    agent: e.agent_id,
                    result: serde_json::to_string(&e.result).unwrap_or_else(|_| "null".into()),
                    at: e.at,
                    reputation: e.reputation,
                })
            }
            Ok(Event::Failed(e)) => failures.push((
                e.pool,
                Failure {
                    id: e.task_id,
                    attempt: e.attempt as i32,
                    agent: Some(e.agent_id),
                    error: e.error,
                    retryable: e.retryable,
                    at: e.at,
                },
            )),
            Ok(Event::TimedOut(e)) => failures.push((
                e.pool,
                Failure {
                    id: e.task_id,
                    attempt: e.attempt as i32,
                    agent: e.agent_id,
                    error: format!("attempt {} timed out", e.attempt),
                    retryable: true,
                    at: e.at,
                },
            )),
            Ok(Event::Expired(e)) => expired.push((e.task_id, attempt_of(m).unwrap_or(0))),
            Ok(other) => debug!(event = other.kind().as_str(), "ignoring event"),
            Err(e) => {
                // A foreign publisher sent garbage: it cannot be recorded, so drop it loudly.
                warn!(subject = %m.subject, error = %e, "unreadable outcome event dropped");
                ctx.metrics.error("bad_outcome");
            }
        }
    }
    let done = store::record_succeeded(&ctx.db, &successes).await?;
    let failure_rows: Vec<Failure> = failures.iter().map(|(_, f)| f.clone()).collect();
    let failed = store::record_failed(&ctx.db, &failure_rows).await?;
    let expired_priced = store::record_expired(&ctx.db, &expired).await?;
    count(ctx, "succeeded", done.len());
    ctx.pending_starts.finished(
        successes
            .iter()
            .map(|s| (s.id.as_str(), s.attempt))
            .chain(failures.iter().map(|(_, f)| (f.id.as_str(), f.attempt)))
            .chain(expired.iter().map(|(id, a)| (id.as_str(), *a))),
    );

    // Priced tasks whose final state was just recorded: the ledger settles on `closed`.
    let mut terminal = Vec::new();
    // Built from the row as written: a batch may hold two successes of one task (a late one of
    // an attempt already retried), and only the recorded one may be paid.
    for (id, r) in done.iter().filter(|(_, r)| r.priced) {
        let ev = closed(
            &r.pool,
            id,
            ClosedStatus::Succeeded,
            r.attempt,
            r.agent.clone(),
            r.reputation.clone(),
        );
        let tp = r.traceparent.as_deref();
        announce(ctx, &r.pool, id, &[ev], tp, &mut terminal).await;
    }
    for x in &expired_priced {
        let ev = closed(&x.pool, &x.id, ClosedStatus::Expired, x.attempt, None, None);
        let tp = x.traceparent.as_deref();
        announce(ctx, &x.pool, &x.id, &[ev], tp, &mut terminal).await;
    }

    // Reputation: fold this batch's recorded outcomes into each agent's figures. A batch may
    // hold two successes of one attempt (it ran on two agents after a redelivery): only the
    // recorded one counts, with its own duration.
    let mut per_agent: HashMap<String, store::AgentBatch> = HashMap::new();
    for (id, r) in &done {
        let Some(agent) = &r.agent else { continue };
        if let Some(ms) = durations.get(&(id.clone(), agent.clone())) {
            let b = per_agent.entry(agent.clone()).or_default();
            b.pool = r.pool.clone();
            b.successes += 1;
            b.latency_sum_ms += *ms as f64;
        }
    }
    let recorded: std::collections::HashSet<&str> = failed.iter().map(|f| f.id.as_str()).collect();
    // Outcomes of tasks with no row at all wait for it (below).
    let unrecorded: Vec<String> = task_of
        .iter()
        .flatten()
        .filter(|id| !done.contains_key(*id) && !recorded.contains(id.as_str()))
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let found = store::recorded(&ctx.db, &unrecorded, &mut Default::default()).await?;
    let missing: HashSet<&String> = unrecorded
        .iter()
        .filter(|id| !found.contains_key(*id))
        .collect();
    // A replayed failure (its effect recorded before a crash) is not held against the agent
    // again.
    for f in failed.iter().filter(|f| f.fresh) {
        if let Some(agent) = &f.agent {
            let b = per_agent.entry(agent.clone()).or_default();
            b.pool = f.pool.clone();
            b.failures += 1;
        }
    }
    crate::registry::accumulate(ctx, per_agent);

    let pools: std::collections::HashSet<String> = done
        .values()
        .map(|r| r.pool.clone())
        .chain(failures.iter().map(|(p, _)| p.clone()))
        .collect();
    follow_up_failures(ctx, failed).await;
    let fair: std::collections::HashSet<String> = pools
        .into_iter()
        .filter(|p| ctx.pools.get(p).is_some_and(|s| s.fairness_limit > 0))
        .collect();
    crate::fairness::promote(ctx, fair).await;
    // A `closed` event not stored stays due in the outbox (re-sent by the maintenance pass).
    confirm_terminal(ctx, terminal).await;
    futures::future::join_all(batch.iter().zip(&task_of).map(|(m, id)| async {
        match id.as_ref().filter(|id| missing.contains(id)) {
            None => {
                let _ = m.ack().await;
            }
            Some(id) => wait_for_row(ctx, m, id).await,
        }
    }))
    .await;
    Ok(())
}

/// How long an outcome waits for its task's row: deliveries, [`ROW_WAIT_DELAY`] apart. Longer
/// than the work stream's duplicate window, after which a lost admission could not be redone
/// under the same work message id anyway.
const ROW_WAITS: i64 = 75;
const ROW_WAIT_DELAY: Duration = Duration::from_secs(2);

/// An outcome for a task with no row. Admission publishes a task's work as soon as its row is
/// written and makes the row durable afterwards (see `crate::flush`); if PostgreSQL crashed in
/// between, the row is gone until the submit message is redelivered and admitted again. So the
/// outcome is handed back to be recorded then; one whose task never shows up (a publisher
/// inventing task ids) is dropped, loudly, after about two and a half minutes.
async fn wait_for_row(ctx: &Ctx, m: &async_nats::jetstream::Message, id: &str) {
    let delivered = m.info().map(|i| i.delivered).unwrap_or(i64::MAX);
    if delivered < ROW_WAITS {
        debug!(task_id = %id, delivered, "outcome for a task with no row yet; waiting for it");
        let _ = m.ack_with(AckKind::Nak(Some(ROW_WAIT_DELAY))).await;
    } else {
        warn!(task_id = %id, subject = %m.subject, "outcome for a task that has no row dropped");
        ctx.metrics.error("outcome_unknown_task");
        let _ = m.ack().await;
    }
}

/// Count `n` outcomes of one kind in `taskbus_coordinator_outcomes_total`.
pub(crate) fn count(ctx: &Ctx, outcome: &str, n: usize) {
    if n > 0 {
        ctx.metrics
            .outcomes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc_by(n as u64);
    }
}

/// The attempt an `expired` event refers to is not in its body; agents put it in a header.
fn attempt_of(m: &async_nats::jetstream::Message) -> Option<i32> {
    m.headers
        .as_ref()?
        .get(taskbus_proto::HDR_ATTEMPT)?
        .as_str()
        .parse()
        .ok()
}

#[derive(Deserialize)]
struct RetryOnly {
    #[serde(default)]
    retry: Option<RetryPolicy>,
}

/// After failures were recorded: schedule the next attempt (with backoff) or announce `dead`.
pub(crate) async fn follow_up_failures(ctx: &Ctx, failed: Vec<store::FailureOutcome>) {
    let now = Utc::now();
    let mut pending = Vec::new();
    let mut terminal = Vec::new();
    let mut dispatches = Vec::new();
    for f in failed {
        if f.status == "queued" {
            if f.fresh {
                count(ctx, "retried", 1);
            }
            let env = f.envelope.clone().unwrap_or_else(|| "{}".into());
            let policy = serde_json::from_str::<RetryOnly>(&env)
                .ok()
                .and_then(|r| r.retry)
                .or_else(|| {
                    ctx.pools.get(&f.pool).map(|p| RetryPolicy {
                        base_ms: p.retry_base_ms,
                        max_ms: p.retry_max_ms,
                    })
                })
                .unwrap_or(RetryPolicy {
                    base_ms: 1000,
                    max_ms: 60_000,
                });
            let delay = policy.delay_ms(f.attempt as u32, rand::random::<f64>());
            let not_before = now + chrono::Duration::milliseconds(delay as i64);
            let ev = Event::RetryScheduled(events::RetryScheduled {
                task_id: f.id.clone(),
                pool: f.pool.clone(),
                at: now,
                attempt: f.attempt as u32,
                not_before,
            });
            publish_event(
                ctx,
                &f.pool,
                &f.id,
                &ev,
                f.traceparent.as_deref(),
                &mut pending,
            )
            .await;
            dispatches.push(Dispatch {
                priority: f
                    .priority
                    .as_deref()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(Priority::Normal),
                id: f.id,
                pool: f.pool,
                attempt: f.attempt as u32,
                envelope: env,
                not_before: Some(not_before),
                traceparent: f.traceparent,
                resend: None,
            });
        } else {
            if f.fresh {
                count(ctx, "dead", 1);
            }
            let ev = Event::Dead(events::Dead {
                task_id: f.id.clone(),
                pool: f.pool.clone(),
                at: now,
                attempts: f.attempt as u32,
                last_error: f.error.clone(),
            });
            let evs = with_closed(ev, f.priced, f.attempt);
            let tp = f.traceparent.as_deref();
            announce(ctx, &f.pool, &f.id, &evs, tp, &mut terminal).await;
        }
    }
    dispatch::dispatch_all(ctx, dispatches).await;
    confirm_terminal(ctx, terminal).await;
    for r in futures::future::join_all(pending.into_iter().map(|f| async move { f.await })).await {
        if let Err(e) = r {
            warn!(error = %e, "follow-up event not acknowledged");
        }
    }
}

/// The terminal events of one task on their way to JetStream.
pub(crate) type Announced = (
    String,
    Vec<async_nats::jetstream::context::PublishAckFuture>,
);

/// The `closed` event of a priced task whose final state the coordinator recorded.
pub(crate) fn closed(
    pool: &str,
    id: &str,
    status: ClosedStatus,
    attempt: i32,
    agent_id: Option<String>,
    reputation: Option<String>,
) -> Event {
    Event::Closed(events::Closed {
        task_id: id.to_string(),
        pool: pool.to_string(),
        at: Utc::now(),
        status,
        attempt: attempt.max(0) as u32,
        agent_id,
        reputation,
    })
}

/// A terminal event the coordinator decided (`dead`, `cancelled`, `expired`), followed by the
/// task's `closed` event when it is priced.
pub(crate) fn with_closed(ev: Event, priced: bool, attempt: i32) -> Vec<Event> {
    let status = match ev.kind() {
        EventKind::Dead => Some(ClosedStatus::Dead),
        EventKind::Cancelled => Some(ClosedStatus::Cancelled),
        EventKind::Expired => Some(ClosedStatus::Expired),
        _ => None,
    };
    let close = match (priced, status) {
        (true, Some(status)) => {
            let (pool, id) = ev.task();
            Some(closed(pool, id, status, attempt, None, None))
        }
        _ => None,
    };
    std::iter::once(ev).chain(close).collect()
}

/// Publish the terminal events of a task the coordinator announces itself (`dead`,
/// `cancelled`, `expired`, `closed`). The task's outbox mark (`event_due`, set with the status)
/// is cleared by [`confirm_terminal`] once JetStream has stored all of them; until then the
/// maintenance pass re-sends them.
pub(crate) async fn announce(
    ctx: &Ctx,
    pool: &str,
    id: &str,
    evs: &[Event],
    traceparent: Option<&str>,
    terminal: &mut Vec<Announced>,
) {
    let mut acks = Vec::new();
    for ev in evs {
        if !publish_event(ctx, pool, id, ev, traceparent, &mut acks).await {
            // Not sent: leave the task due (an empty list would clear the mark).
            acks.clear();
            terminal.push((id.to_string(), Vec::new()));
            return;
        }
    }
    terminal.push((id.to_string(), acks));
}

/// Wait for announced terminal events; clear the outbox mark of each task whose events were
/// all stored. Returns the ids whose events were not (they stay due).
pub(crate) async fn confirm_terminal(ctx: &Ctx, terminal: Vec<Announced>) -> Vec<String> {
    let results = futures::future::join_all(terminal.into_iter().map(|(id, acks)| async move {
        let sent = !acks.is_empty();
        let results =
            futures::future::join_all(acks.into_iter().map(|f| async move { f.await })).await;
        (id, sent, results.into_iter().find_map(Result::err))
    }))
    .await;
    let (mut stored, mut missing) = (Vec::new(), Vec::new());
    for (id, sent, err) in results {
        match (sent, err) {
            (true, None) => stored.push(id),
            (_, e) => {
                let e = e.map_or_else(|| "not sent".to_string(), |e| e.to_string());
                warn!(task_id = %id, error = %e, "terminal event not acknowledged; the maintenance pass re-sends it");
                missing.push(id);
            }
        }
    }
    if let Err(e) = store::clear_event_due(&ctx.db, &stored).await {
        warn!(error = %e, "cannot clear the event outbox; the events will be re-sent (deduplicated)");
    }
    missing
}

/// Publish one event the coordinator writes itself, with the task's `traceparent` when given.
pub(crate) async fn publish_event(
    ctx: &Ctx,
    pool: &str,
    id: &str,
    ev: &Event,
    traceparent: Option<&str>,
    pending: &mut Vec<async_nats::jetstream::context::PublishAckFuture>,
) -> bool {
    let kind = ev.kind();
    let mut p = Publish::build()
        .payload(ev.to_json().into())
        .message_id(event_msg_id(id, ev));
    if let Some(tp) = traceparent {
        p = p.header(taskbus_proto::HDR_TRACEPARENT, tp);
    }
    match ctx
        .js
        .send_publish(ctx.subjects.event(pool, id, kind), p)
        .await
    {
        Ok(f) => {
            pending.push(f);
            true
        }
        Err(e) => {
            warn!(error = %e, "event publish failed");
            false
        }
    }
}

/// Deterministic message ids, so a replayed follow-up is dropped by JetStream's dedupe.
fn event_msg_id(id: &str, ev: &Event) -> String {
    match ev {
        Event::RetryScheduled(r) => format!("{id}:retry:{}", r.attempt),
        Event::TimedOut(t) => format!("{id}:{}:timed_out", t.attempt),
        // A task replayed from the dead-letter queue can die again: each death is its own event.
        Event::Dead(d) => format!("{id}:{}:dead", d.attempts),
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

/// How long `started` events are collected before they are written. Tasks that finish within
/// the window cost one index lookup instead of a row update (their status is no longer
/// `queued`), which matters at high rates where most tasks are short.
const STARTED_WINDOW: Duration = Duration::from_millis(250);
/// A closed window is written once the outcome consumer has recorded every outcome published
/// before the window ended: when outcomes lag (a backlog after a burst or a restart), writing
/// `running` for attempts whose `succeeded` is already waiting in the stream would only add a
/// second row update per task to the work that is behind. It waits at most this long.
const STARTED_MAX_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn run_started(
    ctx: Arc<Ctx>,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    let window = tokio::time::sleep(STARTED_WINDOW);
    tokio::pin!(window);
    let mut check = tokio::time::interval(Duration::from_millis(20));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pending = &ctx.pending_starts;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => {
                let Some(m) = m else { return };
                if let Ok(Event::Started(s)) = serde_json::from_slice::<Event>(&m.payload) {
                    let open = pending.add(s.task_id, s.attempt as i32, s.agent_id, s.at);
                    if open == 1 {
                        window.as_mut().reset(tokio::time::Instant::now() + STARTED_WINDOW);
                    }
                    if open >= 20 * ctx.batch_size {
                        pending.close();
                    }
                }
            }
            _ = &mut window, if pending.open_len() > 0 => pending.close(),
            _ = check.tick(), if pending.has_closed() => {
                while let Some(rows) = pending.pop_due(&ctx.outcome_progress) {
                    write_started(&ctx, &rows).await;
                }
            }
        }
    }
}

type StartedRow = (String, i32, String, chrono::DateTime<Utc>);
type Window = HashMap<(String, i32), (String, chrono::DateTime<Utc>)>;
/// The open window, and the closed ones with the time each closed.
type Windows = (Window, VecDeque<(chrono::DateTime<Utc>, Window)>);

/// `started` events not yet written, by task and attempt: the window being filled and the
/// closed ones (with the time each closed) waiting for the outcomes to catch up. The outcome
/// path takes out every attempt whose outcome it recorded, so the writer does not look up
/// tasks that already finished (most of them, at high rates: they cost an index lookup each).
#[derive(Debug, Default)]
pub(crate) struct PendingStarts {
    windows: std::sync::Mutex<Windows>,
}

impl PendingStarts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a start to the open window; returns how many the open window holds now.
    fn add(&self, id: String, attempt: i32, agent: String, at: chrono::DateTime<Utc>) -> usize {
        let mut w = self.lock();
        w.0.insert((id, attempt), (agent, at));
        w.0.len()
    }

    fn open_len(&self) -> usize {
        self.lock().0.len()
    }

    fn has_closed(&self) -> bool {
        !self.lock().1.is_empty()
    }

    /// Close the open window.
    fn close(&self) {
        let mut w = self.lock();
        let open = std::mem::take(&mut w.0);
        if !open.is_empty() {
            w.1.push_back((Utc::now(), open));
        }
    }

    /// The oldest closed window, once every outcome published before it closed is recorded
    /// or it has waited [`STARTED_MAX_WAIT`].
    fn pop_due(&self, progress: &Progress) -> Option<Vec<StartedRow>> {
        let mut w = self.lock();
        let (at, _) = w.1.front()?;
        let waited = (Utc::now() - *at).to_std().unwrap_or_default();
        if !progress.covers(*at) && waited < STARTED_MAX_WAIT {
            return None;
        }
        let (_, rows) = w.1.pop_front()?;
        Some(
            rows.into_iter()
                .map(|((id, attempt), (agent, at))| (id, attempt, agent, at))
                .collect(),
        )
    }

    /// Outcomes recorded for these attempts: their starts need no write.
    pub(crate) fn finished<'a>(&self, attempts: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut w = self.lock();
        if w.0.is_empty() && w.1.is_empty() {
            return;
        }
        for (id, attempt) in attempts {
            let key = (id.to_string(), attempt);
            if w.0.remove(&key).is_none() {
                for (_, closed) in w.1.iter_mut() {
                    if closed.remove(&key).is_some() {
                        break;
                    }
                }
            }
        }
    }
}

async fn write_started(ctx: &Ctx, rows: &[StartedRow]) {
    for chunk in rows.chunks(ctx.batch_size.max(1)) {
        if let Err(e) = store::record_started(&ctx.db, chunk).await {
            // Informational only: the outcome still lands.
            debug!(error = %e, "could not record started");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_windows_wait_for_the_outcomes_published_before_them() {
        let p = Progress::default();
        let t = Utc::now();
        // Nothing recorded yet and not known to be caught up: wait.
        assert!(!p.covers(t));
        // Outcomes recorded up to a second before the window closed: still behind.
        p.handled(t.timestamp_millis() - 1000, false);
        assert!(!p.covers(t));
        // Recorded through the window's end: write.
        p.handled(t.timestamp_millis(), false);
        assert!(p.covers(t));
        // A later window is not covered until the consumer catches up or gets there.
        let later = t + chrono::Duration::seconds(2);
        assert!(!p.covers(later));
        p.handled(t.timestamp_millis() - 5000, true);
        assert!(p.covers(later), "caught up: nothing is waiting behind");
        // An older batch finishing late never moves the mark back.
        assert_eq!(p.through_ms.load(Ordering::Relaxed), t.timestamp_millis());
    }

    #[test]
    fn recorded_outcomes_take_their_starts_out_of_the_pending_windows() {
        let p = PendingStarts::default();
        let now = Utc::now();
        assert_eq!(p.add("a".into(), 1, "ag".into(), now), 1);
        assert_eq!(p.add("b".into(), 1, "ag".into(), now), 2);
        p.close();
        assert_eq!(p.add("a".into(), 2, "ag".into(), now), 1);
        assert_eq!(p.add("c".into(), 1, "ag".into(), now), 2);
        // Attempt 1 of `a` finished (closed window), `c` finished (open window); attempt 2 of
        // `a` and an unknown start are untouched.
        p.finished([("a", 1), ("c", 1), ("zz", 1)]);
        assert_eq!(p.open_len(), 1);
        let progress = Progress::default();
        // The closed window waits until the outcomes published before it are recorded.
        assert!(p.pop_due(&progress).is_none());
        progress.handled(Utc::now().timestamp_millis(), false);
        let rows = p.pop_due(&progress).expect("due");
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].0.as_str(), rows[0].1), ("b", 1));
        assert!(!p.has_closed());
        p.close();
        progress.handled(0, true);
        let rows = p.pop_due(&progress).expect("due once caught up");
        assert_eq!((rows[0].0.as_str(), rows[0].1), ("a", 2));
    }
}
