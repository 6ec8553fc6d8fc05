//! `taskbus submit`.

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use taskbus_proto::events::{Event, EventKind};
use taskbus_proto::{Subjects, TaskEnvelope};

use crate::task_flags::TaskFlags;

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub task: TaskFlags,
    /// Task id (idempotency key); a ULID is generated when absent.
    #[arg(long)]
    pub id: Option<String>,
    /// Not started by then ⇒ expired (RFC 3339, e.g. 2026-12-01T10:00:00Z, or +SECONDS).
    #[arg(long, value_parser = parse_time)]
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// Not handed to an agent before then (RFC 3339 or +SECONDS).
    #[arg(long, value_parser = parse_time)]
    pub not_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Wait for the outcome and print it (exit status 1 unless it succeeded).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, seconds.
    #[arg(long, default_value_t = 60)]
    pub wait_timeout: u64,
    /// Print the outcome event as JSON.
    #[arg(long)]
    pub json: bool,
}

/// RFC 3339, or `+N` seconds from now.
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Some(secs) = s.strip_prefix('+') {
        let n: i64 = secs
            .parse()
            .map_err(|_| format!("{s:?}: use +SECONDS or an RFC 3339 time"))?;
        if !(0..=365 * 86400).contains(&n) {
            return Err("+SECONDS must be between 0 and one year".into());
        }
        return Ok(chrono::Utc::now() + chrono::Duration::seconds(n));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 time ({e}); e.g. 2026-12-01T10:00:00Z or +60")
        })
}

pub fn build(args: &SubmitArgs) -> anyhow::Result<TaskEnvelope> {
    if !taskbus_proto::ids::is_valid_pool(&args.task.pool) {
        bail!(
            "pool {:?} is not a DNS label (lower-case letters, digits, '-')",
            args.task.pool
        );
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(taskbus_proto::ids::new_task_id);
    if !taskbus_proto::ids::is_valid_task_id(&id) {
        bail!("--id {id:?} must be 1 to 128 characters from A-Z a-z 0-9 _ -");
    }
    let mut env = args.task.envelope()?;
    env.id = Some(id);
    env.deadline = args.deadline;
    env.not_before = args.not_before;
    Ok(env)
}

pub async fn run(
    args: SubmitArgs,
    client: &async_nats::Client,
    prefix: &str,
) -> anyhow::Result<()> {
    let env = build(&args)?;
    let id = env.id.clone().unwrap_or_default();
    let subjects = Subjects::new(prefix);
    // Subscribe before publishing so the outcome cannot be missed.
    let mut events = if args.wait {
        Some(
            client
                .subscribe(subjects.task_events(&args.task.pool, &id))
                .await?,
        )
    } else {
        None
    };
    let js = async_nats::jetstream::new(client.clone());
    let ack = js
        .publish(subjects.submit(&args.task.pool), serde_json::to_vec(&env)?.into())
        .await
        .context("publish failed")?
        .await
        .context("JetStream did not acknowledge the task; is the coordinator (or `taskbus dev`) running so the streams exist?")?;
    if !args.wait {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "id": id, "stream_seq": ack.sequence })
            );
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    let Some(sub) = events.as_mut() else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_timeout);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .with_context(|| {
                format!(
                    "no outcome for task {id} within {} s (check `taskbus task get {id}`)",
                    args.wait_timeout
                )
            })?
            .context("subscription closed")?;
        let Ok(ev) = serde_json::from_slice::<Event>(&msg.payload) else {
            continue;
        };
        let kind = ev.kind();
        if !kind.is_terminal() {
            continue;
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&ev)?);
        } else {
            match &ev {
                Event::Succeeded(s) => println!(
                    "{id} succeeded on attempt {} by {}: {}",
                    s.attempt, s.agent_id, s.result
                ),
                Event::Rejected(r) => println!("{id} rejected ({}): {}", r.reason, r.message),
                Event::Dead(d) => {
                    println!("{id} dead after {} attempts: {}", d.attempts, d.last_error)
                }
                other => println!("{id} {}", other.kind().as_str()),
            }
        }
        if kind != EventKind::Succeeded {
            std::process::exit(1);
        }
        return Ok(());
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
        a: SubmitArgs,
    }

    fn args(v: &[&str]) -> Result<SubmitArgs, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(v.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn builds_envelopes_and_refuses_bad_flags() {
        let a = args(&[
            "--kind",
            "echo",
            "--payload",
            r#"{"x":1}"#,
            "--label",
            "team=a",
            "--priority",
            "high",
        ])
        .unwrap();
        let e = build(&a).unwrap();
        assert_eq!(e.payload["x"], 1);
        assert_eq!(e.priority, Some(Priority::High));
        assert_eq!(e.labels.unwrap()["team"], "a");
        assert!(args(&["--kind", "e", "--priority", "urgent"]).is_err());
        assert!(args(&["--kind", "e", "--label", "novalue"]).is_err());
        assert!(args(&["--kind", "e", "--max-attempts", "-1"]).is_err());
        assert!(args(&["--kind", "e", "--deadline", "tomorrow"]).is_err());
        assert!(args(&["--kind", "e", "--not-before", "+-5"]).is_err());
        assert!(args(&[
            "--kind",
            "e",
            "--not-before",
            "+30",
            "--deadline",
            "2030-01-01T00:00:00Z"
        ])
        .is_ok());
        assert!(build(&args(&["--kind", "e", "--payload", "{oops"]).unwrap()).is_err());
        assert!(build(&args(&["--kind", "e", "--id", "a b"]).unwrap()).is_err());
        assert!(build(&args(&["--kind", "e", "--pool", "Bad_Pool"]).unwrap()).is_err());
        assert!(
            build(&args(&["--kind", "e", "--payload", "@/nonexistent/file"]).unwrap()).is_err()
        );
    }
}
