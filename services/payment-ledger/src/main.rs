use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use rust_decimal::Decimal;
use taskbus_ledger::money::{CurrencySpec, SpendBudget};
use taskbus_runtime::telemetry::{self, LogFormat};
use taskbus_runtime::CancellationToken;

/// taskbus payment ledger: holds the price of priced tasks at admission (`taskbus.ledger.hold`),
/// posts or voids the holds from the task events, and answers the operator API
/// (`taskbus ledger …`).
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
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "TASKBUS_HTTP_LISTEN", default_value = "0.0.0.0:9466")]
    http_listen: SocketAddr,
    /// Currencies as CODE:SCALE (decimals allowed), comma separated. A currency's scale cannot
    /// change once used.
    #[arg(
        long,
        env = "TASKBUS_LEDGER_CURRENCIES",
        value_delimiter = ',',
        default_value = "USD:2,SAT:0"
    )]
    currencies: Vec<CurrencySpec>,
    /// Currency of prices and deposits that name none.
    #[arg(long, env = "TASKBUS_LEDGER_DEFAULT_CURRENCY", default_value = "USD")]
    default_currency: String,
    /// Share of each payout the platform keeps (0 to 1).
    #[arg(long, env = "TASKBUS_LEDGER_FEE_SHARE", default_value = "0.1")]
    fee_share: Decimal,
    /// Escrow and platform accounts per currency (spreads row locks).
    #[arg(long, env = "TASKBUS_LEDGER_SHARDS", default_value_t = 8)]
    shards: u32,
    /// Most events settled in one transaction.
    #[arg(long, env = "TASKBUS_LEDGER_BATCH_SIZE", default_value_t = 2000)]
    batch_size: usize,
    /// Seconds before an unacknowledged event is redelivered (applies when the consumer is
    /// created). After a replica dies, settlement waits this long for its events, to keep
    /// stream order.
    #[arg(long, env = "TASKBUS_LEDGER_ACK_WAIT_SECS", default_value_t = 10)]
    ack_wait_secs: u64,
    /// Durable consumer name on the events stream.
    #[arg(long, env = "TASKBUS_LEDGER_CONSUMER", default_value = "ledger")]
    consumer: String,
    /// Also read `held` events and re-apply their holds: for a ledger rebuilding a lost
    /// database from the events stream (use a fresh --consumer). Applies when the consumer is
    /// created.
    #[arg(long, env = "TASKBUS_LEDGER_REPLAY_HELD")]
    replay_held: bool,
    /// PostgreSQL connections.
    #[arg(long, env = "TASKBUS_LEDGER_DB_CONNECTIONS", default_value_t = 8)]
    db_connections: u32,
    /// Stream replicas (needs a JetStream cluster for more than 1).
    #[arg(long, env = "TASKBUS_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// Hourly spend per currency as CURRENCY=AMOUNT, comma separated (e.g. USD=250). Exported
    /// as taskbus_ledger_spend_budget_per_hour for the TaskbusSpendOverBudget alert, which fires
    /// when the last hour's payouts and fees in that currency exceed it. Nothing is refused.
    #[arg(
        long,
        env = "TASKBUS_LEDGER_SPEND_BUDGET_PER_HOUR",
        value_delimiter = ','
    )]
    spend_budget_per_hour: Vec<SpendBudget>,
    /// Log format.
    #[arg(long, env = "TASKBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, "info");
    let mut config = taskbus_ledger::Config::new(args.nats_url, args.database_url);
    config.nats_auth = args.nats_auth;
    config.prefix = args.prefix;
    config.http_listen = Some(args.http_listen);
    config.streams.replicas = args.stream_replicas;
    config.ledger.currencies = args.currencies;
    config.ledger.default_currency = args.default_currency;
    config.ledger.fee_share = args.fee_share;
    config.ledger.shards = args.shards;
    config.batch_size = args.batch_size;
    config.ack_wait = Duration::from_secs(args.ack_wait_secs.max(1));
    config.consumer = args.consumer;
    config.db_max_connections = args.db_connections;
    config.replay_held = args.replay_held;
    config.spend_budgets = args.spend_budget_per_hour;
    let shutdown = CancellationToken::new();
    let running = taskbus_ledger::start(config, shutdown.clone()).await?;
    taskbus_runtime::cancel_on_signal(shutdown).await;
    running.wait().await;
    Ok(())
}
