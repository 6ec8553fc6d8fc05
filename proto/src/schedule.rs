//! Recurring tasks ("schedules"), stored as JSON in the JetStream KV bucket
//! `<prefix>_schedules` (key = schedule name). Every coordinator replica watches the bucket and,
//! at each tick of a schedule's cron expression, submits the schedule's task under the id
//! `sched-<name>-<unix seconds of the tick>`; JetStream's duplicate window and admission's
//! "an id is admitted at most once" turn the replicas' identical submissions into one task.
//!
//! Cron syntax (parsed by the `croner` crate): five fields `minute hour day-of-month month
//! day-of-week` as in crontab(5) and Kubernetes CronJob, or six with a seconds field first.
//! Lists (`1,15`), ranges (`1-5`), steps (`*/10`, `8-18/2`), month and weekday names
//! (`JAN`, `MON`; 0 and 7 are Sunday), the nicknames `@yearly`, `@monthly`, `@weekly`,
//! `@daily`, `@hourly`, and croner's extensions `L`, `W` and `#` are accepted; a year field is
//! not. Day-of-month and day-of-week combine with OR like Vixie cron (`+MON` makes it AND).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::TaskEnvelope;
use crate::ids::{is_valid_pool, MAX_TASK_ID_LEN};
use crate::validate::{validate as validate_task, Limits};

/// Ticks older than this many seconds are not caught up unless a schedule says otherwise.
pub const DEFAULT_MISFIRE_GRACE_S: u64 = 60;
/// Largest `misfire_grace_s` accepted (a week).
pub const MAX_MISFIRE_GRACE_S: u64 = 7 * 24 * 3600;
/// Longest cron expression accepted.
pub const MAX_CRON_LEN: usize = 200;
/// Longest time zone name accepted.
pub const MAX_TIMEZONE_LEN: usize = 64;
/// What a stored schedule may weigh on top of its task's message limit (cron, pool, …).
pub const ENTRY_OVERHEAD_BYTES: usize = 4096;

/// A recurring task. Only `cron` and `task` are required; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "taskbus schedule")]
pub struct Schedule {
    /// Cron expression: `minute hour day-of-month month day-of-week`, or six fields with
    /// seconds first (e.g. `*/10 * * * * *`). Evaluated in `timezone`.
    pub cron: String,
    /// IANA time zone the cron expression is read in, e.g. `Europe/Berlin`.
    #[serde(default = "utc")]
    pub timezone: String,
    /// Pool the task is submitted to (a DNS label).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// The task submitted at each tick: a task envelope without `id` (generated per tick:
    /// `sched-<name>-<unix seconds>`), `deadline` or `not_before`.
    pub task: TaskEnvelope,
    /// A paused schedule fires nothing until resumed.
    #[serde(default)]
    pub paused: bool,
    /// After a coordinator restart, the latest missed tick still fires when it is at most this
    /// many seconds old (and not older than the entry); older ticks are skipped. 1 to 604800.
    #[serde(default = "default_grace")]
    pub misfire_grace_s: u64,
}

fn utc() -> String {
    "UTC".into()
}
fn default_pool() -> String {
    "default".into()
}
fn default_grace() -> u64 {
    DEFAULT_MISFIRE_GRACE_S
}

/// Why a schedule (or a bucket entry claiming to be one) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "schedule name {0:?} is not allowed: use 1 to 63 lower-case letters, digits and '-', \
         starting and ending with a letter or digit"
    )]
    Name(String),
    #[error("the schedule is {size} bytes, at most {max} are allowed")]
    TooLarge { size: usize, max: usize },
    #[error("the schedule is not a valid schedule object: {0}")]
    Json(String),
    #[error("cron expression {cron:?} is invalid: {reason}")]
    Cron { cron: String, reason: String },
    #[error("timezone {0:?} is not a known IANA time zone name (such as UTC or Europe/Berlin)")]
    Timezone(String),
    #[error(
        "pool {0:?} is not a valid pool name (a DNS label: lower-case letters, digits and '-')"
    )]
    Pool(String),
    #[error("task: {0}")]
    Task(String),
    #[error("misfire_grace_s must be between 1 and {MAX_MISFIRE_GRACE_S}, got {0}")]
    MisfireGrace(u64),
}

/// A schedule name is a DNS label, like a pool: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn is_valid_schedule_name(name: &str) -> bool {
    is_valid_pool(name)
}

/// The task id of a schedule's tick: `sched-<name>-<unix seconds>`. Every replica computes the
/// same id for the same tick, which is what makes a tick run once.
pub fn tick_task_id(name: &str, tick: DateTime<Utc>) -> String {
    format!("sched-{name}-{}", tick.timestamp())
}

/// A checked schedule, ready to compute fire times.
#[derive(Debug, Clone)]
pub struct CompiledSchedule {
    cron: Cron,
    tz: Tz,
    /// The misfire grace.
    pub grace: chrono::Duration,
}

impl CompiledSchedule {
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The latest tick at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The next `n` ticks after `t`, in the schedule's time zone.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next_after(at) {
                Some(next) => {
                    out.push(next.with_timezone(&self.tz));
                    at = next;
                }
                None => break,
            }
        }
        out
    }
}

/// Parse a cron expression the way schedules read it: 5 fields, or 6 with seconds first.
pub fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    let bad = |reason: String| ScheduleError::Cron {
        cron: expr.chars().take(MAX_CRON_LEN).collect(),
        reason,
    };
    if expr.len() > MAX_CRON_LEN {
        return Err(bad(format!("longer than {MAX_CRON_LEN} characters")));
    }
    let trimmed = expr.trim();
    let fields = trimmed.split_whitespace().count();
    if !trimmed.starts_with('@') && !(5..=6).contains(&fields) {
        return Err(bad(format!(
            "it has {fields} fields; use 5 (minute hour day-of-month month day-of-week, \
             e.g. \"30 2 * * MON-FRI\") or 6 with seconds first (e.g. \"*/10 * * * * *\")"
        )));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| bad(e.to_string()))?;
    // A pattern such as "0 0 30 2 *" parses but never matches.
    if cron
        .find_next_occurrence(&Utc::now().with_timezone(&Tz::UTC), false)
        .is_err()
    {
        return Err(bad("it never fires (no such date)".into()));
    }
    Ok(cron)
}

/// Parse an IANA time zone name.
pub fn parse_timezone(name: &str) -> Result<Tz, ScheduleError> {
    if name.is_empty() || name.len() > MAX_TIMEZONE_LEN {
        return Err(ScheduleError::Timezone(
            name.chars().take(MAX_TIMEZONE_LEN).collect(),
        ));
    }
    name.parse::<Tz>()
        .map_err(|_| ScheduleError::Timezone(name.to_string()))
}

impl Schedule {
    /// Read a bucket entry: size bound, JSON with no unknown fields, then [`Schedule::compile`].
    pub fn from_entry(
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<(Schedule, CompiledSchedule), ScheduleError> {
        let max = limits
            .max_message_bytes
            .saturating_add(ENTRY_OVERHEAD_BYTES);
        if bytes.len() > max {
            return Err(ScheduleError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        let s: Schedule =
            serde_json::from_slice(bytes).map_err(|e| ScheduleError::Json(e.to_string()))?;
        let c = s.compile(limits)?;
        Ok((s, c))
    }

    /// Check everything a coordinator needs to fire this schedule: the cron expression parses
    /// and fires at some time, the time zone is known, the pool is a valid name, the grace is
    /// in range, and the task is an envelope that admission would accept under `limits` (no
    /// `id`, `deadline` or `not_before`: those are per tick).
    pub fn validate(&self, limits: &Limits) -> Result<(), ScheduleError> {
        self.compile(limits).map(drop)
    }

    /// [`Schedule::validate`], keeping the parsed cron expression and time zone.
    pub fn compile(&self, limits: &Limits) -> Result<CompiledSchedule, ScheduleError> {
        let cron = parse_cron(&self.cron)?;
        let tz = parse_timezone(&self.timezone)?;
        if !is_valid_pool(&self.pool) {
            return Err(ScheduleError::Pool(
                self.pool.chars().take(64).collect::<String>(),
            ));
        }
        if self.misfire_grace_s == 0 || self.misfire_grace_s > MAX_MISFIRE_GRACE_S {
            return Err(ScheduleError::MisfireGrace(self.misfire_grace_s));
        }
        let t = &self.task;
        if t.id.is_some() {
            return Err(ScheduleError::Task(
                "id must not be set: each tick's task is named sched-<name>-<unix seconds>".into(),
            ));
        }
        if t.deadline.is_some() || t.not_before.is_some() {
            return Err(ScheduleError::Task(
                "deadline and not_before are points in time and cannot recur; leave them out"
                    .into(),
            ));
        }
        // Check the task as admission will see it, with the longest id a tick can have, so a
        // schedule that passes here is never rejected at admission for its shape or size.
        let mut probe = t.clone();
        probe.id = Some(format!("sched-{}", "x".repeat(MAX_TASK_ID_LEN - 6)));
        let body = serde_json::to_vec(&probe).map_err(|e| ScheduleError::Task(e.to_string()))?;
        validate_task(&body, &self.pool, limits, |_| true, String::new)
            .map_err(|r| ScheduleError::Task(r.message))?;
        Ok(CompiledSchedule {
            cron,
            tz,
            grace: chrono::Duration::seconds(self.misfire_grace_s as i64),
        })
    }

    /// The envelope submitted for the tick at `tick`.
    pub fn tick_envelope(&self, name: &str, tick: DateTime<Utc>) -> TaskEnvelope {
        let mut env = self.task.clone();
        env.id = Some(tick_task_id(name, tick));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sched(json: serde_json::Value) -> Result<(Schedule, CompiledSchedule), ScheduleError> {
        Schedule::from_entry(&serde_json::to_vec(&json).unwrap(), &Limits::default())
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn defaults_and_round_trip() {
        let (s, _) =
            sched(serde_json::json!({"cron": "*/5 * * * *", "task": {"kind": "k"}})).unwrap();
        assert_eq!(s.timezone, "UTC");
        assert_eq!(s.pool, "default");
        assert!(!s.paused);
        assert_eq!(s.misfire_grace_s, 60);
        let back: Schedule = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn five_and_six_fields() {
        let (_, c) =
            sched(serde_json::json!({"cron": "30 2 * * *", "task": {"kind": "k"}})).unwrap();
        assert_eq!(
            c.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2025-01-01T02:30:00Z"))
        );
        let (_, c) =
            sched(serde_json::json!({"cron": "*/10 * * * * *", "task": {"kind": "k"}})).unwrap();
        assert_eq!(
            c.next_after(utc("2025-01-01T00:00:00Z")),
            Some(utc("2025-01-01T00:00:10Z"))
        );
        // Strictly after, also from a fraction of a second past a tick.
        let t = utc("2025-01-01T00:00:10.5Z");
        assert_eq!(c.next_after(t), Some(utc("2025-01-01T00:00:20Z")));
        assert_eq!(c.latest_at_or_before(t), Some(utc("2025-01-01T00:00:10Z")));
        assert_eq!(
            c.latest_at_or_before(utc("2025-01-01T00:00:10Z")),
            Some(utc("2025-01-01T00:00:10Z"))
        );
        let (_, c) = sched(serde_json::json!({"cron": "@hourly", "task": {"kind": "k"}})).unwrap();
        assert_eq!(
            c.next_after(utc("2025-01-01T00:10:00Z")),
            Some(utc("2025-01-01T01:00:00Z"))
        );
    }

    /// Europe/Berlin springs forward on 2025-03-30 (02:00 CET → 03:00 CEST) and falls back on
    /// 2025-10-26 (03:00 CEST → 02:00 CET).
    #[test]
    fn daylight_saving_time_in_berlin() {
        let daily = |cron: &str| {
            sched(serde_json::json!({"cron": cron, "timezone": "Europe/Berlin", "task": {"kind": "k"}}))
                .unwrap()
                .1
        };
        // 09:00 local is 08:00 UTC in winter and 07:00 UTC in summer.
        let nine = daily("0 9 * * *");
        assert_eq!(
            nine.upcoming(utc("2025-03-29T00:00:00Z"), 2)
                .iter()
                .map(|d| d.with_timezone(&Utc))
                .collect::<Vec<_>>(),
            [utc("2025-03-29T08:00:00Z"), utc("2025-03-30T07:00:00Z")]
        );
        // 02:30 does not exist on the spring-forward day: it runs once, right after the gap.
        let half_past_two = daily("30 2 * * *");
        let ticks: Vec<_> = half_past_two
            .upcoming(utc("2025-03-29T12:00:00Z"), 2)
            .iter()
            .map(|d| d.with_timezone(&Utc))
            .collect();
        assert_eq!(
            ticks,
            [utc("2025-03-30T01:00:00Z"), utc("2025-03-31T00:30:00Z")]
        );
        // 02:30 happens twice on the fall-back day: a fixed-time schedule runs once.
        let ticks: Vec<_> = half_past_two
            .upcoming(utc("2025-10-25T12:00:00Z"), 2)
            .iter()
            .map(|d| d.with_timezone(&Utc))
            .collect();
        assert_eq!(
            ticks,
            [utc("2025-10-26T00:30:00Z"), utc("2025-10-27T01:30:00Z")]
        );
        // Shown in the schedule's zone with its offset.
        let berlin = nine.upcoming(utc("2025-03-29T00:00:00Z"), 2);
        assert_eq!(berlin[0].to_rfc3339(), "2025-03-29T09:00:00+01:00");
        assert_eq!(berlin[1].to_rfc3339(), "2025-03-30T09:00:00+02:00");
        assert_eq!(
            nine.timezone()
                .with_ymd_and_hms(2025, 3, 30, 9, 0, 0)
                .unwrap()
                .with_timezone(&Utc),
            utc("2025-03-30T07:00:00Z")
        );
    }

    #[test]
    fn every_refusal_names_its_problem() {
        let err = |json: serde_json::Value| sched(json).unwrap_err().to_string();
        let task = serde_json::json!({"kind": "k"});
        assert!(err(serde_json::json!({"cron": "61 * * * *", "task": task})).contains("cron"));
        assert!(err(serde_json::json!({"cron": "* * *", "task": task})).contains("3 fields"));
        assert!(
            err(serde_json::json!({"cron": "0 0 0 1 1 * 2030", "task": task})).contains("7 fields")
        );
        assert!(err(serde_json::json!({"cron": "0 0 30 2 *", "task": task})).contains("never"));
        assert!(err(
            serde_json::json!({"cron": "* * * * *", "timezone": "Mars/Base", "task": task})
        )
        .contains("Mars/Base"));
        assert!(
            err(serde_json::json!({"cron": "* * * * *", "pool": "Bad_Pool", "task": task}))
                .contains("Bad_Pool")
        );
        assert!(
            err(serde_json::json!({"cron": "* * * * *", "misfire_grace_s": 0, "task": task}))
                .contains("misfire_grace_s")
        );
        assert!(
            err(serde_json::json!({"cron": "* * * * *", "task": task, "bogus": 1}))
                .contains("unknown field")
        );
        assert!(err(serde_json::json!({"cron": "* * * * *"})).contains("missing field"));
        assert!(
            err(serde_json::json!({"cron": "* * * * *", "task": {"kind": "k", "id": "x"}}))
                .contains("id must not be set")
        );
        assert!(err(serde_json::json!({"cron": "* * * * *", "task": {"kind": "k", "not_before": "2030-01-01T00:00:00Z"}}))
            .contains("not_before"));
        assert!(err(
            serde_json::json!({"cron": "* * * * *", "task": {"kind": "k", "max_attempts": 0}})
        )
        .contains("max_attempts"));
        assert!(
            err(serde_json::json!({"cron": "* * * * *", "task": {"kind": "k", "bogus": 1}}))
                .contains("unknown field")
        );
        // A payload just under the entry bound still breaks the task's message limit.
        let big = "x".repeat(Limits::default().max_message_bytes);
        assert!(err(
            serde_json::json!({"cron": "* * * * *", "task": {"kind": "k", "payload": big}})
        )
        .contains("limit"));
        let huge = "x".repeat(Limits::default().max_message_bytes + ENTRY_OVERHEAD_BYTES);
        assert!(err(
            serde_json::json!({"cron": "* * * * *", "task": {"kind": "k", "payload": huge}})
        )
        .contains("bytes"));
        let e = Schedule::from_entry(b"not json", &Limits::default()).unwrap_err();
        assert!(matches!(e, ScheduleError::Json(_)), "{e}");
    }

    #[test]
    fn names_and_ids() {
        assert!(is_valid_schedule_name("nightly-report"));
        for bad in ["", "Nightly", "a_b", "-a", "a.b", &"a".repeat(64)] {
            assert!(!is_valid_schedule_name(bad), "{bad:?}");
        }
        let longest = tick_task_id(&"a".repeat(63), utc("9999-12-31T23:59:59Z"));
        assert!(crate::ids::is_valid_task_id(&longest), "{longest}");
        assert_eq!(
            tick_task_id("n", utc("2025-01-01T00:00:00Z")),
            "sched-n-1735689600"
        );
    }
}
