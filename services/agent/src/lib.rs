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
//! - pulls from the pool's durable consumers `work-<pool>-high|normal|low` in priority order
//!   with bounded concurrency (it asks the server only for as many messages as it has free
//!   slots, so nothing waits in a local buffer while its lease runs out; see `src/pull.rs` for the
//!   priority rule and how `low` is kept from starving);
//! - publishes `started` (core NATS), extends the lease with progress acks every third of the
//!   consumer's `ack_wait` while the handler runs, enforces the task's `timeout_ms`;
//! - publishes the outcome (`succeeded`/`failed`) with JetStream and waits for its ack, then
//!   acks the work message (if the agent dies in between, the task is redelivered and the
//!   coordinator records only one outcome per attempt);
//! - on shutdown (SIGTERM in the binary) stops pulling, lets in-flight work finish within the
//!   grace period, then cancels what is left and hands it back (`nak`) so another agent takes it
//!   at once. Nothing is lost when a pod is scaled down.

pub mod handlers;
mod metrics;
mod pull;

pub use metrics::stats_collector;
pub use pull::LOW_EVERY;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use futures::StreamExt;
use taskbus_proto::api::Heartbeat;
use taskbus_proto::events::{self, Event, EventKind};
use taskbus_proto::{PoolSettings, Priority, Subjects};
use tracing::{debug, info, warn};

pub use taskbus_proto::WorkItem;
pub use taskbus_runtime::CancellationToken;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub nats_url: String,
    /// NATS credentials and TLS settings.
    pub nats_auth: taskbus_runtime::nats::NatsAuth,
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
    /// Heartbeat period (`taskbus.agents.<pool>.<agent>.heartbeat`).
    pub heartbeat_every: Duration,
    pub version: String,
    /// Serve `/healthz`, `/readyz` and `/metrics` here (see the `metrics` module); `None`
    /// serves nothing.
    pub http_listen: Option<SocketAddr>,
}

impl AgentConfig {
    pub fn new(nats_url: impl Into<String>, pool: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_auth: Default::default(),
            prefix: taskbus_proto::subjects::DEFAULT_PREFIX.into(),
            pool: pool.into(),
            agent_id: default_agent_id(),
            concurrency: 4,
            grace: Duration::from_secs(25),
            pull_expiry: Duration::from_secs(1),
            heartbeat_every: Duration::from_secs(5),
            version: env!("CARGO_PKG_VERSION").into(),
            http_listen: None,
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
    /// What the task asked for (`resources` of its envelope).
    pub resources: Option<taskbus_proto::Resources>,
    /// The attempt's timeout (`timeout_ms`); the agent stops the handler when it is over.
    pub timeout: Duration,
    /// What [`Handler::place`] reserved for this attempt (e.g. GPU ids); empty for handlers
    /// that do not place.
    pub devices: Vec<String>,
    /// Cancelled when the attempt must stop (shutdown grace over, task cancelled, timed out);
    /// a cooperative handler returns promptly when it fires.
    pub cancel: CancellationToken,
    /// Cancelled (together with `cancel`) when the agent gives up on the attempt at the end of
    /// its shutdown grace: the task is handed back and runs again elsewhere. A handler whose
    /// work outlives it (a Kubernetes Job another agent adopts) leaves it running then.
    pub shutdown: CancellationToken,
    /// The W3C `traceparent` the producer submitted the task with, when it sent a valid one:
    /// start the handler's spans as its children to join the producer's trace. The agent puts
    /// it on the attempt's `started` and outcome events too.
    pub traceparent: Option<String>,
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
///
/// Handlers that need scarce resources per task (the GPU dispatcher) also implement
/// [`Handler::room`] and [`Handler::place`]: the agent then pulls no more tasks than `room`
/// allows and starts a task only once `place` has reserved what it needs.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        task: TaskContext,
    ) -> impl Future<Output = Result<serde_json::Value, TaskError>> + Send;

    /// How many more tasks this agent may pull now, on top of those it holds (running or
    /// waiting for `place`). The agent never pulls more than `concurrency` allows either; while
    /// this is 0 it asks again when one of its attempts ends, and at least every 25 ms.
    /// Default: no limit of its own.
    fn room(&self) -> usize {
        usize::MAX
    }

    /// Reserve what `task` needs before it starts. The future may wait (until resources are
    /// free): meanwhile the agent extends the task's lease, and hands the task back if the agent
    /// shuts down or the task is cancelled (dropping the future). The [`Slot`] is held until the
    /// attempt has ended. Default: every task starts at once with nothing reserved.
    fn place(&self, task: &WorkItem) -> impl Future<Output = Placement> + Send {
        let _ = task;
        std::future::ready(Placement::Ready(Slot::default()))
    }
}

/// What [`Handler::place`] decided for one task.
#[derive(Debug)]
pub enum Placement {
    /// Start now with this reservation.
    Ready(Slot),
    /// This agent can never run the task (it asks for more than exists here): it fails at once
    /// and for good (`failed`, not retryable), with this sentence as the error.
    Never(String),
}

/// A reservation held for one attempt; released (dropped) when the attempt ends.
#[derive(Default)]
pub struct Slot {
    /// Handed to the handler as [`TaskContext::devices`].
    pub devices: Vec<String>,
    /// Released when dropped (e.g. GPUs returned to their allocator).
    pub guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("devices", &self.devices)
            .field("guard", &self.guard.is_some())
            .finish()
    }
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
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Counters of one agent run.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub handed_back: AtomicU64,
    /// Tasks skipped or stopped because they were cancelled.
    pub cancelled: AtomicU64,
    /// Tasks not started because their deadline had passed.
    pub expired: AtomicU64,
    /// Tasks held now: running, or waiting for [`Handler::place`].
    pub in_flight: AtomicU32,
    /// Tasks pulled and waiting for [`Handler::place`] (not counted in `in_flight`).
    pub waiting: AtomicU32,
}

/// The per-agent circuit breaker: after `threshold` consecutive failures the agent stops
/// pulling for the pool's cool-down, then takes a single task (half-open): success closes the
/// breaker, failure opens it again.
#[derive(Debug, Default)]
struct Breaker {
    consecutive: u32,
    open_until: Option<Instant>,
    half_open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BreakerState {
    Closed,
    Open(Instant),
    HalfOpen,
}

impl Breaker {
    fn state(&mut self, now: Instant) -> BreakerState {
        match self.open_until {
            Some(until) if now < until => BreakerState::Open(until),
            Some(_) => {
                self.open_until = None;
                self.half_open = true;
                BreakerState::HalfOpen
            }
            None if self.half_open => BreakerState::HalfOpen,
            None => BreakerState::Closed,
        }
    }

    fn record(&mut self, ok: bool, threshold: u32, cooldown: Duration) {
        if ok {
            self.consecutive = 0;
            self.half_open = false;
            return;
        }
        self.consecutive += 1;
        if self.half_open || (threshold > 0 && self.consecutive >= threshold) {
            self.open_until = Some(Instant::now() + cooldown);
            self.half_open = false;
        }
    }

    fn name(&mut self) -> &'static str {
        match self.state(Instant::now()) {
            BreakerState::Closed => "closed",
            BreakerState::Open(_) => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Ids of cancelled tasks (bounded, oldest forgotten first).
#[derive(Default)]
struct CancelSet {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl CancelSet {
    const CAP: usize = 100_000;
    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

/// An agent: settings plus handler.
pub struct Agent<H> {
    config: AgentConfig,
    handler: Arc<H>,
    stats: Arc<AgentStats>,
    durations: prometheus_client::metrics::histogram::Histogram,
}

struct Shared<H> {
    config: AgentConfig,
    handler: Arc<H>,
    stats: Arc<AgentStats>,
    subjects: Subjects,
    client: async_nats::Client,
    js: jetstream::Context,
    ack_wait: Duration,
    /// Handler run times, for `/metrics`.
    durations: prometheus_client::metrics::histogram::Histogram,
    /// Cancelled when the grace period is over.
    hard: CancellationToken,
    /// Cancelled when shutdown starts (tasks still waiting for a placement are handed back).
    soft: CancellationToken,
    /// Signalled when an attempt ends: a pull loop waiting for [`Handler::room`] looks again.
    room_freed: tokio::sync::Notify,
    cancelled: Mutex<CancelSet>,
    running: Mutex<HashMap<String, CancellationToken>>,
    breaker: Mutex<Breaker>,
    settings: Mutex<PoolSettings>,
    reputation: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<H: Handler> Agent<H> {
    pub fn new(config: AgentConfig, handler: H) -> Self {
        Self {
            config,
            handler: Arc::new(handler),
            stats: Arc::default(),
            durations: metrics::duration_histogram(),
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
        let client = taskbus_runtime::nats::connect(
            &c.nats_url,
            &c.nats_auth,
            &format!("taskbus-agent {}", c.agent_id),
        )
        .await?;
        // The HTTP server outlives the drain, so that liveness probes keep passing while
        // in-flight tasks finish.
        let http = taskbus_runtime::TaskTracker::new();
        let http_stop = CancellationToken::new();
        let health = match c.http_listen {
            Some(addr) => {
                let health = taskbus_runtime::http::Health::new(metrics::registry(
                    &c.pool,
                    self.stats.clone(),
                    self.durations.clone(),
                ));
                health.watch_nats(&client);
                let bound = taskbus_runtime::http::spawn_health(
                    &http,
                    addr,
                    health.clone(),
                    http_stop.clone(),
                )
                .await
                .map_err(|source| AgentError::Http { addr, source })?;
                info!(http = %bound, "serving /healthz, /readyz and /metrics");
                Some(health)
            }
            None => None,
        };
        http.close();
        let stop_http = || async {
            http_stop.cancel();
            http.wait().await;
        };
        let js = jetstream::new(client.clone());
        let Some(bands) = wait_for_consumers(&js, &subjects, &c.pool, &shutdown).await else {
            stop_http().await;
            return Ok(());
        };
        let ack_wait = bands
            .consumers
            .iter()
            .map(|(_, c)| c.cached_info().config.ack_wait)
            .min()
            .unwrap_or(Duration::from_secs(30));
        info!(pool = %c.pool, agent_id = %c.agent_id, concurrency = c.concurrency, ?ack_wait, "agent running");
        let shared = Arc::new(Shared {
            config: self.config.clone(),
            handler: self.handler.clone(),
            stats: self.stats.clone(),
            subjects,
            client,
            js,
            ack_wait,
            durations: self.durations.clone(),
            hard: CancellationToken::new(),
            soft: shutdown.clone(),
            room_freed: tokio::sync::Notify::new(),
            cancelled: Mutex::default(),
            running: Mutex::default(),
            breaker: Mutex::default(),
            settings: Mutex::new(PoolSettings::default()),
            reputation: Mutex::new(None),
        });
        refresh_settings(&shared).await;
        // Side loops (cancellations, heartbeats, reputation) live until the agent has drained.
        let aux_stop = CancellationToken::new();
        let aux = taskbus_runtime::TaskTracker::new();
        let replayed = CancellationToken::new();
        aux.spawn(watch_cancellations(
            shared.clone(),
            replayed.clone(),
            aux_stop.clone(),
        ));
        aux.spawn(heartbeats(shared.clone(), aux_stop.clone()));
        aux.spawn(watch_reputation(shared.clone(), aux_stop.clone()));
        aux.close();
        // Pull only once the last hour's cancellations are known, so that a task cancelled
        // while it waited is not run by an agent that just started.
        tokio::select! {
            _ = replayed.cancelled() => {}
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(CANCEL_REPLAY_WAIT) => {
                warn!("the last hour's cancellations were not all replayed within 5 s; pulling anyway");
            }
        }
        let tracker = taskbus_runtime::TaskTracker::new();
        if let Some(h) = &health {
            h.set_ready(true);
        }
        pull::pull_loop(&shared, &bands, &tracker, &shutdown).await;

        // Drain: in-flight tasks get the grace period, then are cancelled and handed back.
        if let Some(h) = &health {
            h.set_ready(false);
        }
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
        aux_stop.cancel();
        aux.wait().await;
        shared.client.flush().await.ok();
        stop_http().await;
        info!("agent stopped");
        Ok(())
    }
}

async fn wait_for_consumers(
    js: &jetstream::Context,
    subjects: &Subjects,
    pool: &str,
    shutdown: &CancellationToken,
) -> Option<pull::Bands> {
    let mut warned = false;
    loop {
        let mut found = Vec::with_capacity(3);
        let mut missing = None;
        for priority in Priority::ALL {
            match js
                .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    subjects.work_consumer(pool, priority),
                    subjects.work_stream(),
                )
                .await
            {
                Ok(c) => found.push((priority, c)),
                Err(e) => {
                    missing = Some(e);
                    break;
                }
            }
        }
        if let Ok(consumers) = <[(Priority, PullConsumer); 3]>::try_from(found) {
            return Some(pull::Bands { consumers });
        }
        if !warned {
            if let Some(e) = missing {
                warn!(pool, error = %e, "work consumers not found yet; is the coordinator running and the pool configured? waiting");
            }
            warned = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn process<H: Handler>(shared: &Shared<H>, msg: jetstream::Message) {
    let waiting = Waiting(&shared.stats);
    let mut item: WorkItem = match serde_json::from_slice(&msg.payload) {
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
    if lock(&shared.cancelled).ids.contains(&task_id) {
        shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        let _ = msg.ack().await;
        return;
    }
    let task_cancel = CancellationToken::new();
    lock(&shared.running).insert(task_id.clone(), task_cancel.clone());
    let slot = {
        let slot = if expire_if_due(shared, &msg, &item).await {
            None
        } else {
            wait_for_placement(shared, &msg, &item, &task_cancel).await
        };
        drop(waiting);
        // Waiting for the placement may have taken until the deadline.
        match slot {
            Some(slot) if !expire_if_due(shared, &msg, &item).await => Some(slot),
            _ => None,
        }
    };
    let Some(slot) = slot else {
        lock(&shared.running).remove(&task_id);
        return;
    };
    let started_at = Utc::now();
    let started = Event::Started(events::Started {
        task_id: task_id.clone(),
        pool: c.pool.clone(),
        at: started_at,
        attempt: item.attempt,
        agent_id: c.agent_id.clone(),
    });
    let traceparent = taskbus_proto::trace::from_headers(msg.headers.as_ref());
    let started_subject = shared.subjects.event(&c.pool, &task_id, EventKind::Started);
    let _ = match &traceparent {
        Some(tp) => {
            let mut h = async_nats::HeaderMap::new();
            h.insert(taskbus_proto::HDR_TRACEPARENT, tp.as_str());
            shared
                .client
                .publish_with_headers(started_subject, h, started.to_json().into())
                .await
        }
        None => {
            shared
                .client
                .publish(started_subject, started.to_json().into())
                .await
        }
    };

    let cancel = shared.hard.child_token();
    let timeout = Duration::from_millis(item.task.timeout_ms.unwrap_or(300_000));
    let ctx = TaskContext {
        task_id: task_id.clone(),
        pool: c.pool.clone(),
        // Moved, not copied: only `item.attempt` is read after this, and a payload can be large.
        kind: std::mem::take(&mut item.task.kind),
        attempt: item.attempt,
        max_attempts: item.task.max_attempts.unwrap_or(1),
        payload: std::mem::take(&mut item.task.payload),
        labels: item.task.labels.take().unwrap_or_default(),
        resources: item.task.resources.take(),
        timeout,
        devices: slot.devices.clone(),
        cancel: cancel.clone(),
        shutdown: shared.hard.clone(),
        traceparent: traceparent.clone(),
    };
    let t0 = Instant::now();
    // Boxed so that it can be dropped (ending what the handler holds, e.g. a child process)
    // before the slot is released.
    let mut work = Box::pin(shared.handler.handle(ctx));
    let lease_every = (shared.ack_wait / 3).max(Duration::from_millis(50));
    let mut lease =
        tokio::time::interval_at(tokio::time::Instant::now() + lease_every, lease_every);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    enum End {
        Done(Result<serde_json::Value, TaskError>),
        TimedOut,
        Cancelled,
        HandBack,
    }
    let end = loop {
        tokio::select! {
            r = &mut work => break End::Done(r),
            _ = lease.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "lease extension failed");
                }
            }
            _ = &mut deadline => {
                cancel.cancel();
                break End::TimedOut;
            }
            _ = task_cancel.cancelled() => {
                cancel.cancel();
                break End::Cancelled;
            }
            _ = shared.hard.cancelled() => break End::HandBack,
        }
    };
    if matches!(end, End::Cancelled | End::TimedOut) {
        // Give a cooperative handler a moment to see its token and clean up.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut work).await;
    }
    lock(&shared.running).remove(&task_id);
    // The handler is done with what was reserved for it.
    drop(work);
    drop(slot);
    shared.room_freed.notify_one();
    let duration_ms = t0.elapsed().as_millis() as u64;
    if matches!(end, End::Done(_) | End::TimedOut) {
        shared.durations.observe(t0.elapsed().as_secs_f64());
    }
    let at = Utc::now();
    let outcome = match end {
        End::HandBack => {
            // Grace period over: hand the task back so another agent runs it now.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
            return;
        }
        End::Cancelled => {
            // The coordinator already recorded `cancelled`; the message is done.
            shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            let _ = msg.ack().await;
            return;
        }
        End::TimedOut => None,
        End::Done(r) => Some(r),
    };
    let event = match outcome {
        None => Event::TimedOut(events::TimedOut {
            task_id: task_id.clone(),
            pool: c.pool.clone(),
            at,
            attempt: item.attempt,
            agent_id: Some(c.agent_id.clone()),
        }),
        Some(Ok(result)) => Event::Succeeded(events::Succeeded {
            task_id: task_id.clone(),
            pool: c.pool.clone(),
            at,
            attempt: item.attempt,
            agent_id: c.agent_id.clone(),
            result,
            duration_ms,
            reputation: lock(&shared.reputation).clone(),
        }),
        Some(Err(e)) => Event::Failed(events::Failed {
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
    {
        let s = lock(&shared.settings);
        let (threshold, cooldown) = (
            s.breaker_threshold,
            Duration::from_millis(s.breaker_cooldown_ms),
        );
        drop(s);
        let mut b = lock(&shared.breaker);
        b.record(ok, threshold, cooldown);
        if let BreakerState::Open(_) = b.state(Instant::now()) {
            if !ok && b.consecutive > 0 {
                warn!(
                    consecutive_failures = b.consecutive,
                    ?cooldown,
                    "circuit breaker open: pausing pulls"
                );
            }
        }
    }
    if publish_outcome(
        shared,
        &task_id,
        item.attempt,
        &event,
        traceparent.as_deref(),
    )
    .await
    {
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

/// Uncounts a pulled task as waiting for its placement when dropped (the pull loop counted it
/// when it took the task; see `pull.rs`).
struct Waiting<'a>(&'a AgentStats);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A task whose deadline has passed is reported `expired` instead of run; true when it was
/// (the message is then settled).
async fn expire_if_due<H>(shared: &Shared<H>, msg: &jetstream::Message, item: &WorkItem) -> bool {
    let Some(deadline) = item.task.deadline.filter(|d| *d <= Utc::now()) else {
        return false;
    };
    let task_id = item.task_id();
    let ev = Event::Expired(events::Expired {
        task_id: task_id.to_string(),
        pool: shared.config.pool.clone(),
        at: Utc::now(),
        deadline,
    });
    settle(shared, msg, item, &ev, &shared.stats.expired).await;
    true
}

/// Settle a task that ends without running: publish `event` as its outcome, then ack (and
/// count it in `counter`); if the outcome is not durable, let the task come back instead.
async fn settle<H>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    item: &WorkItem,
    event: &Event,
    counter: &AtomicU64,
) {
    let traceparent = taskbus_proto::trace::from_headers(msg.headers.as_ref());
    if publish_outcome(
        shared,
        item.task_id(),
        item.attempt,
        event,
        traceparent.as_deref(),
    )
    .await
    {
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = msg.ack().await;
    } else {
        let _ = msg
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
    }
}

/// Ask the handler to place the task, extending its lease while it waits. `None` when the task
/// is not to run here (never placeable: failed for good; cancelled; shutdown: handed back); the
/// message is then settled.
async fn wait_for_placement<H: Handler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    item: &WorkItem,
    task_cancel: &CancellationToken,
) -> Option<Slot> {
    let place = shared.handler.place(item);
    tokio::pin!(place);
    let lease_every = (shared.ack_wait / 3).max(Duration::from_millis(50));
    let mut lease =
        tokio::time::interval_at(tokio::time::Instant::now() + lease_every, lease_every);
    let placement = loop {
        tokio::select! {
            p = &mut place => break p,
            _ = lease.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "lease extension failed");
                }
            }
            _ = task_cancel.cancelled() => {
                shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                let _ = msg.ack().await;
                return None;
            }
            _ = shared.soft.cancelled() => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                shared.stats.handed_back.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    };
    match placement {
        Placement::Ready(slot) => Some(slot),
        Placement::Never(why) => {
            let task_id = item.task_id();
            warn!(task_id, error = %why, "task can never be placed on this agent; failing it");
            let ev = Event::Failed(events::Failed {
                task_id: task_id.to_string(),
                pool: shared.config.pool.clone(),
                at: Utc::now(),
                attempt: item.attempt,
                agent_id: shared.config.agent_id.clone(),
                retryable: false,
                error: why,
                duration_ms: 0,
            });
            settle(shared, msg, item, &ev, &shared.stats.failed).await;
            None
        }
    }
}

/// Publish the outcome with JetStream (with the task's `traceparent`, if any), retrying
/// briefly; true once the server acknowledged it.
async fn publish_outcome<H>(
    shared: &Shared<H>,
    task_id: &str,
    attempt: u32,
    event: &Event,
    traceparent: Option<&str>,
) -> bool {
    let subject = shared
        .subjects
        .event(&shared.config.pool, task_id, event.kind());
    let body: bytes::Bytes = event.to_json().into();
    for n in 0..5u32 {
        let mut p = PublishMessage::build()
            .payload(body.clone())
            .header(taskbus_proto::HDR_ATTEMPT, attempt.to_string())
            .message_id(format!("{task_id}:{attempt}:outcome"));
        if let Some(tp) = traceparent {
            p = p.header(taskbus_proto::HDR_TRACEPARENT, tp);
        }
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

/// Re-read the pool's settings (breaker threshold and cool-down) from the KV bucket.
async fn refresh_settings<H>(shared: &Shared<H>) {
    let Ok(kv) = shared
        .js
        .get_key_value(shared.subjects.pools_bucket())
        .await
    else {
        return;
    };
    if let Ok(Some(bytes)) = kv.get(&shared.config.pool).await {
        if let Ok(s) = serde_json::from_slice::<PoolSettings>(&bytes) {
            *lock(&shared.settings) = s;
        }
    }
}

/// How long a starting agent waits for the replay of the last hour's cancellations.
const CANCEL_REPLAY_WAIT: Duration = Duration::from_secs(5);

/// Follow `cancelled` events of the pool (replaying the last hour first, so an agent started
/// after a cancellation still skips the task): running tasks are told through their
/// cancellation token, queued ones are skipped when pulled. `replayed` is cancelled once the
/// replay has reached the newest cancellation stored when it began.
async fn watch_cancellations<H: Handler>(
    shared: Arc<Shared<H>>,
    replayed: CancellationToken,
    stop: CancellationToken,
) {
    use async_nats::jetstream::consumer::{self, DeliverPolicy};
    let subject = format!(
        "{}.events.{}.*.cancelled",
        shared.subjects.prefix(),
        shared.config.pool
    );
    let since = Utc::now() - chrono::Duration::hours(1);
    let replay_to = match shared
        .js
        .get_stream_no_info(shared.subjects.events_stream())
        .await
    {
        Ok(stream) => match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) if m.time >= since => m.sequence,
            _ => 0,
        },
        Err(_) => 0,
    };
    if replay_to == 0 {
        replayed.cancel();
    }
    while !stop.is_cancelled() {
        let consumer = match shared.js.get_stream(shared.subjects.events_stream()).await {
            Ok(stream) => stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: subject.clone(),
                    deliver_policy: DeliverPolicy::ByStartTime {
                        start_time: Utc::now() - chrono::Duration::hours(1),
                    },
                    ..Default::default()
                })
                .await
                .ok(),
            Err(_) => None,
        };
        let Some(consumer) = consumer else {
            tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
            continue;
        };
        let Ok(mut messages) = consumer.messages().await else {
            continue;
        };
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = messages.next() => m,
            };
            let Some(Ok(m)) = m else { break };
            if m.info().is_ok_and(|i| i.stream_sequence >= replay_to) {
                replayed.cancel();
            }
            if let Some(id) = m.subject.split('.').rev().nth(1) {
                if let Some(token) = lock(&shared.running).get(id) {
                    token.cancel();
                }
                lock(&shared.cancelled).insert(id.to_string());
            }
        }
    }
}

/// Publish a heartbeat every `heartbeat_every` and refresh pool settings.
async fn heartbeats<H>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.heartbeat_every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        refresh_settings(&shared).await;
        let (breaker, consecutive) = {
            let mut b = lock(&shared.breaker);
            (b.name().to_string(), b.consecutive)
        };
        let hb = Heartbeat {
            agent_id: shared.config.agent_id.clone(),
            pool: shared.config.pool.clone(),
            at: Utc::now(),
            capacity: shared.config.concurrency as u32,
            in_flight: shared.stats.in_flight.load(Ordering::Relaxed),
            version: shared.config.version.clone(),
            breaker,
            consecutive_failures: consecutive,
        };
        if let Ok(body) = serde_json::to_vec(&hb) {
            let subject = shared
                .subjects
                .agent_heartbeat(&shared.config.pool, &shared.config.agent_id);
            let _ = shared.client.publish(subject, body.into()).await;
        }
    }
}

/// Keep this agent's reputation multiplier (from the coordinator's KV bucket) to stamp into
/// `succeeded` events.
async fn watch_reputation<H>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let kv = shared
            .js
            .get_key_value(shared.subjects.reputation_bucket())
            .await;
        let watch = match &kv {
            Ok(kv) => kv.watch_with_history(&shared.config.agent_id).await.ok(),
            Err(_) => None,
        };
        let Some(mut watch) = watch else {
            tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(2)) => {} }
            continue;
        };
        loop {
            let e = tokio::select! {
                _ = stop.cancelled() => return,
                e = watch.next() => e,
            };
            let Some(Ok(e)) = e else { break };
            let value = String::from_utf8_lossy(&e.value).to_string();
            if value.parse::<f64>().is_ok() {
                *lock(&shared.reputation) = Some(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_then_half_opens() {
        let mut b = Breaker::default();
        let cool = Duration::from_millis(30);
        b.record(false, 3, cool);
        b.record(false, 3, cool);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
        b.record(false, 3, cool);
        assert!(matches!(b.state(Instant::now()), BreakerState::Open(_)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
        b.record(false, 3, cool); // a failure while half-open opens it again at once
        assert!(matches!(b.state(Instant::now()), BreakerState::Open(_)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
        b.record(true, 3, cool);
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
        assert_eq!(b.consecutive, 0);
        // threshold 0 disables the breaker
        let mut b = Breaker::default();
        for _ in 0..100 {
            b.record(false, 0, cool);
        }
        assert_eq!(b.state(Instant::now()), BreakerState::Closed);
    }

    #[test]
    fn cancel_set_is_bounded() {
        let mut c = CancelSet::default();
        for i in 0..CancelSet::CAP + 10 {
            c.insert(i.to_string());
        }
        assert_eq!(c.ids.len(), CancelSet::CAP);
        assert!(!c.ids.contains("0"));
        assert!(c.ids.contains(&(CancelSet::CAP + 9).to_string()));
    }
}
