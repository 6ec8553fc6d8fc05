//! The taskbus agent SDK: an agent is a handler plus a pool name.
//!
//! ```no_run
//! use taskbus_agent::{Agent, AgentConfig, TaskContext, TaskError};
//! # async fn demo() -> Result<(), taskbus_agent::AgentError> {
//! let shutdown = taskbus_agent::CancellationToken::new();
//! let config = AgentConfig::new("nats://127.0.0.1:4222", "default");
//! Agent::new(config, |task: TaskContext| async move {
//!     Ok::<_, TaskError>(task.payload) // echo
//! })
//! .run(shutdown)
//! .await?;
//! # Ok(()) }
//! ```
//!
//! What the SDK does for the handler:
//! - pulls from the pool's durable consumer `work-<pool>` with bounded concurrency (it asks
//!   the server only for as many messages as it has free slots, so nothing waits in a local
//!   buffer while its lease runs out);
//! - publishes `started` (core NATS), extends the lease with progress acks every third of the
//!   consumer's `ack_wait` while the handler runs, enforces the task's `timeout_ms`;
//! - publishes the outcome (`succeeded`/`failed`) with JetStream and waits for its ack, then
//!   acks the work message (if the agent dies in between, the task is redelivered and the
//!   coordinator records only one outcome per attempt);
//! - on shutdown (SIGTERM in the binary) stops pulling, lets in-flight work finish within the
//!   grace period, then cancels what is left and hands it back (`nak`) so another agent takes it
//!   at once. Nothing is lost when a pod is scaled down.

pub mod handlers;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use futures::StreamExt;
use taskbus_proto::events::{self, Event, EventKind};
use taskbus_proto::{Subjects, WorkItem};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use taskbus_runtime::CancellationToken;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub nats_url: String,
    pub prefix: String,
    pub pool: String,
    /// Unique per agent process (appears in events and ledger account names).
    pub agent_id: String,
    /// Most tasks run at once.
    pub concurrency: usize,
    /// How long in-flight tasks may keep running after shutdown starts.
    pub grace: Duration,
    /// How long one pull request waits for work.
    pub pull_expiry: Duration,
    pub version: String,
}

impl AgentConfig {
    pub fn new(nats_url: impl Into<String>, pool: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            prefix: taskbus_proto::subjects::DEFAULT_PREFIX.into(),
            pool: pool.into(),
            agent_id: default_agent_id(),
            concurrency: 4,
            grace: Duration::from_secs(25),
            pull_expiry: Duration::from_secs(1),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// `$HOSTNAME` (the pod name on Kubernetes) when it is a valid id, else `agent-<ulid>`.
pub fn default_agent_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| taskbus_proto::ids::is_valid_agent_id(h))
        .unwrap_or_else(|| format!("agent-{}", ulid::Ulid::new().to_string().to_lowercase()))
}

/// What a handler sees of one attempt.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub task_id: String,
    pub pool: String,
    pub kind: String,
    pub attempt: u32,
    pub max_attempts: u32,
    pub payload: serde_json::Value,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Cancelled when the attempt must stop (shutdown grace over, task cancelled); a
    /// cooperative handler returns promptly when it fires.
    pub cancel: CancellationToken,
}

/// A handler's failure. `Retryable` failures are retried while attempts remain; `Fatal` ones
/// make the task dead at once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Retryable(String),
    #[error("{0}")]
    Fatal(String),
}

/// The work an agent does. Closures `Fn(TaskContext) -> impl Future<Output = Result<Value, TaskError>>`
/// implement it.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        task: TaskContext,
    ) -> impl Future<Output = Result<serde_json::Value, TaskError>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, TaskError>> + Send,
{
    fn handle(
        &self,
        task: TaskContext,
    ) -> impl Future<Output = Result<serde_json::Value, TaskError>> + Send {
        self(task)
    }
}

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Nats(#[from] taskbus_runtime::nats::NatsError),
    #[error("invalid agent settings: {0}")]
    Config(String),
}

/// Counters of one agent run.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub handed_back: AtomicU64,
}

/// An agent: settings plus handler.
pub struct Agent<H> {
    config: AgentConfig,
    handler: Arc<H>,
    stats: Arc<AgentStats>,
}

struct Shared<H> {
    config: AgentConfig,
    handler: Arc<H>,
    stats: Arc<AgentStats>,
    subjects: Subjects,
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
    /// Cancelled when the grace period is over.
    hard: CancellationToken,
}

impl<H: Handler> Agent<H> {
    pub fn new(config: AgentConfig, handler: H) -> Self {
        Self {
            config,
            handler: Arc::new(handler),
            stats: Arc::default(),
        }
    }

    /// Live counters (shared with the running agent).
    pub fn stats(&self) -> Arc<AgentStats> {
        self.stats.clone()
    }

    /// Run until `shutdown` is cancelled and in-flight work is finished or handed back.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let c = &self.config;
        if !taskbus_proto::ids::is_valid_pool(&c.pool) {
            return Err(AgentError::Config(format!(
                "{:?} is not a valid pool name",
                c.pool
            )));
        }
        if !taskbus_proto::ids::is_valid_agent_id(&c.agent_id) {
            return Err(AgentError::Config(format!(
                "agent id {:?} must be 1 to 128 characters from A-Z a-z 0-9 _ -",
                c.agent_id
            )));
        }
        if c.concurrency == 0 {
            return Err(AgentError::Config("concurrency must be at least 1".into()));
        }
        let subjects = Subjects::new(&c.prefix);
        let client =
            taskbus_runtime::nats::connect(&c.nats_url, &format!("taskbus-agent {}", c.agent_id))
                .await?;
        let js = jetstream::new(client.clone());
        let Some(consumer) = wait_for_consumer(&js, &subjects, &c.pool, &shutdown).await else {
            return Ok(());
        };
        let ack_wait = consumer.cached_info().config.ack_wait;
        info!(pool = %c.pool, agent_id = %c.agent_id, concurrency = c.concurrency, ?ack_wait, "agent running");
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            handler: self.handler.clone(),
            stats: self.stats.clone(),
            subjects,
            client,
            js,
            ack_wait,
            hard: CancellationToken::new(),
        });
        let tracker = taskbus_runtime::TaskTracker::new();
        pull_loop(&shared, &consumer, &tracker, &shutdown).await;

        // Drain: in-flight tasks get the grace period, then are cancelled and handed back.
        tracker.close();
        info!(in_flight = tracker.len(), grace = ?shared.config.grace, "agent draining");
        if tokio::time::timeout(shared.config.grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                left = tracker.len(),
                "grace period over; cancelling and handing back the rest"
            );
            shared.hard.cancel();
            tracker.wait().await;
        }
        shared.client.flush().await.ok();
        info!("agent stopped");
        Ok(())
    }
}

async fn wait_for_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    pool: &str,
    shutdown: &CancellationToken,
) -> Option<PullConsumer> {
    let mut warned = false;
    loop {
        match js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                subjects.work_consumer(pool),
                subjects.work_stream(),
            )
            .await
        {
            Ok(c) => return Some(c),
            Err(e) => {
                if !warned {
                    warn!(pool, error = %e, "work consumer not found yet; is the coordinator running and the pool configured? waiting");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn pull_loop<H: Handler>(
    shared: &Arc<Shared<H>>,
    consumer: &PullConsumer,
    tracker: &taskbus_runtime::TaskTracker,
    shutdown: &CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(shared.config.concurrency));
    while !shutdown.is_cancelled() {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let want = 1 + slots.available_permits();
        let mut batch = match consumer
            .batch()
            .max_messages(want)
            .expires(shared.config.pull_expiry)
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "pull request failed; retrying");
                drop(first);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
        };
        let mut first = Some(first);
        // Read the whole batch, even past shutdown, so nothing delivered to us is left waiting
        // for its lease to expire: after shutdown each message is handed back at once.
        while let Some(msg) = batch.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "pull notice");
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let permit = match first.take() {
                Some(p) => p,
                None => match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let shared = shared.clone();
            tracker.spawn(async move {
                process(&shared, msg).await;
                drop(permit);
            });
        }
    }
}

async fn process<H: Handler>(shared: &Shared<H>, msg: jetstream::Message) {
    let item: WorkItem = match serde_json::from_slice(&msg.payload) {
        Ok(w) => w,
        Err(e) => {
            // Not something the coordinator wrote: it can never succeed, so take it off the queue.
            warn!(subject = %msg.subject, error = %e, "unreadable work message terminated");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    let c = &shared.config;
    let task_id = item.task_id().to_string();
    let started_at = Utc::now();
    let started = Event::Started(events::Started {
        task_id: task_id.clone(),
        pool: c.pool.clone(),
        at: started_at,
        attempt: item.attempt,
        agent_id: c.agent_id.clone(),
    });
    let _ = shared
        .client
        .publish(
            shared.subjects.event(&c.pool, &task_id, EventKind::Started),
            started.to_json().into(),
        )
        .await;

    let cancel = shared.hard.child_token();
    let timeout = Duration::from_millis(item.task.timeout_ms.unwrap_or(300_000));
    let ctx = TaskContext {
        task_id: task_id.clone(),
        pool: c.pool.clone(),
        kind: item.task.kind.clone(),
        attempt: item.attempt,
        max_attempts: item.task.max_attempts.unwrap_or(1),
        payload: item.task.payload.clone(),
        labels: item.task.labels.clone().unwrap_or_default(),
        cancel: cancel.clone(),
    };
    let t0 = Instant::now();
    let work = shared.handler.handle(ctx);
    tokio::pin!(work);
    let lease_every = (shared.ack_wait / 3).max(Duration::from_millis(50));
    let mut lease =
        tokio::time::interval_at(tokio::time::Instant::now() + lease_every, lease_every);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let outcome = loop {
        tokio::select! {
            r = &mut work => break Some(r),
            _ = lease.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "lease extension failed");
                }
            }
            _ = &mut deadline => {
                cancel.cancel();
                break Some(Err(TaskError::Retryable(format!("attempt timed out after {} ms", timeout.as_millis()))));
            }
            _ = shared.hard.cancelled() => break None,
        }
    };
    let Some(outcome) = outcome else {
        // Grace period over: hand the task back so another agent runs it now.
        let _ = msg.ack_with(AckKind::Nak(None)).await;
        shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let duration_ms = t0.elapsed().as_millis() as u64;
    let at = Utc::now();
    let event = match outcome {
        Ok(result) => Event::Succeeded(events::Succeeded {
            task_id: task_id.clone(),
            pool: c.pool.clone(),
            at,
            attempt: item.attempt,
            agent_id: c.agent_id.clone(),
            result,
            duration_ms,
            reputation: None,
        }),
        Err(e) => Event::Failed(events::Failed {
            task_id: task_id.clone(),
            pool: c.pool.clone(),
            at,
            attempt: item.attempt,
            agent_id: c.agent_id.clone(),
            retryable: matches!(e, TaskError::Retryable(_)),
            error: e.to_string(),
            duration_ms,
        }),
    };
    let ok = matches!(event, Event::Succeeded(_));
    if publish_outcome(shared, &task_id, item.attempt, &event).await {
        let counter = if ok {
            &shared.stats.succeeded
        } else {
            &shared.stats.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = msg.ack().await {
            debug!(error = %e, "work ack failed; the coordinator ignores the repeat");
        }
    } else {
        // The outcome is not durable: let the task run again rather than lose it.
        let _ = msg
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
    }
}

/// Publish the outcome with JetStream, retrying briefly; true once the server acknowledged it.
async fn publish_outcome<H>(
    shared: &Shared<H>,
    task_id: &str,
    attempt: u32,
    event: &Event,
) -> bool {
    let subject = shared
        .subjects
        .event(&shared.config.pool, task_id, event.kind());
    let body: bytes::Bytes = event.to_json().into();
    for n in 0..5u32 {
        let p = PublishMessage::build()
            .payload(body.clone())
            .message_id(format!("{task_id}:{attempt}:outcome"));
        match shared.js.send_publish(subject.clone(), p).await {
            Ok(f) => match f.await {
                Ok(_) => return true,
                Err(e) => warn!(task_id, error = %e, "outcome not acknowledged; retrying"),
            },
            Err(e) => warn!(task_id, error = %e, "outcome publish failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(n))).await;
    }
    false
}
