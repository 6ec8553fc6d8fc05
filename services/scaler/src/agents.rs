//! Live agents per pool, from the heartbeats agents publish on core NATS
//! (`taskbus.agents.<pool>.<agent>.heartbeat`, every 5 s by default). An agent heard from within
//! the last `ttl` (15 s, the coordinator's "healthy") counts. One agent process runs per
//! replica, so this is the pool's current replica count as far as NATS can see — what a freeze
//! holds the published metric at.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use taskbus_proto::Subjects;
use taskbus_runtime::CancellationToken;
use tracing::warn;

use crate::state::Shared;

/// Most agents remembered per pool (heartbeats are unauthenticated core NATS messages).
pub const MAX_AGENTS_PER_POOL: usize = 10_000;
/// Longest agent id accepted (the protocol's id limit).
const MAX_AGENT_ID: usize = 128;

/// Last heartbeat per agent, per pool.
#[derive(Debug)]
pub struct AgentBook {
    ttl: Duration,
    seen: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl AgentBook {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seen: Mutex::default(),
        }
    }

    /// Record a heartbeat subject; anything that is not `<prefix>.agents.<pool>.<agent>.heartbeat`
    /// with a valid pool and a sane agent id is ignored.
    pub fn heard(&self, subjects: &Subjects, subject: &str, now: Instant) -> bool {
        let Some(rest) = subject
            .strip_prefix(subjects.prefix())
            .and_then(|r| r.strip_prefix(".agents."))
        else {
            return false;
        };
        let mut it = rest.split('.');
        let (Some(pool), Some(agent), Some("heartbeat"), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return false;
        };
        if !taskbus_proto::ids::is_valid_pool(pool)
            || agent.is_empty()
            || agent.len() > MAX_AGENT_ID
        {
            return false;
        }
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let agents = g.entry(pool.to_string()).or_default();
        if agents.len() >= MAX_AGENTS_PER_POOL && !agents.contains_key(agent) {
            let ttl = self.ttl;
            agents.retain(|_, t| now.saturating_duration_since(*t) <= ttl);
            if agents.len() >= MAX_AGENTS_PER_POOL {
                return false;
            }
        }
        agents.insert(agent.to_string(), now);
        true
    }

    /// Agents of `pool` heard from within the ttl (forgetting older ones).
    pub fn live(&self, pool: &str, now: Instant) -> u32 {
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(agents) = g.get_mut(pool) else {
            return 0;
        };
        let ttl = self.ttl;
        agents.retain(|_, t| now.saturating_duration_since(*t) <= ttl);
        agents.len() as u32
    }
}

/// Follow heartbeats until shutdown (core NATS; the client resubscribes after reconnects).
pub async fn follow(
    client: async_nats::Client,
    subjects: Subjects,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut sub = match client.subscribe(subjects.agent_heartbeat_all()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot subscribe to agent heartbeats; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => {
                        shared.agents.heard(&subjects, &m.subject, Instant::now());
                    }
                    None => break,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_agents_and_ignores_junk() {
        let s = Subjects::default();
        let book = AgentBook::new(Duration::from_secs(15));
        let t0 = Instant::now();
        assert!(book.heard(&s, "taskbus.agents.cpu.a1.heartbeat", t0));
        assert!(book.heard(&s, "taskbus.agents.cpu.a2.heartbeat", t0));
        assert!(book.heard(
            &s,
            "taskbus.agents.cpu.a2.heartbeat",
            t0 + Duration::from_secs(10)
        ));
        assert!(book.heard(&s, "taskbus.agents.gpu.g1.heartbeat", t0));
        let long = format!("taskbus.agents.cpu.{}.heartbeat", "x".repeat(200));
        for junk in [
            "taskbus.agents.cpu.a3",
            "taskbus.agents.cpu.a3.control",
            "taskbus.agents.cpu.a3.heartbeat.extra",
            "taskbus.agents.CPU.a3.heartbeat",
            "taskbus.agents.cpu..heartbeat",
            "other.agents.cpu.a3.heartbeat",
            "taskbus.agentsx.cpu.a3.heartbeat",
            long.as_str(),
        ] {
            assert!(!book.heard(&s, junk, t0), "{junk}");
        }
        assert_eq!(book.live("cpu", t0 + Duration::from_secs(1)), 2);
        assert_eq!(book.live("gpu", t0), 1);
        assert_eq!(book.live("none", t0), 0);
        // a1 falls silent: gone after the ttl; a2 spoke at t0 + 10 s.
        assert_eq!(book.live("cpu", t0 + Duration::from_secs(20)), 1);
        assert_eq!(book.live("cpu", t0 + Duration::from_secs(26)), 0);
    }

    #[test]
    fn bounded_per_pool() {
        let s = Subjects::default();
        let book = AgentBook::new(Duration::from_secs(15));
        let t0 = Instant::now();
        for i in 0..MAX_AGENTS_PER_POOL {
            assert!(book.heard(&s, &format!("taskbus.agents.cpu.a{i}.heartbeat"), t0));
        }
        assert!(!book.heard(&s, "taskbus.agents.cpu.one-too-many.heartbeat", t0));
        // Known agents still refresh; once the old ones expire there is room again.
        assert!(book.heard(&s, "taskbus.agents.cpu.a1.heartbeat", t0));
        assert!(book.heard(
            &s,
            "taskbus.agents.cpu.newcomer.heartbeat",
            t0 + Duration::from_secs(16)
        ));
        assert_eq!(book.live("cpu", t0 + Duration::from_secs(16)), 1);
    }
}
