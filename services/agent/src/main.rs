use std::time::Duration;

use clap::Parser;
use taskbus_agent::handlers::Demo;
use taskbus_agent::{Agent, AgentConfig, CancellationToken};
use taskbus_runtime::telemetry::{self, LogFormat};

/// taskbus demo agent: pulls tasks of one pool and runs a built-in handler.
///
/// Handlers: `echo` (result = payload), `sleep` (payload `{"ms": N}`), `fail` (fails every
/// attempt). On SIGTERM it stops pulling, finishes in-flight tasks within --grace-seconds and
/// hands the rest back to the queue. Health and Prometheus metrics are served on --http-listen.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Pool to serve (a DNS label).
    #[arg(long, env = "TASKBUS_POOL")]
    pool: String,
    /// Built-in handler.
    #[arg(long, env = "TASKBUS_HANDLER", value_enum)]
    handler: Demo,
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
    /// Agent id (default: $HOSTNAME, i.e. the pod name).
    #[arg(long, env = "TASKBUS_AGENT_ID")]
    agent_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, env = "TASKBUS_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Seconds in-flight tasks may run after SIGTERM before they are handed back.
    #[arg(long, env = "TASKBUS_GRACE_SECONDS", default_value_t = 25)]
    grace_seconds: u64,
    /// Address for /healthz, /readyz (ready while serving the pool, not while draining) and
    /// /metrics (tasks by outcome, in flight, handler durations).
    #[arg(long, env = "TASKBUS_HTTP_LISTEN", default_value = "0.0.0.0:9467")]
    http_listen: std::net::SocketAddr,
    #[arg(long, env = "TASKBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let mut config = AgentConfig::new(args.nats_url, args.pool);
    config.nats_auth = args.nats_auth;
    config.prefix = args.prefix;
    if let Some(id) = args.agent_id {
        config.agent_id = id;
    }
    config.concurrency = args.concurrency;
    config.grace = Duration::from_secs(args.grace_seconds);
    config.http_listen = Some(args.http_listen);
    let handler = args.handler;
    let shutdown = CancellationToken::new();
    let agent = Agent::new(config, move |t| handler.run(t));
    let run = agent.run(shutdown.clone());
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => r?,
        _ = taskbus_runtime::cancel_on_signal(shutdown.clone()) => run.await?,
    }
    Ok(())
}
