//! The dispatcher process: one agent (of the agent SDK) per pool it serves, all sharing one GPU
//! allocator and one backend.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;
use taskbus_agent::{
    Agent, AgentConfig, CancellationToken, Handler, Placement, Slot, TaskContext, TaskError,
    WorkItem,
};
use taskbus_proto::api::{Reply, TaskGet, TaskRecord};
use taskbus_proto::{Resources, Subjects};
use tracing::{info, warn};

use crate::allocator::{Allocator, Gpu, PoolQuota, Request};
use crate::jobs::{JobBackend, JobsConfig};
use crate::launch::Launch;
use crate::local::LocalConfig;

/// How tasks run.
#[derive(Clone)]
pub enum Backend {
    /// Child processes of the dispatcher, pinned to their GPUs.
    Local(LocalConfig),
    /// One Kubernetes Job per attempt. `client: None` uses the in-cluster or kubeconfig
    /// settings (`kube::Client::try_default`).
    Kubernetes {
        jobs: Box<JobsConfig>,
        client: Option<kube::Client>,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Local(c) => f.debug_tuple("Local").field(c).finish(),
            Backend::Kubernetes { jobs, client } => f
                .debug_struct("Kubernetes")
                .field("jobs", jobs)
                .field("client", &client.as_ref().map(|_| "given"))
                .finish(),
        }
    }
}

/// Where the GPUs come from.
#[derive(Debug, Clone)]
pub enum GpuSource {
    /// Every GPU NVML sees (local backend).
    Nvml,
    /// GPUs declared by configuration (local without NVML; Kubernetes: how many GPUs the
    /// dispatcher's Jobs may hold at once).
    Declared(Vec<Gpu>),
}

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub nats_url: String,
    pub nats_auth: taskbus_runtime::nats::NatsAuth,
    pub prefix: String,
    /// Used as the agent id of every pool's agent.
    pub agent_id: String,
    /// Pools served, first ranked first, with their GPU quotas.
    pub pools: Vec<PoolQuota>,
    pub backend: Backend,
    pub gpus: GpuSource,
    /// How long running tasks may go on after shutdown starts before they are handed back.
    pub grace: Duration,
    pub http_listen: Option<SocketAddr>,
    /// How often the Kubernetes backend deletes Jobs whose attempt is over.
    pub sweep_every: Duration,
}

impl DispatcherConfig {
    pub fn new(nats_url: impl Into<String>, pools: Vec<PoolQuota>, backend: Backend) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_auth: Default::default(),
            prefix: taskbus_proto::subjects::DEFAULT_PREFIX.into(),
            agent_id: taskbus_agent::default_agent_id(),
            pools,
            backend,
            gpus: GpuSource::Nvml,
            grace: Duration::from_secs(25),
            http_listen: None,
            sweep_every: Duration::from_secs(60),
        }
    }
}

/// Errors that stop the dispatcher.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("invalid dispatcher settings: {0}")]
    Config(String),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error("cannot reach the Kubernetes API: {0} (in a pod, check the ServiceAccount; outside, check KUBECONFIG)")]
    Kube(String),
    #[error(transparent)]
    Nats(#[from] taskbus_runtime::nats::NatsError),
    #[error("pool {pool}: {source}")]
    Agent {
        pool: String,
        #[source]
        source: taskbus_agent::AgentError,
    },
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

enum Runner {
    Local(LocalConfig),
    Kube {
        backend: JobBackend,
        /// Jobs this process watches now (the sweep leaves them alone).
        watching: Mutex<HashSet<String>>,
    },
}

impl Runner {
    /// `shutdown`: the agent's token for "giving up on the attempt at the end of the grace".
    async fn run(&self, l: Launch, shutdown: CancellationToken) -> Result<Value, TaskError> {
        match self {
            // The process stops with the dispatcher: its GPUs are about to go to nobody.
            Runner::Local(c) => crate::local::run(c, l).await,
            Runner::Kube { backend, watching } => {
                let name = crate::jobs::job_name(&l.pool, &l.task_id, l.attempt);
                lock(watching).insert(name.clone());
                let l = Launch {
                    devices: Vec::new(), // the scheduler picks the devices
                    ..l
                };
                let r = backend.run_attempt(l, shutdown).await;
                lock(watching).remove(&name);
                r
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The handler of one pool: places tasks on the shared allocator, runs them on the backend.
struct GpuHandler {
    pool: String,
    alloc: Arc<Allocator>,
    runner: Arc<Runner>,
}

/// What a task with these `resources` asks for (a GPU task without `resources.gpus` gets one
/// GPU).
pub fn request_of(pool: &str, resources: Option<&Resources>) -> Request {
    let r = resources.cloned().unwrap_or_default();
    Request {
        pool: pool.to_string(),
        gpus: r.gpus.unwrap_or(1),
        memory_mib: r.gpu_memory_mib,
        product: r.gpu_product,
    }
}

impl Handler for GpuHandler {
    fn handle(
        &self,
        t: TaskContext,
    ) -> impl std::future::Future<Output = Result<Value, TaskError>> + Send {
        let runner = self.runner.clone();
        async move {
            let req = request_of(&t.pool, t.resources.as_ref());
            let shutdown = t.shutdown.clone();
            let l = Launch {
                task_id: t.task_id,
                pool: t.pool,
                attempt: t.attempt,
                kind: t.kind,
                payload: t.payload,
                labels: t.labels,
                gpus: req.gpus,
                gpu_memory_mib: req.memory_mib,
                gpu_product: req.product,
                devices: t.devices,
                timeout: t.timeout,
                cancel: t.cancel,
                traceparent: t.traceparent,
            };
            runner.run(l, shutdown).await
        }
    }

    fn room(&self) -> usize {
        self.alloc.room(&self.pool)
    }

    fn place(&self, item: &WorkItem) -> impl std::future::Future<Output = Placement> + Send {
        let req = request_of(&self.pool, item.task.resources.as_ref());
        let alloc = self.alloc.clone();
        async move {
            match alloc.acquire(req).await {
                Ok(grant) => Placement::Ready(Slot {
                    devices: grant.devices.clone(),
                    guard: Some(Box::new(grant)),
                }),
                Err(why) => Placement::Never(why),
            }
        }
    }
}

/// GPU gauges for `/metrics`.
#[derive(Debug)]
struct GpuCollector(Arc<Allocator>);

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (total, pools) = self.0.usage();
        let g = ConstGauge::new(total as i64);
        g.encode(encoder.encode_descriptor(
            "gpus",
            "GPUs this dispatcher hands out",
            None,
            MetricType::Gauge,
        )?)?;
        let mut busy = encoder.encode_descriptor(
            "gpus_in_use",
            "GPUs held by running tasks, by pool",
            None,
            MetricType::Gauge,
        )?;
        for (pool, used, _) in &pools {
            ConstGauge::new(i64::from(*used))
                .encode(busy.encode_family(&[("pool", pool.as_str())])?)?;
        }
        let mut waiting = encoder.encode_descriptor(
            "tasks_waiting",
            "Tasks pulled and waiting for free GPUs, by pool",
            None,
            MetricType::Gauge,
        )?;
        for (pool, _, w) in &pools {
            ConstGauge::new(*w as i64)
                .encode(waiting.encode_family(&[("pool", pool.as_str())])?)?;
        }
        Ok(())
    }
}

fn validate(c: &DispatcherConfig, gpus: &[Gpu]) -> Result<(), DispatchError> {
    let bad = |m: String| Err(DispatchError::Config(m));
    if c.pools.is_empty() {
        return bad("give at least one pool (--pool NAME[=QUOTA])".into());
    }
    let mut seen = HashSet::new();
    for p in &c.pools {
        if !taskbus_proto::ids::is_valid_pool(&p.pool) {
            return bad(format!(
                "{:?} is not a valid pool name (a DNS label: a-z, 0-9 and -, at most 63)",
                p.pool
            ));
        }
        if !seen.insert(p.pool.as_str()) {
            return bad(format!("pool {:?} is given twice", p.pool));
        }
        if p.quota == Some(0) {
            return bad(format!(
                "pool {:?} has a quota of 0 GPUs, so it could never run a task",
                p.pool
            ));
        }
    }
    if gpus.is_empty() {
        return bad("the dispatcher has no GPU to hand out".into());
    }
    match &c.backend {
        Backend::Local(l) if l.programs.is_empty() => bad(
            "the local backend needs at least one --exec KIND=PROGRAM (what each task kind runs)"
                .into(),
        ),
        Backend::Kubernetes { jobs, .. } => match jobs.problems().first() {
            Some(p) => bad(p.clone()),
            None => Ok(()),
        },
        Backend::Local(_) => Ok(()),
    }
}

/// Run until `shutdown` is cancelled and every pool's agent has drained.
pub async fn run(
    config: DispatcherConfig,
    shutdown: CancellationToken,
) -> Result<(), DispatchError> {
    let gpus = match &config.gpus {
        GpuSource::Nvml => crate::inventory::from_nvml()?,
        GpuSource::Declared(g) => g.clone(),
    };
    validate(&config, &gpus)?;
    let runner = match &config.backend {
        Backend::Local(c) => Runner::Local(c.clone()),
        Backend::Kubernetes { jobs, client } => {
            let client = match client {
                Some(c) => c.clone(),
                None => kube::Client::try_default()
                    .await
                    .map_err(|e| DispatchError::Kube(e.to_string()))?,
            };
            Runner::Kube {
                backend: JobBackend::new(client, jobs.as_ref().clone()),
                watching: Mutex::default(),
            }
        }
    };
    let runner = Arc::new(runner);
    info!(
        gpus = ?gpus.iter().map(|g| format!("{} {}", g.id, g.product.as_deref().unwrap_or(""))).collect::<Vec<_>>(),
        pools = ?config.pools.iter().map(|p| format!("{}={}", p.pool, p.quota.map_or("all".into(), |q| q.to_string()))).collect::<Vec<_>>(),
        "GPU dispatcher starting"
    );
    let total = gpus.len();
    let alloc = Allocator::new(gpus, config.pools.clone());
    let client = taskbus_runtime::nats::connect(
        &config.nats_url,
        &config.nats_auth,
        &format!("taskbus-gpu-dispatcher {}", config.agent_id),
    )
    .await?;

    let mut agents = Vec::new();
    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix("taskbus_gpu")
        .register_collector(Box::new(GpuCollector(alloc.clone())));
    for p in &config.pools {
        let mut ac = AgentConfig::new(config.nats_url.clone(), p.pool.clone());
        ac.nats_auth = config.nats_auth.clone();
        ac.prefix = config.prefix.clone();
        ac.agent_id = config.agent_id.clone();
        // Every task holds at least one GPU, so no pool ever runs more tasks than there are.
        ac.concurrency = total;
        ac.grace = config.grace;
        let agent = Agent::new(
            ac,
            GpuHandler {
                pool: p.pool.clone(),
                alloc: alloc.clone(),
                runner: runner.clone(),
            },
        );
        registry
            .sub_registry_with_prefix("taskbus_agent")
            .sub_registry_with_label((
                std::borrow::Cow::Borrowed("pool"),
                std::borrow::Cow::Owned(p.pool.clone()),
            ))
            .register_collector(taskbus_agent::stats_collector(agent.stats()));
        agents.push((p.pool.clone(), agent));
    }

    let http = taskbus_runtime::TaskTracker::new();
    let http_stop = CancellationToken::new();
    let health = taskbus_runtime::http::Health::new(registry);
    health.watch_nats(&client);
    if let Some(addr) = config.http_listen {
        let bound =
            taskbus_runtime::http::spawn_health(&http, addr, health.clone(), http_stop.clone())
                .await
                .map_err(|source| DispatchError::Http { addr, source })?;
        info!(http = %bound, "serving /healthz, /readyz and /metrics");
    }
    http.close();

    let sweep = async {
        if let Runner::Kube { backend, watching } = runner.as_ref() {
            sweep_loop(backend, watching, &config, &client, shutdown.clone()).await;
        }
    };
    health.set_ready(true);
    let runs = join_all(agents.into_iter().map(|(pool, agent)| {
        let shutdown = shutdown.clone();
        async move {
            agent
                .run(shutdown)
                .await
                .map_err(|source| DispatchError::Agent { pool, source })
        }
    }));
    let (results, ()) = tokio::join!(
        async {
            let r = runs.await;
            // One pool's agent failing to start stops the others: a half-started dispatcher
            // would look healthy while a pool goes unserved.
            shutdown.cancel();
            r
        },
        sweep
    );
    health.set_ready(false);
    http_stop.cancel();
    http.wait().await;
    client.flush().await.ok();
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    info!("GPU dispatcher stopped");
    Ok(())
}

/// Whether the coordinator still has `attempt` of `task_id` queued or running; `None` when it
/// cannot tell (no answer).
pub async fn attempt_is_live(
    client: &async_nats::Client,
    subjects: &Subjects,
    task_id: &str,
    attempt: u32,
) -> Option<bool> {
    let body = serde_json::to_vec(&TaskGet {
        id: task_id.to_string(),
    })
    .ok()?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subjects.api("task.get"), body.into()),
    )
    .await
    .ok()?
    .ok()?;
    match serde_json::from_slice::<Reply<TaskRecord>>(&reply.payload).ok()? {
        Reply::Ok(t) => {
            let open = matches!(t.status.as_str(), "admitted" | "queued" | "running");
            Some(open && t.attempt == attempt as i32)
        }
        // The coordinator has no such task (e.g. its record was removed by retention).
        Reply::Error(e) if e.code == 404 => Some(false),
        Reply::Error(_) => None,
    }
}

async fn sweep_loop(
    backend: &JobBackend,
    watching: &Mutex<HashSet<String>>,
    config: &DispatcherConfig,
    client: &async_nats::Client,
    shutdown: CancellationToken,
) {
    let subjects = Subjects::new(&config.prefix);
    let mut tick = tokio::time::interval(config.sweep_every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for p in &config.pools {
            let watched = lock(watching).clone();
            let live = |task: String, attempt: u32| {
                let subjects = subjects.clone();
                async move { attempt_is_live(client, &subjects, &task, attempt).await }
            };
            match backend.sweep(&p.pool, &watched, live).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(pool = %p.pool, deleted = n, "deleted Jobs of attempts that are over")
                }
                Err(e) => {
                    warn!(pool = %p.pool, error = %e, "could not sweep Jobs; trying again later")
                }
            }
        }
    }
}
