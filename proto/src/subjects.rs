//! Subject and stream names. The prefix (default `taskbus`) is configurable so several
//! installations can share one NATS account.

use crate::envelope::Priority;
use crate::events::EventKind;

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "taskbus";

/// Subject and stream names for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    stream_prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Subjects {
    /// Names for `prefix` (a single NATS token such as `taskbus` or `staging-taskbus`).
    pub fn new(prefix: &str) -> Self {
        let stream_prefix = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            prefix: prefix.to_string(),
            stream_prefix,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `TASKBUS_SUBMIT`
    pub fn submit_stream(&self) -> String {
        format!("{}_SUBMIT", self.stream_prefix)
    }
    /// `TASKBUS_WORK`
    pub fn work_stream(&self) -> String {
        format!("{}_WORK", self.stream_prefix)
    }
    /// `TASKBUS_EVENTS`
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }
    /// KV bucket holding pool settings.
    pub fn pools_bucket(&self) -> String {
        format!(
            "{}_pools",
            self.prefix
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    }

    /// KV bucket holding schedules (recurring tasks; key = schedule name).
    pub fn schedules_bucket(&self) -> String {
        format!(
            "{}_schedules",
            self.prefix
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    }

    /// KV bucket holding each agent's reputation multiplier (key = agent id), written by the
    /// coordinator and watched by agents, which stamp it into their `succeeded` events.
    pub fn reputation_bucket(&self) -> String {
        format!(
            "{}_reputation",
            self.prefix
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    }

    /// `taskbus.submit.<pool>`
    pub fn submit(&self, pool: &str) -> String {
        format!("{}.submit.{pool}", self.prefix)
    }
    /// `taskbus.submit.>`
    pub fn submit_all(&self) -> String {
        format!("{}.submit.>", self.prefix)
    }
    /// The pool token of a submit subject, if the subject has the submit shape.
    pub fn pool_of_submit<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".submit.")?;
        (!rest.is_empty() && !rest.contains('.')).then_some(rest)
    }

    /// `taskbus.work.<pool>.<priority>`
    pub fn work(&self, pool: &str, priority: Priority) -> String {
        format!("{}.work.{pool}.{}", self.prefix, priority.as_str())
    }
    /// `taskbus.work.<pool>.*`
    pub fn work_pool(&self, pool: &str) -> String {
        format!("{}.work.{pool}.*", self.prefix)
    }
    /// `taskbus.work.>`
    pub fn work_all(&self) -> String {
        format!("{}.work.>", self.prefix)
    }
    /// Schedule subject of a delayed attempt (JetStream message schedules):
    /// `taskbus.sched.<pool>.<task_id>.<attempt>`. The server moves the message to its work
    /// subject at the scheduled time.
    pub fn sched(&self, pool: &str, task_id: &str, attempt: u32) -> String {
        format!("{}.sched.{pool}.{task_id}.{attempt}", self.prefix)
    }
    /// `taskbus.sched.>`
    pub fn sched_all(&self) -> String {
        format!("{}.sched.>", self.prefix)
    }
    /// Durable consumer the agents of `pool` share for one priority band:
    /// `work-<pool>-<priority>` (filter `taskbus.work.<pool>.<priority>`).
    pub fn work_consumer(&self, pool: &str, priority: Priority) -> String {
        format!("work-{pool}-{}", priority.as_str())
    }
    /// The single per-pool consumer of releases before priority bands (`work-<pool>`,
    /// filter `taskbus.work.<pool>.*`); the coordinator removes it on start.
    pub fn legacy_work_consumer(&self, pool: &str) -> String {
        format!("work-{pool}")
    }

    /// `taskbus.events.<pool>.<task_id>.<event>`
    pub fn event(&self, pool: &str, task_id: &str, kind: EventKind) -> String {
        format!("{}.events.{pool}.{task_id}.{}", self.prefix, kind.as_str())
    }
    /// `taskbus.events.*.*.<event>`: one event kind across pools and tasks.
    pub fn event_kind_all(&self, kind: EventKind) -> String {
        format!("{}.events.*.*.{}", self.prefix, kind.as_str())
    }
    /// `taskbus.events.<pool>.<task_id>.>`: everything about one task.
    pub fn task_events(&self, pool: &str, task_id: &str) -> String {
        format!("{}.events.{pool}.{task_id}.>", self.prefix)
    }
    /// Parse `taskbus.events.<pool>.<task_id>.<event>` into its three tokens.
    pub fn parse_event<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
        let rest = subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".events.")?;
        let mut it = rest.split('.');
        let (pool, id, ev) = (it.next()?, it.next()?, it.next()?);
        it.next().is_none().then_some((pool, id, ev))
    }

    /// Core NATS subject agents send heartbeats on: `taskbus.agents.<pool>.<agent>.heartbeat`.
    pub fn agent_heartbeat(&self, pool: &str, agent: &str) -> String {
        format!("{}.agents.{pool}.{agent}.heartbeat", self.prefix)
    }
    /// All heartbeats.
    pub fn agent_heartbeat_all(&self) -> String {
        format!("{}.agents.*.*.heartbeat", self.prefix)
    }
    /// Control messages to one agent (pause, resume, cancel).
    pub fn agent_control(&self, pool: &str, agent: &str) -> String {
        format!("{}.agents.{pool}.{agent}.control", self.prefix)
    }
    /// Control messages to every agent of a pool (cancel broadcasts).
    pub fn pool_control(&self, pool: &str) -> String {
        format!("{}.agents.{pool}.control", self.prefix)
    }

    /// Request/reply API subject for the coordinator (`taskbus.api.<endpoint>`).
    pub fn api(&self, endpoint: &str) -> String {
        format!("{}.api.{endpoint}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let s = Subjects::default();
        assert_eq!(s.submit_stream(), "TASKBUS_SUBMIT");
        assert_eq!(s.work("p", Priority::High), "taskbus.work.p.high");
        assert_eq!(s.work_consumer("p", Priority::Low), "work-p-low");
        assert_eq!(s.legacy_work_consumer("p"), "work-p");
        assert_eq!(
            s.event("p", "t1", EventKind::Succeeded),
            "taskbus.events.p.t1.succeeded"
        );
        assert_eq!(s.pool_of_submit("taskbus.submit.gpu"), Some("gpu"));
        assert_eq!(s.pool_of_submit("taskbus.submit.a.b"), None);
        assert_eq!(s.pool_of_submit("other.submit.a"), None);
        assert_eq!(
            s.parse_event("taskbus.events.p.t1.failed"),
            Some(("p", "t1", "failed"))
        );
        assert_eq!(s.parse_event("taskbus.events.p.t1"), None);
        let s2 = Subjects::new("stage-tb");
        assert_eq!(s2.work_stream(), "STAGE_TB_WORK");
        assert_eq!(s2.pools_bucket(), "stage_tb_pools");
    }
}
