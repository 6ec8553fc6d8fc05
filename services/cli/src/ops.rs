//! Operator commands: cancel, dead letters, agents, pools.

use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use taskbus_proto::api::{AgentInfo, DlqReplay, ReplayResult, TaskCancel, TaskRecord};
use taskbus_proto::{PoolSettings, Subjects};

use crate::{api, output};

#[derive(clap::Subcommand, Debug)]
pub enum DlqCmd {
    /// Dead tasks (attempts exhausted), newest first.
    List {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Re-admit dead tasks with a fresh set of attempts: the IDs given, or every dead task
    /// (of --pool) when none are given.
    Replay {
        /// Task ids (default: all dead tasks of --pool, or of every pool).
        ids: Vec<String>,
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentsCmd {
    /// Agents from their heartbeats and outcomes, with health, breaker state and reputation.
    List {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum PoolsCmd {
    /// Every pool and its settings.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create a pool or change its settings (unnamed settings keep their value). Services pick
    /// changes up at once, without a restart.
    Set(PoolSetArgs),
    /// Remove a pool (tasks for it are then rejected with unknown_pool).
    Delete { pool: String },
}

#[derive(clap::Args, Debug)]
pub struct PoolSetArgs {
    /// Pool name (DNS label).
    pub pool: String,
    /// Replace all settings with this JSON object (see proto/schema/pool-settings.schema.json).
    #[arg(long)]
    pub json: Option<String>,
    #[arg(long)]
    pub min_replicas: Option<u32>,
    #[arg(long)]
    pub max_replicas: Option<u32>,
    #[arg(long)]
    pub target_per_replica: Option<u32>,
    /// Backlog latency the scaler aims for, seconds.
    #[arg(long)]
    pub target_latency_s: Option<f64>,
    /// Lease of a work message, ms (agents extend it while working).
    #[arg(long)]
    pub ack_wait_ms: Option<u64>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    #[arg(long)]
    pub retry_base_ms: Option<u64>,
    #[arg(long)]
    pub retry_max_ms: Option<u64>,
    /// Consecutive failures before an agent pauses (0 = never).
    #[arg(long)]
    pub breaker_threshold: Option<u32>,
    #[arg(long)]
    pub breaker_cooldown_ms: Option<u64>,
    /// Most running tasks per payer (0 = unlimited).
    #[arg(long)]
    pub fairness_limit: Option<u32>,
    /// Freeze window FROM-TO[@TZ][:DAYS], e.g. 23:00-02:00@Europe/Berlin:1,2,3,4,5 (repeatable;
    /// replaces the list; `none` clears it).
    #[arg(long = "freeze")]
    pub freeze: Vec<String>,
    #[arg(long)]
    pub gpus: Option<u32>,
}

pub async fn cancel(
    client: &async_nats::Client,
    prefix: &str,
    id: String,
    reason: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let t: TaskRecord =
        api::call(client, prefix, "task.cancel", &TaskCancel { id, reason }).await?;
    if json {
        output::json(&t)
    } else {
        println!("{} cancelled", t.id);
        Ok(())
    }
}

pub async fn dlq(client: &async_nats::Client, prefix: &str, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List { pool, limit, json } => {
            let ts = api::tasks_list(client, prefix, pool, Some("dead".into()), limit).await?;
            if json {
                output::json(&ts)
            } else {
                output::task_table(&ts);
                Ok(())
            }
        }
        DlqCmd::Replay { ids, pool, json } => {
            // Ids go in chunks so the bar moves and no request is huge.
            let total = if ids.is_empty() {
                api::tasks_list(client, prefix, pool.clone(), Some("dead".into()), 1000)
                    .await?
                    .len()
            } else {
                ids.len()
            };
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("replaying [{bar:40}] {pos}/{len}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            let mut result = ReplayResult::default();
            if ids.is_empty() {
                loop {
                    let r: ReplayResult = api::call(
                        client,
                        prefix,
                        "dlq.replay",
                        &DlqReplay {
                            pool: pool.clone(),
                            ids: vec![],
                            limit: Some(100),
                        },
                    )
                    .await?;
                    bar.inc(r.replayed.len() as u64);
                    let n = r.replayed.len();
                    result.replayed.extend(r.replayed);
                    if n < 100 || result.replayed.len() >= 1_000_000 {
                        break;
                    }
                }
            } else {
                for chunk in ids.chunks(100) {
                    let r: ReplayResult = api::call(
                        client,
                        prefix,
                        "dlq.replay",
                        &DlqReplay {
                            pool: pool.clone(),
                            ids: chunk.to_vec(),
                            limit: Some(100),
                        },
                    )
                    .await?;
                    bar.inc(chunk.len() as u64);
                    result.replayed.extend(r.replayed);
                    result.skipped.extend(r.skipped);
                }
            }
            bar.finish_and_clear();
            if json {
                return output::json(&result);
            }
            println!("replayed {} task(s)", result.replayed.len());
            if !result.skipped.is_empty() {
                println!(
                    "skipped (not dead or unknown): {}",
                    result.skipped.join(" ")
                );
            }
            Ok(())
        }
    }
}

pub async fn agents(
    client: &async_nats::Client,
    prefix: &str,
    cmd: AgentsCmd,
) -> anyhow::Result<()> {
    let AgentsCmd::List { pool, json } = cmd;
    let mut list: Vec<AgentInfo> =
        api::call(client, prefix, "agents.list", &serde_json::json!({})).await?;
    if let Some(p) = &pool {
        list.retain(|a| &a.pool == p);
    }
    if json {
        return output::json(&list);
    }
    if list.is_empty() {
        println!("no agents");
        return Ok(());
    }
    println!(
        "{:<28} {:<12} {:<8} {:<9} {:>9} {:>8} {:>8} {:>9} {:>10}",
        "AGENT", "POOL", "HEALTH", "BREAKER", "IN FLIGHT", "OK", "FAILED", "SUCCESS%", "REPUTATION"
    );
    for a in list {
        println!(
            "{:<28} {:<12} {:<8} {:<9} {:>4}/{:<4} {:>8} {:>8} {:>8.1}% {:>10}",
            a.agent_id,
            a.pool,
            a.health,
            a.breaker,
            a.in_flight,
            a.capacity,
            a.successes,
            a.failures,
            a.success_rate * 100.0,
            a.reputation
        );
    }
    Ok(())
}

async fn bucket(
    client: &async_nats::Client,
    prefix: &str,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let js = async_nats::jetstream::new(client.clone());
    let name = Subjects::new(prefix).pools_bucket();
    js.get_key_value(&name).await.with_context(|| {
        format!(
            "no pools bucket {name}; start the coordinator (or `taskbus dev`) once to create it"
        )
    })
}

pub async fn pools(client: &async_nats::Client, prefix: &str, cmd: PoolsCmd) -> anyhow::Result<()> {
    use futures::StreamExt;
    let kv = bucket(client, prefix).await?;
    match cmd {
        PoolsCmd::List { json } => {
            let mut keys = kv.keys().await?;
            let mut all = std::collections::BTreeMap::new();
            while let Some(k) = keys.next().await {
                let k = k?;
                if let Some(v) = kv.get(&k).await? {
                    let s: PoolSettings = serde_json::from_slice(&v).unwrap_or_default();
                    all.insert(k, s);
                }
            }
            if json {
                return output::json(&all);
            }
            println!(
                "{:<20} {:>5} {:>5} {:>7} {:>8} {:>9} {:>8} {:>8}  FREEZE",
                "POOL", "MIN", "MAX", "TARGET", "ATTEMPTS", "ACK WAIT", "BREAKER", "FAIRNESS"
            );
            for (name, s) in all {
                let freeze: Vec<String> = s
                    .freeze_windows
                    .iter()
                    .map(|w| format!("{}-{}@{}", w.from, w.to, w.tz))
                    .collect();
                println!(
                    "{:<20} {:>5} {:>5} {:>7} {:>8} {:>8}ms {:>8} {:>8}  {}",
                    name,
                    s.min_replicas,
                    s.max_replicas,
                    s.target_per_replica,
                    s.max_attempts,
                    s.ack_wait_ms,
                    s.breaker_threshold,
                    s.fairness_limit,
                    freeze.join(" ")
                );
            }
            Ok(())
        }
        PoolsCmd::Delete { pool } => {
            kv.delete(&pool).await?;
            println!("pool {pool} deleted");
            Ok(())
        }
        PoolsCmd::Set(a) => {
            let current = match kv.get(&a.pool).await? {
                Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
                None => PoolSettings::default(),
            };
            let s = apply(current, &a)?;
            kv.put(&a.pool, serde_json::to_vec(&s)?.into()).await?;
            println!("pool {} saved: {}", a.pool, serde_json::to_string(&s)?);
            Ok(())
        }
    }
}

/// Merge the flags into `s` and validate the result.
pub fn apply(mut s: PoolSettings, a: &PoolSetArgs) -> anyhow::Result<PoolSettings> {
    if !taskbus_proto::ids::is_valid_pool(&a.pool) {
        bail!(
            "pool {:?} is not a DNS label (lower-case letters, digits, '-', at most 63)",
            a.pool
        );
    }
    if let Some(j) = &a.json {
        s = serde_json::from_str(j).context("--json is not a valid pool settings object")?;
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { s.$f = v; } )* };
    }
    set!(
        min_replicas,
        max_replicas,
        target_per_replica,
        target_latency_s,
        ack_wait_ms,
        max_attempts,
        retry_base_ms,
        retry_max_ms,
        breaker_threshold,
        breaker_cooldown_ms,
        fairness_limit,
        gpus
    );
    if !a.freeze.is_empty() {
        s.freeze_windows.clear();
        for f in a.freeze.iter().filter(|f| f.as_str() != "none") {
            s.freeze_windows.push(parse_freeze(f)?);
        }
    }
    s.validate()
        .map_err(|e| anyhow::anyhow!("invalid pool settings: {e}"))?;
    Ok(s)
}

/// `FROM-TO[@TZ][:DAYS]`
fn parse_freeze(f: &str) -> anyhow::Result<taskbus_proto::pool::FreezeWindow> {
    let (rest, days) = match f.rsplit_once(':') {
        Some((r, d))
            if !d.is_empty()
                && d.chars().all(|c| c.is_ascii_digit() || c == ',')
                && r.contains('-')
                && r.len() >= 11 =>
        {
            (r, d)
        }
        _ => (f, ""),
    };
    let (times, tz) = rest.split_once('@').unwrap_or((rest, "UTC"));
    let Some((from, to)) = times.split_once('-') else {
        bail!("freeze window {f:?} must look like 23:00-02:00@Europe/Berlin:1,2,3,4,5");
    };
    let weekdays = if days.is_empty() {
        vec![]
    } else {
        days.split(',')
            .map(|d| d.parse::<u8>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad weekdays in {f:?}"))?
    };
    Ok(taskbus_proto::pool::FreezeWindow {
        from: from.into(),
        to: to.into(),
        tz: tz.into(),
        weekdays,
    })
}

/// Poll a task until it leaves `status` (used by tests of the CLI through the API).
#[allow(dead_code)]
pub async fn wait_not(
    client: &async_nats::Client,
    prefix: &str,
    id: &str,
    status: &str,
    timeout: Duration,
) -> anyhow::Result<TaskRecord> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let t = api::task_get(client, prefix, id).await?;
        if t.status != status || tokio::time::Instant::now() > end {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: PoolSetArgs,
    }

    fn set(v: &[&str]) -> anyhow::Result<PoolSettings> {
        let t = T::try_parse_from(std::iter::once("t").chain(v.iter().copied()))?;
        apply(PoolSettings::default(), &t.a)
    }

    #[test]
    fn pool_flags_merge_and_validate() {
        let s = set(&[
            "gpu",
            "--min-replicas",
            "1",
            "--max-replicas",
            "4",
            "--freeze",
            "23:00-02:00@Europe/Berlin:1,2,3,4,5",
        ])
        .unwrap();
        assert_eq!((s.min_replicas, s.max_replicas), (1, 4));
        assert_eq!(s.freeze_windows[0].tz, "Europe/Berlin");
        assert_eq!(s.freeze_windows[0].weekdays, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            set(&["p", "--freeze", "08:00-09:30"])
                .unwrap()
                .freeze_windows[0]
                .to,
            "09:30"
        );
        assert!(set(&["p", "--min-replicas", "5", "--max-replicas", "2"]).is_err());
        assert!(set(&["p", "--freeze", "25:00-01:00"]).is_err());
        assert!(set(&["p", "--freeze", "garbage"]).is_err());
        assert!(set(&["Bad_Pool"]).is_err());
        assert!(set(&["p", "--json", "{\"nope\":1}"]).is_err());
        assert!(set(&["p", "--json", "not json"]).is_err());
        assert!(set(&["p", "--ack-wait-ms", "-1"]).is_err());
        assert_eq!(
            set(&["p", "--json", "{\"max_replicas\":7}"])
                .unwrap()
                .max_replicas,
            7
        );
    }
}
