use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use taskbus_runtime::telemetry::{self, LogFormat};
use taskbus_runtime::CancellationToken;
use taskbus_scaler::{simulate, DirectConfig, DirectPolicy};

/// taskbus scaler: publishes each pool's queue lag (backlog, in flight, oldest age, rates,
/// service time, desired replicas) as a KEDA External Scaler (gRPC), as the Kubernetes external
/// metrics API and as Prometheus metrics; optionally scales the pools' Deployments itself
/// (--direct).
///
/// KEDA: a ScaledObject trigger of type `external-push` (or `external`) with
/// `scalerAddress: <service>:<grpc port>`, `pool: <pool>` and optionally `metric: backlog|desired`.
/// Plain HPA: register the HTTP port as the `v1beta1.external.metrics.k8s.io` APIService and use
/// `type: External` metrics named `taskbus-desired-replicas` with selector `pool=<pool>`.
/// See docs/SCALING.md.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(clap::Args, Debug)]
struct Serve {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "TASKBUS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats_auth: taskbus_runtime::nats::NatsAuth,
    /// Subject prefix (one NATS token).
    #[arg(long, env = "TASKBUS_PREFIX", default_value = "taskbus")]
    prefix: String,
    /// Address of the KEDA External Scaler gRPC service.
    #[arg(long, env = "TASKBUS_GRPC_LISTEN", default_value = "0.0.0.0:9090")]
    grpc_listen: SocketAddr,
    /// Address for /healthz, /readyz, /metrics, /v1/lag and the external metrics API.
    #[arg(long, env = "TASKBUS_HTTP_LISTEN", default_value = "0.0.0.0:9465")]
    http_listen: SocketAddr,
    /// PEM certificate (chain) to serve gRPC over TLS (KEDA: set `caCert` in the trigger's
    /// TriggerAuthentication). Without it gRPC is plaintext.
    #[arg(long, env = "TASKBUS_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of --grpc-tls-cert.
    #[arg(long, env = "TASKBUS_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    grpc_tls_key: Option<PathBuf>,
    /// PEM certificate (chain) for HTTPS on --http-listen; the Kubernetes API aggregator needs
    /// HTTPS for the external metrics API. Without it the port serves plain HTTP.
    #[arg(long, env = "TASKBUS_HTTP_TLS_CERT", requires = "http_tls_key")]
    http_tls_cert: Option<PathBuf>,
    /// PEM private key of --http-tls-cert.
    #[arg(long, env = "TASKBUS_HTTP_TLS_KEY", requires = "http_tls_cert")]
    http_tls_key: Option<PathBuf>,
    /// How often each pool's work consumer is read, in milliseconds (10 to 60000).
    #[arg(long, env = "TASKBUS_REFRESH_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    refresh_ms: u64,
    /// Time constant of the smoothed arrival and completion rates, seconds.
    #[arg(long, env = "TASKBUS_SMOOTHING_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    smoothing_s: u64,
    /// Service time assumed until one is measured, milliseconds.
    #[arg(long, env = "TASKBUS_DEFAULT_SERVICE_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    default_service_ms: u64,
    /// Stream replicas (needs a JetStream cluster for more than 1).
    #[arg(long, env = "TASKBUS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    stream_replicas: u64,
    /// Direct mode: patch each pool's Deployment scale subresource (no KEDA/HPA needed).
    #[arg(long, env = "TASKBUS_DIRECT")]
    direct: bool,
    /// Direct mode: namespace of the pools' Deployments.
    #[arg(long, env = "TASKBUS_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Direct mode: Deployment name = this prefix + pool name.
    #[arg(long, env = "TASKBUS_DEPLOYMENT_PREFIX", default_value = "")]
    deployment_prefix: String,
    /// Direct mode: seconds between scaling rounds.
    #[arg(long, env = "TASKBUS_DIRECT_INTERVAL_S", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    direct_interval_s: u64,
    /// Direct mode: most replicas added per round (0 = no limit).
    #[arg(long, env = "TASKBUS_MAX_STEP_UP", default_value_t = 0)]
    max_step_up: u32,
    /// Direct mode: most replicas removed per round (0 = no limit).
    #[arg(long, env = "TASKBUS_MAX_STEP_DOWN", default_value_t = 0)]
    max_step_down: u32,
    /// Direct mode: seconds demand must stay below the replica count before scaling down.
    #[arg(long, env = "TASKBUS_SCALE_DOWN_COOLDOWN_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    scale_down_cooldown_s: u64,
    /// Log format.
    #[arg(long, env = "TASKBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay an arrival trace (CSV: time,pool,tasks,service_ms) through the scaler's policy and
    /// a KEDA-default model; print replica-seconds, queueing delay and time to first replica.
    Simulate {
        /// The trace file.
        #[arg(long)]
        trace: PathBuf,
        /// Tasks one replica runs at a time.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        per_replica: u32,
        /// Target queueing latency, seconds.
        #[arg(long, default_value_t = 10.0)]
        target_latency_s: f64,
        #[arg(long, default_value_t = 0)]
        min_replicas: u32,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        max_replicas: u32,
        /// Seconds from requesting a replica to it serving.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
        startup_s: u64,
        /// taskbus policy: scale-down cool-down, seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        scale_down_cooldown_s: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Simulate {
        trace,
        per_replica,
        target_latency_s,
        min_replicas,
        max_replicas,
        startup_s,
        scale_down_cooldown_s,
    }) = args.command
    {
        anyhow::ensure!(
            target_latency_s.is_finite() && target_latency_s > 0.0,
            "--target-latency-s must be a positive number"
        );
        anyhow::ensure!(
            min_replicas <= max_replicas,
            "--min-replicas is above --max-replicas"
        );
        let text = std::fs::read_to_string(&trace)
            .with_context(|| format!("cannot read trace {}", trace.display()))?;
        let arrivals =
            simulate::parse_trace(&text).with_context(|| format!("trace {}", trace.display()))?;
        let params = simulate::SimParams {
            per_replica,
            target_latency_s,
            min_replicas,
            max_replicas,
            startup: Duration::from_secs(startup_s),
            policy: DirectPolicy {
                scale_down_cooldown: Duration::from_secs(scale_down_cooldown_s),
                ..Default::default()
            },
            ..Default::default()
        };
        print!(
            "{}",
            simulate::render(&simulate::simulate(&arrivals, &params))
        );
        return Ok(());
    }
    let s = args.serve;
    telemetry::init(s.log_format, "info");
    let mut config = taskbus_scaler::Config::new(s.nats_url);
    config.nats_auth = s.nats_auth;
    config.prefix = s.prefix;
    config.grpc_listen = s.grpc_listen;
    config.http_listen = s.http_listen;
    if let (Some(cert), Some(key)) = (s.grpc_tls_cert, s.grpc_tls_key) {
        config.grpc_tls = Some(taskbus_scaler::tls::TlsFiles { cert, key });
    }
    if let (Some(cert), Some(key)) = (s.http_tls_cert, s.http_tls_key) {
        config.http_tls = Some(taskbus_scaler::tls::TlsFiles { cert, key });
    }
    config.refresh_interval = Duration::from_millis(s.refresh_ms);
    config.smoothing = Duration::from_secs(s.smoothing_s);
    config.default_service_time = Duration::from_millis(s.default_service_ms);
    config.streams.replicas = s.stream_replicas as usize;
    if s.direct {
        anyhow::ensure!(
            taskbus_proto::ids::is_valid_pool(&s.namespace),
            "--namespace {:?} is not a valid namespace name",
            s.namespace
        );
        let mut d = DirectConfig::new(s.namespace);
        d.deployment_prefix = s.deployment_prefix;
        d.interval = Duration::from_secs(s.direct_interval_s);
        d.policy = DirectPolicy {
            max_step_up: s.max_step_up,
            max_step_down: s.max_step_down,
            scale_down_cooldown: Duration::from_secs(s.scale_down_cooldown_s),
        };
        config.direct = Some(d);
    }
    let shutdown = CancellationToken::new();
    let running = taskbus_scaler::start(config, shutdown.clone()).await?;
    taskbus_runtime::cancel_on_signal(shutdown).await;
    running.wait().await;
    Ok(())
}
