//! Schedules: recurring tasks from the KV bucket `<prefix>_schedules` (key = schedule name,
//! value = a [`Schedule`]).
//!
//! One loop per replica follows the bucket (history first, then changes) and keeps, for every
//! valid, unpaused schedule, the time of its next tick. It sleeps until the earliest of them (or
//! until the bucket changes), then submits each due tick as an ordinary task: a JetStream
//! publish to `<prefix>.submit.<pool>`, awaiting the ack, with the task id and the
//! `Nats-Msg-Id` header both set to `sched-<name>-<unix seconds of the tick>`.
//!
//! Every replica fires every tick. The id is the same on all of them, so JetStream's duplicate
//! window drops the copies that arrive within it and admission, which admits a task id at most
//! once, drops any that arrive later: each tick runs once however many replicas there are.
//!
//! Rules:
//! - **Misfires.** When a schedule is (re)armed — the coordinator starts, the watch restarts,
//!   the entry is written or resumed — the latest tick at or before now fires if it is at most
//!   `misfire_grace_s` old and not older than the entry's revision (so writing, changing or
//!   resuming a schedule never fires a tick from before that write, as with a new CronJob,
//!   while a coordinator that restarts catches up the tick it missed); older ticks are skipped. When the loop wakes late and several ticks
//!   are due at once, only the latest fires, and only within the grace; the others are counted
//!   as skipped.
//! - **Overlap.** A tick fires whether or not the previous tick's task has finished (Kubernetes
//!   CronJob's `Allow`): each tick is its own task.
//! - **Invalid entries** (not JSON, unknown fields, a bad cron expression, time zone, pool or
//!   task, an oversized entry, a key that is not a schedule name) are logged once per revision
//!   with the reason, counted, and ignored; an invalid revision of a schedule stops that
//!   schedule until it is fixed and touches no other.
//! - A publish that fails is tried again every second while its tick is within the grace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use taskbus_proto::schedule::{is_valid_schedule_name, tick_task_id};
use taskbus_proto::{CompiledSchedule, Schedule, ScheduleError};
use taskbus_runtime::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::ScheduleLabel;
use crate::Ctx;

/// Ticks counted as skipped at once, at most (a schedule every second on a machine that was
/// suspended for a day would otherwise walk 86,400 ticks).
const MAX_COUNTED_SKIPS: u64 = 10_000;
/// How long a publish may wait for JetStream's ack.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before a failed publish is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What to do about a schedule at a given moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The tick to submit now, if any.
    pub fire: Option<DateTime<Utc>>,
    /// Ticks passed over without submitting them.
    pub skipped: u64,
    /// The tick to wake up for next (`None`: the expression never fires again).
    pub next: Option<DateTime<Utc>>,
}

/// A schedule whose entry was written at `written`, (re)armed at `now`: the latest tick at or
/// before `now` fires when it is within the grace and not before `written` (a restart catches
/// up one tick, never more; a new, changed or resumed entry catches up none), and the first
/// tick after `now` is planned.
pub(crate) fn arm(c: &CompiledSchedule, written: DateTime<Utc>, now: DateTime<Utc>) -> Plan {
    let fire = c
        .latest_at_or_before(now)
        .filter(|t| now - *t <= c.grace && *t >= written);
    Plan {
        fire,
        skipped: 0,
        next: c.next_after(now),
    }
}

/// The planned tick `planned` is due (`planned <= now`). Of the ticks from `planned` to `now`
/// only the latest fires, and only when it is within the grace; the others are skipped.
pub(crate) fn due(c: &CompiledSchedule, planned: DateTime<Utc>, now: DateTime<Utc>) -> Plan {
    let latest = c
        .latest_at_or_before(now)
        .filter(|t| *t >= planned)
        .unwrap_or(planned);
    let mut skipped = 0;
    let mut t = planned;
    while t < latest && skipped < MAX_COUNTED_SKIPS {
        skipped += 1;
        match c.next_after(t) {
            Some(n) => t = n,
            None => break,
        }
    }
    let fire = (now - latest <= c.grace).then_some(latest);
    if fire.is_none() {
        skipped += 1;
    }
    Plan {
        fire,
        skipped,
        next: c.next_after(now.max(latest)),
    }
}

/// One tick to submit.
#[derive(Debug, Clone)]
struct Fire {
    name: String,
    tick: DateTime<Utc>,
    /// Give up on this tick after this time (its tick plus the grace).
    until: DateTime<Utc>,
    /// When to try (now, or later after a failed publish).
    at: DateTime<Utc>,
    subject: String,
    id: String,
    body: Bytes,
}

struct Armed {
    schedule: Schedule,
    compiled: CompiledSchedule,
    next: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct State {
    armed: HashMap<String, Armed>,
    /// Revision of the last invalid entry reported per key (reported once each).
    invalid: HashMap<String, u64>,
    /// Ticks waiting to be published.
    pending: Vec<Fire>,
}

impl State {
    fn fire(&mut self, ctx: &Ctx, name: &str, tick: DateTime<Utc>, now: DateTime<Utc>) {
        let Some(a) = self.armed.get(name) else {
            return;
        };
        let env = a.schedule.tick_envelope(name, tick);
        let body = match serde_json::to_vec(&env) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                warn!(schedule = name, error = %e, "cannot encode a tick's task");
                return;
            }
        };
        self.pending.push(Fire {
            name: name.to_string(),
            tick,
            until: tick + a.compiled.grace,
            at: now,
            subject: ctx.subjects.submit(&a.schedule.pool),
            id: tick_task_id(name, tick),
            body,
        });
    }

    fn skipped(&self, ctx: &Ctx, name: &str, n: u64) {
        if n > 0 {
            ctx.metrics
                .schedule_skipped
                .get_or_create(&ScheduleLabel {
                    schedule: name.to_string(),
                })
                .inc_by(n);
            info!(
                schedule = name,
                ticks = n,
                "skipped ticks older than the misfire grace"
            );
        }
    }

    /// A put, delete or purge of `key` at `revision`.
    fn apply(&mut self, ctx: &Ctx, entry: &kv::Entry, now: DateTime<Utc>) {
        let key = entry.key.as_str();
        let value = match entry.operation {
            kv::Operation::Put => &entry.value,
            kv::Operation::Delete | kv::Operation::Purge => {
                self.invalid.remove(key);
                if self.armed.remove(key).is_some() {
                    info!(schedule = key, "schedule deleted");
                }
                return;
            }
        };
        let parsed = if is_valid_schedule_name(key) {
            Schedule::from_entry(value, &ctx.limits)
        } else {
            Err(ScheduleError::Name(key.to_string()))
        };
        let (schedule, compiled) = match parsed {
            Ok(x) => x,
            Err(e) => {
                self.armed.remove(key);
                if self.invalid.get(key) != Some(&entry.revision) {
                    self.invalid.insert(key.to_string(), entry.revision);
                    ctx.metrics.schedule_invalid.inc();
                    warn!(
                        key,
                        revision = entry.revision,
                        error = %e,
                        "ignoring an invalid entry in the schedules bucket"
                    );
                }
                return;
            }
        };
        self.invalid.remove(key);
        if schedule.paused {
            if self.armed.remove(key).is_some() {
                info!(schedule = key, "schedule paused");
            }
            return;
        }
        let plan = arm(&compiled, entry.created, now);
        info!(
            schedule = key,
            cron = %schedule.cron,
            timezone = %schedule.timezone,
            next = ?plan.next,
            "schedule armed"
        );
        self.armed.insert(
            key.to_string(),
            Armed {
                schedule,
                compiled,
                next: plan.next,
            },
        );
        if let Some(t) = plan.fire {
            self.fire(ctx, key, t, now);
        }
    }

    /// Move every tick due at `now` into `pending`.
    fn collect_due(&mut self, ctx: &Ctx, now: DateTime<Utc>) {
        let due_names: Vec<(String, DateTime<Utc>)> = self
            .armed
            .iter()
            .filter_map(|(n, a)| a.next.filter(|t| *t <= now).map(|t| (n.clone(), t)))
            .collect();
        for (name, planned) in due_names {
            let Some(a) = self.armed.get_mut(&name) else {
                continue;
            };
            let plan = due(&a.compiled, planned, now);
            a.next = plan.next;
            self.skipped(ctx, &name, plan.skipped);
            if let Some(t) = plan.fire {
                self.fire(ctx, &name, t, now);
            }
        }
    }

    /// The earliest moment something is due.
    fn wake_at(&self) -> Option<DateTime<Utc>> {
        let ticks = self.armed.values().filter_map(|a| a.next);
        let retries = self.pending.iter().map(|f| f.at);
        ticks.chain(retries).min()
    }
}

/// Publish one tick's task and wait for JetStream's ack.
async fn publish(js: &jetstream::Context, f: &Fire) -> Result<bool, String> {
    let msg = jetstream::message::PublishMessage::build()
        .payload(f.body.clone())
        .message_id(f.id.clone());
    let ack = js
        .send_publish(f.subject.clone(), msg)
        .await
        .map_err(|e| e.to_string())?;
    let ack = tokio::time::timeout(PUBLISH_TIMEOUT, ack)
        .await
        .map_err(|_| "no ack from JetStream in time".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(ack.duplicate)
}

/// Submit the pending ticks that are due at `now`; failed ones wait for another try.
async fn publish_due(ctx: &Ctx, state: &mut State, now: DateTime<Utc>) {
    let (ready, later): (Vec<Fire>, Vec<Fire>) = std::mem::take(&mut state.pending)
        .into_iter()
        .partition(|f| f.at <= now);
    state.pending = later;
    if ready.is_empty() {
        return;
    }
    let results = futures::future::join_all(ready.iter().map(|f| publish(&ctx.js, f))).await;
    for (mut f, r) in ready.into_iter().zip(results) {
        match r {
            Ok(duplicate) => {
                ctx.metrics
                    .schedule_fired
                    .get_or_create(&ScheduleLabel {
                        schedule: f.name.clone(),
                    })
                    .inc();
                debug!(schedule = %f.name, tick = %f.tick, task_id = %f.id, duplicate, "tick submitted");
            }
            Err(e) => {
                ctx.metrics.error("schedule_publish");
                let retry_at = Utc::now() + RETRY_AFTER;
                if retry_at <= f.until {
                    warn!(schedule = %f.name, task_id = %f.id, error = %e, "cannot submit a tick; trying again");
                    f.at = retry_at;
                    state.pending.push(f);
                } else {
                    warn!(schedule = %f.name, task_id = %f.id, error = %e, "cannot submit a tick; it is past its grace, skipping it");
                    state.skipped(ctx, &f.name, 1);
                }
            }
        }
    }
}

/// Follow the schedules bucket and fire ticks until shutdown.
pub(crate) async fn run(ctx: Arc<Ctx>, kv: kv::Store, shutdown: CancellationToken) {
    let mut state = State::default();
    while !shutdown.is_cancelled() {
        let mut watch = match kv.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot watch the schedules bucket; retrying");
                crate::pause(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let sleep = match state.wake_at() {
                Some(t) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                // Nothing planned: only the watch or shutdown can wake us.
                None => Duration::from_secs(3600),
            };
            let restart = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(sleep) => false,
                e = watch.next() => match e {
                    Some(Ok(entry)) => {
                        state.apply(&ctx, &entry, Utc::now());
                        false
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "schedules watch error; restarting the watch");
                        true
                    }
                    None => true,
                },
            };
            let now = Utc::now();
            state.collect_due(&ctx, now);
            publish_due(&ctx, &mut state, now).await;
            if restart {
                crate::pause(&shutdown, Duration::from_millis(250)).await;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskbus_proto::Limits;

    fn compiled(cron: &str, grace_s: u64) -> CompiledSchedule {
        let s: Schedule = serde_json::from_value(serde_json::json!({
            "cron": cron, "task": {"kind": "k"}, "misfire_grace_s": grace_s
        }))
        .unwrap();
        s.compile(&Limits::default()).unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn arming_catches_up_the_latest_tick_within_the_grace_only() {
        let hourly = compiled("0 * * * *", 60);
        let written = t("2025-01-01T08:15:00Z");
        // 30 s after the 10:00 tick: it fires, and 11:00 is next.
        assert_eq!(
            arm(&hourly, written, t("2025-01-01T10:00:30Z")),
            Plan {
                fire: Some(t("2025-01-01T10:00:00Z")),
                skipped: 0,
                next: Some(t("2025-01-01T11:00:00Z")),
            }
        );
        // 61 s after: too old; nothing fires (and the 09:00 tick never would).
        let p = arm(&hourly, written, t("2025-01-01T10:01:01Z"));
        assert_eq!(p.fire, None);
        assert_eq!(p.next, Some(t("2025-01-01T11:00:00Z")));
        // Exactly at a tick: that tick fires now.
        assert_eq!(
            arm(&hourly, written, t("2025-01-01T10:00:00Z")).fire,
            Some(t("2025-01-01T10:00:00Z"))
        );
        // An entry written (created, changed or resumed) after the tick: no catch-up, even
        // within the grace; the next tick is planned as usual.
        let p = arm(
            &hourly,
            t("2025-01-01T10:00:10Z"),
            t("2025-01-01T10:00:30Z"),
        );
        assert_eq!(p.fire, None);
        assert_eq!(p.next, Some(t("2025-01-01T11:00:00Z")));
    }

    #[test]
    fn a_late_wake_up_fires_only_the_latest_tick() {
        let minutely = compiled("* * * * *", 60);
        // On time (a few ms late).
        assert_eq!(
            due(
                &minutely,
                t("2025-01-01T10:00:00Z"),
                t("2025-01-01T10:00:00.004Z")
            ),
            Plan {
                fire: Some(t("2025-01-01T10:00:00Z")),
                skipped: 0,
                next: Some(t("2025-01-01T10:01:00Z")),
            }
        );
        // Stalled for 3.5 minutes: 10:00, 10:01 and 10:02 are skipped, 10:03 fires.
        assert_eq!(
            due(
                &minutely,
                t("2025-01-01T10:00:00Z"),
                t("2025-01-01T10:03:30Z")
            ),
            Plan {
                fire: Some(t("2025-01-01T10:03:00Z")),
                skipped: 3,
                next: Some(t("2025-01-01T10:04:00Z")),
            }
        );
        // An hourly tick reached 2 minutes late with a 60 s grace: skipped, nothing fires.
        let hourly = compiled("0 * * * *", 60);
        assert_eq!(
            due(
                &hourly,
                t("2025-01-01T10:00:00Z"),
                t("2025-01-01T10:02:00Z")
            ),
            Plan {
                fire: None,
                skipped: 1,
                next: Some(t("2025-01-01T11:00:00Z")),
            }
        );
        // A long grace lets the same late tick fire.
        let lenient = compiled("0 * * * *", 600);
        assert_eq!(
            due(
                &lenient,
                t("2025-01-01T10:00:00Z"),
                t("2025-01-01T10:02:00Z")
            )
            .fire,
            Some(t("2025-01-01T10:00:00Z"))
        );
        // Skips are counted up to a bound.
        let every_second = compiled("* * * * * *", 60);
        let p = due(
            &every_second,
            t("2025-01-01T00:00:00Z"),
            t("2025-01-02T00:00:00Z"),
        );
        assert_eq!(p.skipped, MAX_COUNTED_SKIPS);
        assert_eq!(p.fire, Some(t("2025-01-02T00:00:00Z")));
    }
}
