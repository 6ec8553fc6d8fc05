//! How long finished tasks keep their record in PostgreSQL.
//!
//! By default every record is kept forever, which is what lets the coordinator refuse a task id
//! it has seen before at any time. With a retention set, the maintenance pass deletes the
//! records of finished tasks (succeeded, cancelled, expired, rejected) and, separately, of dead
//! ones once they are older than their retention, a few thousand a second at most. A deleted
//! task's id is forgotten: a message with that id is admitted and run again, except a priced
//! one, which the ledger refuses (it keeps every hold). Open tasks are never deleted, nor a
//! finished one whose terminal event the outbox has still to send.

use std::time::Duration;

use chrono::Utc;

use crate::metrics::StatusLabel;
use crate::{store, Ctx};

/// The statuses `--finished-retention` deletes.
pub const FINISHED_STATUSES: [&str; 4] = ["succeeded", "cancelled", "expired", "rejected"];
/// The status `--dead-retention` deletes (the dead-letter queue).
pub const DEAD_STATUSES: [&str; 1] = ["dead"];

/// The shortest retention the command line accepts. Shorter, a task's late or redelivered
/// messages (redeliveries, JetStream's 2-minute duplicate window) could outlive its record.
pub const MIN_RETENTION: Duration = Duration::from_secs(10 * 60);

/// Rows deleted per statement, and statements per pass at most: a pass deletes up to
/// 20,000 records, enough to keep up with 20,000 finished tasks a second.
const BATCH: i64 = 2_000;
const BATCHES_PER_PASS: usize = 10;

/// Retention of finished task records; `None` keeps them forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Succeeded, cancelled, expired and rejected tasks, counted from when they finished.
    pub finished: Option<Duration>,
    /// Dead tasks, counted from when they died. Deleted, they can no longer be replayed.
    pub dead: Option<Duration>,
}

impl Retention {
    /// Every retention set, with the statuses it deletes.
    fn rules(&self) -> impl Iterator<Item = (&'static [&'static str], Duration)> {
        [
            (&FINISHED_STATUSES[..], self.finished),
            (&DEAD_STATUSES[..], self.dead),
        ]
        .into_iter()
        .filter_map(|(statuses, keep)| keep.map(|k| (statuses, k)))
    }

    /// The shortest retention set, if any.
    pub fn shortest(&self) -> Option<Duration> {
        self.rules().map(|(_, keep)| keep).min()
    }
}

/// Parse a retention from the command line: a duration such as `7d`, `36h` or `90min`, at least
/// [`MIN_RETENTION`].
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    duration_at_least(
        s,
        MIN_RETENTION,
        "7d, 36h or 90min",
        "a finished task's late messages could outlive its record; leave the option out to \
         keep records forever",
    )
}

/// Parse a duration flag such as `7d` or `90s` that must be at least `min`; `examples` go into
/// the error for text that is not a duration, `why` into the one for a value under `min`.
pub(crate) fn duration_at_least(
    s: &str,
    min: Duration,
    examples: &str,
    why: &str,
) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write a number and a unit, e.g. {examples}")
    })?;
    if d < min {
        return Err(format!(
            "{s:?} is shorter than the minimum of {}: {why}",
            humantime::format_duration(min)
        ));
    }
    Ok(d)
}

/// Delete the records whose retention has run out (one maintenance pass).
pub(crate) async fn prune(ctx: &Ctx) -> Result<(), sqlx::Error> {
    for (statuses, keep) in ctx.retention.rules() {
        let Ok(keep) = chrono::Duration::from_std(keep) else {
            continue; // longer than chrono can count: nothing is that old
        };
        let before = Utc::now() - keep;
        for _ in 0..BATCHES_PER_PASS {
            let deleted = store::prune(&ctx.db, statuses, before, BATCH).await?;
            for status in &deleted {
                ctx.metrics
                    .pruned
                    .get_or_create(&StatusLabel {
                        status: status.clone(),
                    })
                    .inc();
            }
            if (deleted.len() as i64) < BATCH {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retentions_parse_with_units_and_refuse_bad_or_tiny_values() {
        for (input, secs) in [
            ("7d", 7 * 86_400),
            ("36h", 36 * 3_600),
            ("90min", 5_400),
            (" 10m ", 600),
            ("1day 12h", 129_600),
        ] {
            assert_eq!(
                parse_retention(input),
                Ok(Duration::from_secs(secs)),
                "{input}"
            );
        }
        for bad in [
            "",
            "7",
            "seven days",
            "-1d",
            "1x",
            "1d;DROP TABLE",
            "9min",
            "0s",
        ] {
            let e = parse_retention(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_retention("5m")
            .unwrap_err()
            .contains("minimum of 10m"));
        assert!(parse_retention("99999999999999999999d").is_err());
    }

    #[test]
    fn only_the_retentions_set_apply() {
        let none = Retention::default();
        assert_eq!(none.rules().count(), 0);
        assert_eq!(none.shortest(), None);
        let r = Retention {
            finished: Some(Duration::from_secs(3_600)),
            dead: Some(Duration::from_secs(600)),
        };
        let rules: Vec<_> = r.rules().collect();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].0, &FINISHED_STATUSES[..]);
        assert_eq!(rules[1].0, &DEAD_STATUSES[..]);
        assert_eq!(r.shortest(), Some(Duration::from_secs(600)));
    }
}
