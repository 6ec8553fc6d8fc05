use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use taskbus_runtime::telemetry::{self, LogFormat};
use taskbus_runtime::CancellationToken;

/// taskbus coordinator: admits tasks from `taskbus.submit.<pool>`, records them in PostgreSQL,
/// routes them to `taskbus.work.<pool>.<priority>` and records their outcomes.
///
/// Run as many replicas as you like against one NATS and one PostgreSQL.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "TASKBUS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats_auth: taskbus_runtime::nats::NatsAuth,
    /// PostgreSQL URL, e.g. postgres://user:pass@host/db. Migrations run on start.
    #[arg(long, env = "TASKBUS_DATABASE_URL")]
    database_url: String,
    /// Subject prefix (one NATS token).
    #[arg(long, env = "TASKBUS_PREFIX", default_value = "taskbus")]
    prefix: String,
    /// Pools to create with default settings when missing (comma separated).
    #[arg(
        long,
        env = "TASKBUS_POOLS",
        value_delimiter = ',',
        default_value = "default"
    )]
    pools: Vec<String>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "TASKBUS_HTTP_LISTEN", default_value = "0.0.0.0:9464")]
    http_listen: SocketAddr,
    /// Stream replicas (needs a JetStream cluster for more than 1).
    #[arg(long, env = "TASKBUS_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// Largest submit message accepted, bytes.
    #[arg(long, env = "TASKBUS_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024)]
    max_message_bytes: usize,
    /// Most messages per admission batch.
    #[arg(long, env = "TASKBUS_BATCH_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Admission batches writing at once: while one waits for its INSERT and work publishes
    /// the next is validated and written (a batch waiting only for the WAL flush and its acks
    /// does not count). 1 = strictly one after the other. Admission opens this many
    /// PostgreSQL connections of its own, besides the coordinator's other 8.
    #[arg(long, env = "TASKBUS_ADMISSION_PIPELINE", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    admission_pipeline: u32,
    /// Delete the records of succeeded, cancelled, expired and rejected tasks this long after
    /// they finished, e.g. 30d, 36h, 90min (at least 10min). Left out, records are kept
    /// forever. A task id whose record was deleted is admitted and run again if it is submitted
    /// again (a priced task is refused by the ledger instead): keep records longer than
    /// producers may resend.
    #[arg(long, env = "TASKBUS_FINISHED_RETENTION", value_name = "DURATION",
          value_parser = taskbus_coordinator::retention::parse_retention)]
    finished_retention: Option<Duration>,
    /// Delete dead tasks (the dead-letter queue) this long after they died, e.g. 90d. Left
    /// out, they stay until replayed. A deleted dead task can no longer be replayed.
    #[arg(long, env = "TASKBUS_DEAD_RETENTION", value_name = "DURATION",
          value_parser = taskbus_coordinator::retention::parse_retention)]
    dead_retention: Option<Duration>,
    /// Send a queued task's work again when its message is gone from TASKBUS_WORK (purged, or
    /// lost with a server's disk) and it was handed out at least this long before the oldest
    /// message of its pool and priority, e.g. 3min, 10min (at least 30s). Agents that ack work
    /// before they publish `started` and run longer than this may see an attempt twice.
    #[arg(long, env = "TASKBUS_LOST_WORK_AFTER", value_name = "DURATION", default_value = "3min",
          value_parser = taskbus_coordinator::lost::parse_lost_work_after)]
    lost_work_after: Duration,
    /// Log format.
    #[arg(long, env = "TASKBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let mut config = taskbus_coordinator::Config::new(args.nats_url, args.database_url);
    config.nats_auth = args.nats_auth;
    config.prefix = args.prefix;
    config.ensure_pools = args.pools;
    config.http_listen = Some(args.http_listen);
    config.streams.replicas = args.stream_replicas;
    config.limits.max_message_bytes = args.max_message_bytes;
    config.batch_size = args.batch_size as usize;
    config.admission_pipeline = args.admission_pipeline as usize;
    config.lost_work_after = args.lost_work_after;
    config.retention.finished = args.finished_retention;
    config.retention.dead = args.dead_retention;
    let shutdown = CancellationToken::new();
    let running = taskbus_coordinator::start(config, shutdown.clone()).await?;
    taskbus_runtime::cancel_on_signal(shutdown).await;
    running.wait().await;
    Ok(())
}
