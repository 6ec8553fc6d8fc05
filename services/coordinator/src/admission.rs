//! Admission: submit stream → validation → `coordinator.tasks` → work stream / `rejected`.
//!
//! Messages are handled in batches of whatever is ready (up to `batch_size`): one INSERT for
//! the admitted tasks, one for the rejections, all publishes in flight together, then all acks.
//! Nothing is acked before its effects are durable, so a crash at any point only causes a
//! redelivery, which is recognised by the stored submit sequence and finished, never doubled.
//! The rows are committed without waiting for the disk and the work published at once; the
//! acks wait for a shared WAL flush (see `crate::flush` for what a PostgreSQL crash does).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{AckKind, Message};
use chrono::Utc;
use futures::StreamExt;
use taskbus_proto::events::{self, Event, EventKind};
use taskbus_proto::validate::{self, Rejection};
use taskbus_proto::{ids, streams, ValidTask};
use taskbus_runtime::CancellationToken;
use tracing::{debug, warn};

use crate::dispatch::{self, Dispatch};
use crate::pipeline::{Next, Pipeline, Slot};
use crate::store::{self, NewRejection, NewTask};
use crate::{CoordinatorError, Ctx};

pub(crate) async fn consumer(ctx: &Ctx) -> Result<PullConsumer, CoordinatorError> {
    let stream = ctx
        .js
        .get_stream(ctx.subjects.submit_stream())
        .await
        .map_err(CoordinatorError::js)?;
    stream
        .get_or_create_consumer("coordinator", streams::submit_consumer())
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
                warn!(error = %e, "cannot pull from the submit stream; retrying");
                ctx.metrics.error("submit_pull");
                crate::pause(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut chunks = messages.ready_chunks(ctx.batch_size);
        // Up to `admission_pipeline` batches are in progress at once: while one waits for its
        // commit or its publish acks, the next is validated and written, so a message does not
        // wait for the whole batch ahead of it. A batch that shares a task id with one in
        // progress waits for those to finish first, so of two messages with the same id the
        // earlier one still wins.
        let mut pipeline = Pipeline::new();
        loop {
            let chunk = match pipeline
                .next_chunk(&mut chunks, ctx.admission_pipeline, &shutdown)
                .await
            {
                Next::Chunk(c) => c,
                Next::Ended => break,
                Next::Shutdown => return,
            };
            let mut batch = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => batch.push(m),
                    Err(e) => debug!(error = %e, "submit stream notice"),
                }
            }
            if batch.is_empty() {
                continue;
            }
            ctx.metrics.batch_size.observe(batch.len() as f64);
            let items = classify(&ctx, batch);
            let ids = batch_ids(&items);
            let ctx = &ctx;
            pipeline
                .start(ids, |slot| async move {
                    match handle_batch(ctx, items, slot).await {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(error = %e, "admission batch failed; its messages will be redelivered");
                            ctx.metrics.error("admission");
                            false
                        }
                    }
                })
                .await;
        }
        pipeline.drain().await;
    }
}

/// One message, classified.
enum Verdict {
    Admit(Box<ValidTask>),
    Reject(Rejection, String),
    /// A priced task whose hold the ledger has not confirmed: handed back, retried later.
    Wait,
}

struct Item {
    msg: Message,
    seq: u64,
    verdict: Verdict,
    /// The submit message's valid `traceparent`, read once.
    traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("rows not confirmed on disk: {0}")]
    Flush(#[from] store::FlushError),
}

fn fallback_id(msg: &Message, seq: u64) -> String {
    if let Some(h) = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
        if ids::is_valid_task_id(h.as_str()) {
            return h.as_str().to_string();
        }
    }
    // Deterministic per message: the same redelivered message gets the same id.
    let ms = msg
        .info()
        .map(|i| i.published.timestamp_millis().max(0) as u64)
        .unwrap_or(0);
    ulid::Ulid::from_parts(ms, seq as u128).to_string()
}

/// The pool token to use in event subjects (a single, safe subject token).
fn subject_pool(pool: &str) -> &str {
    if !pool.is_empty() && !pool.contains(['.', '*', '>', ' ']) {
        pool
    } else {
        "_invalid"
    }
}

/// Validate a batch of submit messages.
fn classify(ctx: &Ctx, batch: Vec<Message>) -> Vec<Item> {
    let mut items = Vec::with_capacity(batch.len());
    for msg in batch {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let pool = msg
            .subject
            .as_str()
            .strip_prefix(ctx.subjects.prefix())
            .and_then(|s| s.strip_prefix(".submit."))
            .unwrap_or("")
            .to_string();
        let verdict = match validate::validate(
            &msg.payload,
            &pool,
            &ctx.limits,
            |p| ctx.pools.exists(p),
            || fallback_id(&msg, seq),
        ) {
            Ok(t) => Verdict::Admit(Box::new(t)),
            Err(r) => Verdict::Reject(r, pool),
        };
        let traceparent = taskbus_proto::trace::from_headers(msg.headers.as_ref());
        items.push(Item {
            msg,
            seq,
            verdict,
            traceparent,
        });
    }
    items
}

/// The task ids a batch touches (admitted or rejected under an id).
fn batch_ids(items: &[Item]) -> HashSet<String> {
    items
        .iter()
        .filter_map(|it| match &it.verdict {
            Verdict::Admit(t) => Some(t.id.clone()),
            Verdict::Reject(r, _) => r.task_id.clone(),
            Verdict::Wait => None,
        })
        .collect()
}

async fn handle_batch(ctx: &Ctx, mut items: Vec<Item>, slot: Slot) -> Result<(), BatchError> {
    // 0. Priced tasks need their hold (payer → escrow) before anything else.
    hold_prices(ctx, &mut items).await?;

    // 1. Record admitted tasks. `incarnations`: which server incarnation the rows were
    // written and read in (checked against the flush before acking, see `crate::flush`).
    let mut incarnations = store::Incarnations::default();
    let mut new_tasks = Vec::new();
    let mut envelopes: HashMap<usize, String> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (i, it) in items.iter().enumerate() {
        if let Verdict::Admit(t) = &it.verdict {
            if !seen.insert(t.id.as_str()) {
                continue; // same id twice in one batch: the later one is a duplicate
            }
            let env = serde_json::to_string(&t.to_envelope()).unwrap_or_default();
            envelopes.insert(i, env.clone());
            new_tasks.push(NewTask {
                id: t.id.clone(),
                pool: t.pool.clone(),
                kind: t.kind.clone(),
                priority: t.priority.as_str().into(),
                max_attempts: t.max_attempts as i32,
                envelope: env,
                submit_seq: it.seq as i64,
                payer: t.payer.clone(),
                deadline: t.deadline,
                not_before: t.not_before,
                timeout_ms: t.timeout_ms as i64,
                held: held_by_fairness(ctx, t),
                fair_key: fair_key(t),
                traceparent: it.traceparent.clone(),
            });
        }
    }
    // The same order in every batch, so concurrent batches with a common id cannot deadlock.
    new_tasks.sort_by(|a, b| a.id.cmp(&b.id));
    let inserted = store::insert_admitted(&ctx.db_admit, &new_tasks, &mut incarnations).await?;
    let conflicts: Vec<String> = new_tasks
        .iter()
        .filter(|t| !inserted.contains(&t.id))
        .map(|t| t.id.clone())
        .collect();
    let existing = store::recorded(&ctx.db, &conflicts, &mut incarnations).await?;

    // 2. Record rejections; a rejection whose id is taken by another message is re-keyed.
    let mut rejections: HashMap<usize, NewRejection> = HashMap::new();
    for (i, it) in items.iter().enumerate() {
        if let Verdict::Reject(r, pool) = &it.verdict {
            rejections.insert(
                i,
                NewRejection {
                    id: r
                        .task_id
                        .clone()
                        .unwrap_or_else(|| format!("seq-{}", it.seq)),
                    pool: pool.clone(),
                    reason: r.reason.as_str().into(),
                    message: r.message.clone(),
                    submit_seq: it.seq as i64,
                },
            );
        }
    }
    let rows: Vec<NewRejection> = rejections.values().cloned().collect();
    let rej_inserted = store::insert_rejected(&ctx.db_admit, &rows, &mut incarnations).await?;
    let rej_conflicts: Vec<String> = rows
        .iter()
        .filter(|r| !rej_inserted.contains(&r.id))
        .map(|r| r.id.clone())
        .collect();
    let rej_existing = store::recorded(&ctx.db, &rej_conflicts, &mut incarnations).await?;
    let mut rekeyed = Vec::new();
    // Redeliveries of a message that was admitted earlier and is refused now only because the
    // task's hold has meanwhile resolved (the task ran): nothing to announce, just ack.
    let mut admitted_earlier = std::collections::HashSet::new();
    for (i, r) in rejections.iter_mut() {
        if let Some((seq, status, _, _)) = rej_existing.get(&r.id) {
            if *seq != Some(r.submit_seq) {
                r.id = format!("seq-{}", r.submit_seq);
                rekeyed.push(r.clone());
            } else if status != "rejected" {
                admitted_earlier.insert(*i);
            }
        }
    }
    store::insert_rejected(&ctx.db_admit, &rekeyed, &mut incarnations).await?;

    // 3. Publish work and rejected events, all in flight at once.
    // Whether acking waits for the WAL flush (`crate::flush`): it does for every message that
    // wrote or relies on its own row, not for a duplicate of a task another message recorded
    // (whose own ack waits for that row), so a burst of duplicates is not held up by flushes.
    let mut needs_flush = false;
    let now = Utc::now();
    let mut pending = Vec::new(); // (item index, ack future)
    let mut fair_pools = std::collections::HashSet::new();
    let mut ackable = vec![true; items.len()];
    for (i, it) in items.iter().enumerate() {
        match &it.verdict {
            Verdict::Admit(t) => {
                let first_in_batch = envelopes.contains_key(&i);
                let held = held_by_fairness(ctx, t);
                let publish = if first_in_batch && inserted.contains(&t.id) {
                    needs_flush = true;
                    ctx.metrics.admitted.inc();
                    if held {
                        fair_pools.insert(t.pool.clone());
                    }
                    !held
                } else {
                    match existing.get(&t.id) {
                        // Our own earlier delivery: finish it (the work publish is deduplicated).
                        Some((Some(seq), status, _, _))
                            if first_in_batch && *seq == it.seq as i64 =>
                        {
                            needs_flush = true;
                            status == "queued"
                        }
                        _ => {
                            ctx.metrics.duplicates.inc();
                            debug!(task_id = %t.id, seq = it.seq, "duplicate task id dropped");
                            false
                        }
                    }
                };
                if !publish {
                    continue;
                }
                let d = Dispatch {
                    id: t.id.clone(),
                    pool: t.pool.clone(),
                    priority: t.priority,
                    attempt: 1,
                    envelope: envelopes.get(&i).cloned().unwrap_or_else(|| "{}".into()),
                    not_before: t.not_before,
                    traceparent: it.traceparent.clone(),
                    resend: None,
                };
                match dispatch::send(ctx, &d).await {
                    Ok(f) => pending.push((i, f)),
                    Err(e) => {
                        warn!(error = %e, task_id = %t.id, "work publish failed");
                        ackable[i] = false;
                    }
                }
                if ctx.publish_admitted {
                    let ev = Event::Admitted(events::Admitted {
                        task_id: t.id.clone(),
                        pool: t.pool.clone(),
                        at: now,
                        kind: t.kind.clone(),
                        priority: t.priority,
                    });
                    let _ = ctx
                        .client
                        .publish(
                            ctx.subjects.event(&t.pool, &t.id, EventKind::Admitted),
                            ev.to_json().into(),
                        )
                        .await;
                }
            }
            Verdict::Wait => ackable[i] = false,
            Verdict::Reject(r, _) => {
                needs_flush = true;
                let Some(row) = rejections.get(&i) else {
                    continue;
                };
                if admitted_earlier.contains(&i) {
                    debug!(task_id = %row.id, seq = it.seq, "redelivery of an admitted task: nothing to reject");
                    continue;
                }
                ctx.metrics
                    .rejected
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: r.reason.as_str().into(),
                    })
                    .inc();
                let ev = Event::Rejected(events::Rejected {
                    task_id: row.id.clone(),
                    pool: row.pool.clone(),
                    at: now,
                    reason: r.reason,
                    message: r.message.clone(),
                    submit_seq: Some(it.seq),
                });
                let subject =
                    ctx.subjects
                        .event(subject_pool(&row.pool), &row.id, EventKind::Rejected);
                let mut p = Publish::build()
                    .payload(ev.to_json().into())
                    .message_id(format!("{}:rejected", row.id));
                if let Some(tp) = &it.traceparent {
                    p = p.header(taskbus_proto::HDR_TRACEPARENT, tp.as_str());
                }
                match ctx.js.send_publish(subject, p).await {
                    Ok(f) => pending.push((i, f)),
                    Err(e) => {
                        warn!(error = %e, "rejected event publish failed");
                        ackable[i] = false;
                    }
                }
            }
        }
    }
    // The rows were committed without waiting for the disk (see `crate::flush`) and the work
    // is on its way: the next batch may start. The messages are acked only once the rows are
    // flushed and the publishes acknowledged.
    slot.release();
    let (results, flushed) = tokio::join!(
        futures::future::join_all(
            pending
                .into_iter()
                .map(|(i, f)| async move { (i, f.await) }),
        ),
        async {
            if needs_flush {
                ctx.wal_flush.wait(&ctx.db, &incarnations).await
            } else {
                Ok(())
            }
        },
    );
    for (i, r) in results {
        if let Err(e) = r {
            warn!(error = %e, "publish not acknowledged; the submit message will be redelivered");
            ackable[i] = false;
        }
    }
    if let Err(e) = flushed {
        // Whether the rows survive is unknown: hand every message back. A redelivery finds its
        // row (and finishes the job) or writes it again; the work message keeps its id.
        ackable.iter_mut().for_each(|a| *a = false);
        ack_or_hand_back(&items, &ackable).await;
        return Err(e.into());
    }

    // 4. Ack what is done; hand back the rest quickly.
    ack_or_hand_back(&items, &ackable).await;
    crate::fairness::promote(ctx, fair_pools).await;
    Ok(())
}

/// Ack the messages marked ackable, hand the others back for redelivery in half a second.
async fn ack_or_hand_back(items: &[Item], ackable: &[bool]) {
    let acks = items.iter().zip(ackable).map(|(it, ok)| async move {
        let kind = if *ok {
            AckKind::Ack
        } else {
            AckKind::Nak(Some(Duration::from_millis(500)))
        };
        if let Err(e) = it.msg.ack_with(kind).await {
            debug!(error = %e, "ack failed; message will be redelivered");
        }
    });
    futures::future::join_all(acks).await;
}

/// Ask the ledger to hold the price of every priced task in the batch (one request). Held tasks
/// go on; refused ones become rejections (`insufficient_funds`, `invalid_value`); when the ledger
/// does not answer, the tasks wait (their messages are handed back and retried), so a priced
/// task is never dispatched unpaid and never lost.
async fn hold_prices(ctx: &Ctx, items: &mut [Item]) -> Result<(), sqlx::Error> {
    use taskbus_proto::api::{Hold, HoldRequest, HoldResponse, HoldStatus};
    use taskbus_proto::RejectReason;
    let holds: Vec<(usize, Hold)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, it)| match &it.verdict {
            Verdict::Admit(t) => t.price.map(|price| {
                (
                    i,
                    Hold {
                        task_id: t.id.clone(),
                        pool: t.pool.clone(),
                        payer: t.payer.clone().unwrap_or_default(),
                        amount: price.to_string(),
                        currency: t.currency.clone(),
                    },
                )
            }),
            _ => None,
        })
        .collect();
    if holds.is_empty() {
        return Ok(());
    }
    // A redelivered message that is already recorded needs no hold: an admitted task has its
    // hold (asked again after it resolved, the ledger would refuse it), and a rejected one stays
    // rejected (a hold made now, after the payer's funds arrived, would belong to a task that
    // never runs, and nothing would ever release it). The admission path finishes their job.
    let ids: Vec<String> = holds.iter().map(|(_, h)| h.task_id.clone()).collect();
    let recorded = store::recorded(&ctx.db, &ids, &mut Default::default()).await?;
    let mut ask = Vec::with_capacity(holds.len());
    for (i, hold) in holds {
        match recorded.get(&hold.task_id) {
            Some((seq, status, reason, message)) if *seq == Some(items[i].seq as i64) => {
                if status == "rejected" {
                    let reason = reason
                        .as_deref()
                        .and_then(|r| serde_json::from_value(serde_json::Value::from(r)).ok())
                        .unwrap_or(RejectReason::InvalidValue);
                    items[i].verdict = Verdict::Reject(
                        Rejection {
                            reason,
                            message: message.clone().unwrap_or_default(),
                            task_id: Some(hold.task_id.clone()),
                        },
                        hold.pool.clone(),
                    );
                }
            }
            _ => ask.push((i, hold)),
        }
    }
    let holds = ask;
    if holds.is_empty() {
        return Ok(());
    }
    let req = HoldRequest {
        holds: holds.iter().map(|(_, h)| h.clone()).collect(),
    };
    let subject = taskbus_proto::api::ledger_hold_subject(ctx.subjects.prefix());
    let body = serde_json::to_vec(&req).unwrap_or_default();
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        ctx.client.request(subject, body.into()),
    )
    .await;
    let results = match reply {
        Ok(Ok(msg)) => {
            match serde_json::from_slice::<taskbus_proto::api::Reply<HoldResponse>>(&msg.payload) {
                Ok(taskbus_proto::api::Reply::Ok(r)) if r.results.len() == holds.len() => {
                    Some(r.results)
                }
                Ok(taskbus_proto::api::Reply::Error(e)) => {
                    warn!(code = e.code, error = %e.error, "ledger refused the hold request; priced tasks wait");
                    None
                }
                _ => {
                    warn!("unreadable ledger hold reply; priced tasks wait");
                    None
                }
            }
        }
        Ok(Err(e)) => {
            warn!(error = %e, "no ledger answered the hold request; priced tasks wait (is taskbus-ledger running?)");
            None
        }
        Err(_) => {
            warn!("ledger hold request timed out; priced tasks wait");
            None
        }
    };
    for (n, (i, hold)) in holds.into_iter().enumerate() {
        let it = &mut items[i];
        let Verdict::Admit(t) = &it.verdict else {
            continue;
        };
        let new = match results.as_ref().map(|r| &r[n]) {
            None => Some(Verdict::Wait),
            Some(r) if r.task_id != hold.task_id => Some(Verdict::Wait),
            Some(r) => match r.status {
                HoldStatus::Held => None,
                HoldStatus::InsufficientFunds | HoldStatus::Invalid => {
                    let (reason, default) = if r.status == HoldStatus::InsufficientFunds {
                        (
                            RejectReason::InsufficientFunds,
                            format!(
                                "payer {} cannot cover {} {}",
                                hold.payer,
                                hold.amount,
                                hold.currency.as_deref().unwrap_or("")
                            ),
                        )
                    } else {
                        (
                            RejectReason::InvalidValue,
                            "the ledger refused the price".to_string(),
                        )
                    };
                    Some(Verdict::Reject(
                        Rejection {
                            reason,
                            message: r.message.clone().unwrap_or(default),
                            task_id: Some(t.id.clone()),
                        },
                        t.pool.clone(),
                    ))
                }
            },
        };
        if let Some(v) = new {
            it.verdict = v;
        }
    }
    Ok(())
}

/// Whether the task waits as `admitted` for its fairness key's turn instead of being queued.
fn held_by_fairness(ctx: &Ctx, t: &ValidTask) -> bool {
    fair_key(t).is_some() && ctx.pools.get(&t.pool).is_some_and(|p| p.fairness_limit > 0)
}

/// What the pool's fairness limit counts by: the payer, else the `tenant` label.
fn fair_key(t: &ValidTask) -> Option<String> {
    t.payer.clone().or_else(|| t.labels.get("tenant").cloned())
}
