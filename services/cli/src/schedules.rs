//! `taskbus schedules`: recurring tasks in the JetStream KV bucket `<prefix>_schedules`.

use anyhow::{bail, Context};
use async_nats::jetstream::kv;
use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;
use taskbus_proto::schedule::{is_valid_schedule_name, DEFAULT_MISFIRE_GRACE_S};
use taskbus_proto::{Limits, Schedule, Subjects};

use crate::output;
use crate::task_flags::TaskFlags;

/// Cron syntax, shown by `taskbus schedules --help`.
pub const ABOUT: &str = "\
Recurring tasks (JetStream KV bucket taskbus_schedules). Every coordinator submits each tick's \
task under the id sched-<name>-<unix seconds>, so a tick runs once however many coordinators \
run.

Cron expressions have 5 fields, as in crontab and Kubernetes CronJob:

  ┌───────── minute        0-59
  │ ┌─────── hour          0-23
  │ │ ┌───── day of month  1-31, L (last), 15W (nearest weekday)
  │ │ │ ┌─── month         1-12 or JAN-DEC
  │ │ │ │ ┌─ day of week   0-7 or SUN-SAT (0 and 7 are Sunday), MON#2 (second Monday)
  * * * * *

or 6 with a seconds field (0-59) first. Each field takes *, lists (1,15), ranges (1-5) and \
steps (*/10, 8-18/2); @hourly, @daily, @weekly, @monthly and @yearly stand for whole \
expressions. Day of month and day of week match when either does (prefix the weekday with + \
to require both). Times are read in --timezone (an IANA name, default UTC), daylight saving \
included.

Example: every weekday at 06:30 Berlin time, in pool default:

  taskbus schedules set morning-report --cron '30 6 * * MON-FRI' --timezone Europe/Berlin \\
      --kind report --payload '{\"format\":\"pdf\"}'";

#[derive(clap::Subcommand, Debug)]
pub enum SchedulesCmd {
    /// Create a schedule or replace it entirely (checked before anything is written).
    Set(Box<SetArgs>),
    /// Every schedule with its next fire time.
    List {
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// One schedule and its next 5 fire times, in its time zone and in UTC.
    Get {
        name: String,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule; ticks stop at once (tasks already submitted still run).
    Delete { name: String },
    /// Stop firing a schedule until it is resumed.
    Pause { name: String },
    /// Fire a paused schedule again, from its next tick on (ticks missed while paused are not
    /// caught up).
    Resume { name: String },
}

#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// Schedule name: a DNS label (lower-case letters, digits, '-'; at most 63).
    pub name: String,
    /// Cron expression, 5 fields or 6 with seconds first, e.g. '0 3 * * *' or '*/10 * * * * *'.
    #[arg(long)]
    pub cron: String,
    /// IANA time zone the expression is read in, e.g. Europe/Berlin.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// What each tick submits.
    #[command(flatten)]
    pub task: TaskFlags,
    /// After a coordinator restart, fire the latest missed tick if it is at most this old.
    #[arg(long, default_value_t = DEFAULT_MISFIRE_GRACE_S)]
    pub misfire_grace_s: u64,
    /// Save the schedule paused (it fires nothing until `taskbus schedules resume`).
    #[arg(long)]
    pub paused: bool,
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if !is_valid_schedule_name(name) {
        bail!("{}", taskbus_proto::ScheduleError::Name(name.into()));
    }
    Ok(())
}

/// The schedule `set` would write, checked like a coordinator checks it.
pub fn build(a: &SetArgs) -> anyhow::Result<Schedule> {
    check_name(&a.name)?;
    let s = Schedule {
        cron: a.cron.clone(),
        timezone: a.timezone.clone(),
        pool: a.task.pool.clone(),
        task: a.task.envelope()?,
        paused: a.paused,
        misfire_grace_s: a.misfire_grace_s,
    };
    s.validate(&Limits::default())
        .map_err(|e| anyhow::anyhow!("invalid schedule {:?}: {e}", a.name))?;
    Ok(s)
}

/// Checks that need no server (so a refused command never connects, let alone writes).
pub fn check(cmd: &SchedulesCmd) -> anyhow::Result<()> {
    match cmd {
        SchedulesCmd::Set(a) => build(a).map(drop),
        SchedulesCmd::List { .. } => Ok(()),
        SchedulesCmd::Get { name, .. }
        | SchedulesCmd::Delete { name }
        | SchedulesCmd::Pause { name }
        | SchedulesCmd::Resume { name } => check_name(name),
    }
}

async fn bucket(client: &async_nats::Client, prefix: &str) -> anyhow::Result<kv::Store> {
    let js = async_nats::jetstream::new(client.clone());
    let name = Subjects::new(prefix).schedules_bucket();
    js.get_key_value(&name).await.with_context(|| {
        format!(
            "no schedules bucket {name}; start the coordinator (or `taskbus dev`) once to create it"
        )
    })
}

#[derive(Serialize)]
struct FireTime {
    local: String,
    utc: String,
}

#[derive(Serialize)]
struct Listed {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    schedule: Option<Schedule>,
    /// Why the entry is ignored by the coordinators.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Next fire times (none while paused or invalid).
    next: Vec<FireTime>,
}

fn describe(name: &str, bytes: &[u8], n: usize) -> Listed {
    let parsed = if is_valid_schedule_name(name) {
        Schedule::from_entry(bytes, &Limits::default()).map_err(|e| e.to_string())
    } else {
        Err(taskbus_proto::ScheduleError::Name(name.into()).to_string())
    };
    match parsed {
        Ok((s, c)) => {
            let next = if s.paused {
                vec![]
            } else {
                c.upcoming(Utc::now(), n)
                    .into_iter()
                    .map(|t| FireTime {
                        local: t.to_rfc3339(),
                        utc: t.with_timezone(&Utc).to_rfc3339(),
                    })
                    .collect()
            };
            Listed {
                name: name.into(),
                schedule: Some(s),
                error: None,
                next,
            }
        }
        Err(e) => Listed {
            name: name.into(),
            schedule: None,
            error: Some(e),
            next: vec![],
        },
    }
}

/// Read `name`, change `paused`, write it back unless someone wrote it meanwhile (then retry).
async fn set_paused(kv: &kv::Store, name: &str, paused: bool) -> anyhow::Result<()> {
    for _ in 0..5 {
        let Some(entry) = kv.entry(name).await? else {
            bail!("no schedule named {name:?}");
        };
        if entry.operation != kv::Operation::Put {
            bail!("no schedule named {name:?}");
        }
        let mut s: Schedule = Schedule::from_entry(&entry.value, &Limits::default())
            .map(|(s, _)| s)
            .map_err(|e| {
                anyhow::anyhow!(
                    "schedule {name:?} is invalid ({e}); replace it with `taskbus schedules set`"
                )
            })?;
        if s.paused == paused {
            return Ok(());
        }
        s.paused = paused;
        if kv
            .update(name, serde_json::to_vec(&s)?.into(), entry.revision)
            .await
            .is_ok()
        {
            return Ok(());
        }
    }
    bail!("schedule {name:?} kept changing while it was being updated; try again")
}

pub async fn run(
    client: &async_nats::Client,
    prefix: &str,
    cmd: SchedulesCmd,
) -> anyhow::Result<()> {
    check(&cmd)?;
    let kv = bucket(client, prefix).await?;
    match cmd {
        SchedulesCmd::Set(a) => {
            let s = build(&a)?;
            kv.put(&a.name, serde_json::to_vec(&s)?.into()).await?;
            let next = describe(&a.name, &serde_json::to_vec(&s)?, 1);
            match next.next.first() {
                Some(t) if !s.paused => {
                    println!(
                        "schedule {} saved; next tick {} ({})",
                        a.name, t.local, t.utc
                    )
                }
                _ => println!("schedule {} saved (paused)", a.name),
            }
            Ok(())
        }
        SchedulesCmd::List { json } => {
            let mut keys = kv.keys().await?;
            let mut names = Vec::new();
            while let Some(k) = keys.next().await {
                names.push(k?);
            }
            names.sort();
            let mut all = Vec::new();
            for name in names {
                if let Some(v) = kv.get(&name).await? {
                    all.push(describe(&name, &v, 1));
                }
            }
            if json {
                return output::json(&all);
            }
            if all.is_empty() {
                println!("no schedules");
                return Ok(());
            }
            println!(
                "{:<24} {:<20} {:<16} {:<12} {:<16} {:<7}  NEXT (UTC)",
                "NAME", "CRON", "TIMEZONE", "POOL", "KIND", "STATE"
            );
            for l in all {
                match l.schedule {
                    Some(s) => println!(
                        "{:<24} {:<20} {:<16} {:<12} {:<16} {:<7}  {}",
                        l.name,
                        s.cron,
                        s.timezone,
                        s.pool,
                        s.task.kind,
                        if s.paused { "paused" } else { "active" },
                        l.next.first().map(|t| t.utc.as_str()).unwrap_or("-"),
                    ),
                    None => println!(
                        "{:<24} invalid, ignored: {}",
                        l.name,
                        l.error.unwrap_or_default()
                    ),
                }
            }
            Ok(())
        }
        SchedulesCmd::Get { name, json } => {
            let Some(v) = kv.get(&name).await? else {
                bail!("no schedule named {name:?}");
            };
            let l = describe(&name, &v, 5);
            if json {
                return output::json(&l);
            }
            let Some(s) = l.schedule else {
                bail!(
                    "schedule {name:?} is invalid and ignored: {}",
                    l.error.unwrap_or_default()
                );
            };
            println!("name           {name}");
            println!(
                "state          {}",
                if s.paused { "paused" } else { "active" }
            );
            println!("cron           {}", s.cron);
            println!("timezone       {}", s.timezone);
            println!("pool           {}", s.pool);
            println!("misfire grace  {}s", s.misfire_grace_s);
            println!("task           {}", serde_json::to_string(&s.task)?);
            if s.paused {
                println!("next           (paused)");
            } else {
                println!("next fire times (local, UTC):");
                for t in l.next {
                    println!("  {}  {}", t.local, t.utc);
                }
            }
            Ok(())
        }
        SchedulesCmd::Delete { name } => {
            match kv.get(&name).await? {
                Some(_) => kv.delete(&name).await?,
                None => bail!("no schedule named {name:?}"),
            }
            println!("schedule {name} deleted");
            Ok(())
        }
        SchedulesCmd::Pause { name } => {
            set_paused(&kv, &name, true).await?;
            println!("schedule {name} paused");
            Ok(())
        }
        SchedulesCmd::Resume { name } => {
            set_paused(&kv, &name, false).await?;
            println!("schedule {name} resumed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use taskbus_proto::Priority;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SetArgs,
    }

    fn set(v: &[&str]) -> anyhow::Result<Schedule> {
        let t = T::try_parse_from(std::iter::once("t").chain(v.iter().copied()))?;
        build(&t.a)
    }

    #[test]
    fn set_flags_build_a_checked_schedule() {
        let s = set(&[
            "nightly",
            "--cron",
            "0 3 * * *",
            "--timezone",
            "Europe/Berlin",
            "--kind",
            "report",
            "--payload",
            r#"{"x":1}"#,
            "--priority",
            "low",
            "--label",
            "team=a",
            "--paused",
        ])
        .unwrap();
        assert_eq!(s.timezone, "Europe/Berlin");
        assert_eq!(s.task.payload["x"], 1);
        assert_eq!(s.task.priority, Some(Priority::Low));
        assert!(s.paused);
        let e = |v: &[&str]| set(v).unwrap_err().to_string();
        assert!(e(&["n", "--cron", "* * *", "--kind", "k"]).contains("cron"));
        assert!(e(&[
            "n",
            "--cron",
            "* * * * *",
            "--timezone",
            "Mars/Base",
            "--kind",
            "k"
        ])
        .contains("Mars/Base"));
        assert!(e(&[
            "n",
            "--cron",
            "* * * * *",
            "--kind",
            "k",
            "--payload",
            "{oops"
        ])
        .contains("--payload"));
        assert!(e(&["Bad_Name", "--cron", "* * * * *", "--kind", "k"]).contains("Bad_Name"));
        assert!(e(&[
            "n",
            "--cron",
            "* * * * *",
            "--kind",
            "k",
            "--max-attempts",
            "0"
        ])
        .contains("max_attempts"));
        assert!(e(&["n", "--cron", "* * * * *", "--kind", "k", "--price", "1"]).contains("payer"));
    }
}
