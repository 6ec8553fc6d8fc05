use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use taskbus_gpu_dispatcher::allocator::PoolQuota;
use taskbus_gpu_dispatcher::dispatcher::{self, Backend, DispatcherConfig, GpuSource};
use taskbus_gpu_dispatcher::jobs::{parse_template, JobsConfig};
use taskbus_gpu_dispatcher::local::{parse_exec, LocalConfig};
use taskbus_gpu_dispatcher::{inventory, parse_pool};
use taskbus_runtime::telemetry::{self, LogFormat};
use taskbus_runtime::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Child processes of the dispatcher, pinned to their GPUs with CUDA_VISIBLE_DEVICES.
    Local,
    /// One batch/v1 Job per task attempt, requesting nvidia.com/gpu.
    Kubernetes,
}

/// taskbus GPU dispatcher: the agent of GPU pools.
///
/// Pulls a task only when it can place it: a task asks for `resources.gpus` whole GPUs
/// (default 1), optionally of a `gpu_product` with at least `gpu_memory_mib` each; the dispatcher
/// gives it free matching GPUs and never the same GPU to two tasks. A task that could never fit
/// here fails at once with the reason.
///
/// Backends:
///   local       runs the program configured for the task's kind (--exec) as a child process
///               with CUDA_VISIBLE_DEVICES set to its GPUs (found with NVML, or declared with
///               --gpus); kills its process group on cancel or timeout.
///   kubernetes  creates one Job per attempt from the template of the task's kind
///               (--job-template), with nvidia.com/gpu limits, GPU Feature Discovery node
///               selectors and a deadline from the task's timeout; watches it, deletes it on
///               cancel, and deletes Jobs of attempts that are over. --gpus caps the GPUs its
///               Jobs hold at once.
///
/// Examples:
///   taskbus-gpu-dispatcher --pool gpu --exec train=/opt/bin/train
///   taskbus-gpu-dispatcher --pool gpu --pool gpu-batch=2 --exec infer=/app/infer.sh
///   taskbus-gpu-dispatcher --backend kubernetes --gpus 16 --pool gpu \
///       --job-template "train=ghcr.io/acme/trainer:1.4 python -m train"
///
/// See docs/GPU.md.
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// Pool to serve, `NAME` or `NAME=QUOTA` (most GPUs it may hold at once). Repeat for
    /// several pools; the first given is served first when GPUs are short.
    #[arg(long = "pool", env = "TASKBUS_POOLS", value_delimiter = ',', required = true, value_parser = parse_pool)]
    pools: Vec<PoolQuota>,
    #[arg(long, env = "TASKBUS_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    backend: BackendKind,
    /// Local backend: `KIND=PROGRAM [ARGS...]` (split at whitespace, no quoting), the program
    /// a task of that kind runs. Repeat per kind. Tasks add `payload.args`; the payload is
    /// written to the program's stdin.
    #[arg(long = "exec", env = "TASKBUS_EXEC", value_delimiter = ';', value_parser = parse_exec)]
    exec: Vec<(String, Vec<String>)>,
    /// Declare N GPUs instead of asking NVML (local), or the most GPUs the Jobs may hold at
    /// once (kubernetes, required there).
    #[arg(long, env = "TASKBUS_GPUS", value_parser = clap::value_parser!(u32).range(1..=4096))]
    gpus: Option<u32>,
    /// Product of the declared GPUs (GPU Feature Discovery spelling, e.g. NVIDIA-A10).
    #[arg(long, env = "TASKBUS_GPU_PRODUCT", requires = "gpus")]
    gpu_product: Option<String>,
    /// Memory of each declared GPU, MiB.
    #[arg(long, env = "TASKBUS_GPU_MEMORY_MIB", requires = "gpus")]
    gpu_memory_mib: Option<u64>,
    /// Kubernetes backend: `KIND=IMAGE [COMMAND...]`, the Job template of a task kind. Repeat
    /// per kind.
    #[arg(long = "job-template", env = "TASKBUS_JOB_TEMPLATES", value_delimiter = ';', value_parser = parse_template)]
    job_templates: Vec<(String, taskbus_gpu_dispatcher::jobs::JobTemplate)>,
    /// Kubernetes backend: namespace of the Jobs (default: the dispatcher's own, from
    /// POD_NAMESPACE, else `default`).
    #[arg(long, env = "TASKBUS_JOB_NAMESPACE")]
    namespace: Option<String>,
    /// Kubernetes backend: seconds a finished Job is kept (ttlSecondsAfterFinished).
    #[arg(long, env = "TASKBUS_JOB_TTL_SECONDS", default_value_t = 3600)]
    job_ttl_seconds: u64,
    /// Kubernetes backend: size limit of the in-memory /dev/shm (a quantity, e.g. 16Gi).
    #[arg(long, env = "TASKBUS_SHM_SIZE")]
    shm_size: Option<String>,
    /// Kubernetes backend: ServiceAccount of the Jobs' pods (default: none mounted).
    #[arg(long, env = "TASKBUS_JOB_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// Kubernetes backend: image pull Secret for the Jobs. Repeatable.
    #[arg(
        long = "image-pull-secret",
        env = "TASKBUS_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    image_pull_secrets: Vec<String>,
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "TASKBUS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats_auth: taskbus_runtime::nats::NatsAuth,
    /// Subject prefix.
    #[arg(long, env = "TASKBUS_PREFIX", default_value = "taskbus")]
    prefix: String,
    /// Agent id in events (default: $HOSTNAME, i.e. the pod name).
    #[arg(long, env = "TASKBUS_AGENT_ID")]
    agent_id: Option<String>,
    /// Seconds running tasks may go on after SIGTERM before they are stopped and handed back.
    #[arg(long, env = "TASKBUS_GRACE_SECONDS", default_value_t = 25)]
    grace_seconds: u64,
    /// Address for /healthz, /readyz and /metrics (GPUs in use and waiting tasks per pool,
    /// tasks by outcome).
    #[arg(long, env = "TASKBUS_HTTP_LISTEN", default_value = "0.0.0.0:9467")]
    http_listen: std::net::SocketAddr,
    #[arg(long, env = "TASKBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn config(args: Args) -> anyhow::Result<DispatcherConfig> {
    let declared = args
        .gpus
        .map(|n| inventory::declared(n, args.gpu_product.as_deref(), args.gpu_memory_mib));
    let (backend, gpus) = match args.backend {
        BackendKind::Local => {
            if !args.job_templates.is_empty() {
                anyhow::bail!("--job-template is for --backend kubernetes; the local backend runs --exec programs");
            }
            let local = LocalConfig {
                programs: args.exec.into_iter().collect::<BTreeMap<_, _>>(),
                ..LocalConfig::default()
            };
            let gpus = declared.map_or(GpuSource::Nvml, GpuSource::Declared);
            (Backend::Local(local), gpus)
        }
        BackendKind::Kubernetes => {
            if !args.exec.is_empty() {
                anyhow::bail!("--exec is for --backend local; the kubernetes backend runs --job-template images");
            }
            let Some(gpus) = declared else {
                anyhow::bail!("--backend kubernetes needs --gpus N: the most GPUs this dispatcher's Jobs may hold at once");
            };
            let namespace = args
                .namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into());
            let mut jobs = JobsConfig::new(namespace);
            jobs.templates = args.job_templates.into_iter().collect();
            jobs.ttl_after_finished = Duration::from_secs(args.job_ttl_seconds);
            jobs.shm_size = args.shm_size;
            jobs.service_account = args.service_account;
            jobs.image_pull_secrets = args.image_pull_secrets;
            let backend = Backend::Kubernetes {
                jobs: Box::new(jobs),
                client: None,
            };
            (backend, GpuSource::Declared(gpus))
        }
    };
    let mut c = DispatcherConfig::new(args.nats_url, args.pools, backend);
    c.nats_auth = args.nats_auth;
    c.prefix = args.prefix;
    if let Some(id) = args.agent_id {
        c.agent_id = id;
    }
    c.gpus = gpus;
    c.grace = Duration::from_secs(args.grace_seconds);
    c.http_listen = Some(args.http_listen);
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let config = config(args)?;
    let shutdown = CancellationToken::new();
    let run = dispatcher::run(config, shutdown.clone());
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => r?,
        _ = taskbus_runtime::cancel_on_signal(shutdown.clone()) => run.await?,
    }
    Ok(())
}
