//! `taskbus`: the operator and developer CLI.

mod api;
mod bench;
mod dev;
mod ledger;
mod local;
mod ops;
mod output;
mod schedules;
mod submit;
mod task_flags;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use taskbus_runtime::telemetry::{self, LogFormat};

/// taskbus: an event-driven task coordinator on NATS JetStream.
///
/// Start a whole local stack with `taskbus dev`, then submit work with `taskbus submit` or any
/// NATS client (`nats pub taskbus.submit.default '{"kind":"echo","payload":{"x":1}}'`), and
/// watch it with `taskbus tasks list`.
#[derive(Parser, Debug)]
#[command(name = "taskbus", version, about, long_about, propagate_version = true)]
struct Cli {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        global = true,
        env = "TASKBUS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// NATS credentials and TLS (made global in `parse`, so they go after any subcommand).
    #[command(flatten)]
    nats_auth: taskbus_runtime::nats::NatsAuth,
    /// Subject prefix (one NATS token).
    #[arg(long, global = true, env = "TASKBUS_PREFIX", default_value = "taskbus")]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole stack in one process: nats-server and PostgreSQL (started for you unless
    /// --nats-url / --database-url or TASKBUS_NATS_URL / TASKBUS_DATABASE_URL are given), the coordinator, demo agents and a demo load,
    /// with a live status line.
    Dev(dev::DevArgs),
    /// Submit a task (JetStream publish to taskbus.submit.<pool>); --wait prints its outcome.
    Submit(submit::SubmitArgs),
    /// One task.
    Task {
        #[command(subcommand)]
        cmd: TaskCmd,
    },
    /// Lists of tasks.
    Tasks {
        #[command(subcommand)]
        cmd: TasksCmd,
    },
    /// Cancel a queued task (it never runs) or a running one (its handler is told to stop).
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: tasks whose attempts are exhausted.
    Dlq {
        #[command(subcommand)]
        cmd: ops::DlqCmd,
    },
    /// Agents: heartbeats, health, circuit breaker, reputation.
    Agents {
        #[command(subcommand)]
        cmd: ops::AgentsCmd,
    },
    /// The payment ledger: deposits, withdrawals, balances, statements, transfers by task.
    Ledger {
        #[command(subcommand)]
        cmd: ledger::LedgerCmd,
    },
    /// Pool settings (JetStream KV bucket taskbus_pools).
    Pools {
        #[command(subcommand)]
        cmd: ops::PoolsCmd,
    },
    /// Recurring tasks on a cron schedule (JetStream KV bucket taskbus_schedules).
    #[command(long_about = schedules::ABOUT)]
    Schedules {
        #[command(subcommand)]
        cmd: schedules::SchedulesCmd,
    },
    /// Push N no-op tasks through submit → agent → succeeded and print throughput and
    /// latency, beside a raw JetStream publish+consume baseline from the same run.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum TaskCmd {
    /// Show one task by id.
    Get {
        id: String,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TasksCmd {
    /// Newest tasks first.
    List {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only this status (queued, running, succeeded, dead, rejected, …).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1–1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse_args();
    let quiet = !matches!(cli.command, Command::Dev(_) | Command::Bench(_));
    telemetry::init(
        LogFormat::Text,
        if quiet { "warn" } else { "warn,taskbus=info" },
    );
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let given = cli.nats_url_given();
    match cli.command {
        Command::Dev(args) => dev::run(args, given, &cli.nats_auth, &cli.prefix).await,
        Command::Bench(args) => bench::run(args, given, &cli.nats_auth, &cli.prefix).await,
        Command::Cancel { id, reason, json } => {
            ops::cancel(
                &api::connect(&cli.nats_url, &cli.nats_auth).await?,
                &cli.prefix,
                id,
                reason,
                json,
            )
            .await
        }
        Command::Dlq { cmd } => {
            ops::dlq(
                &api::connect(&cli.nats_url, &cli.nats_auth).await?,
                &cli.prefix,
                cmd,
            )
            .await
        }
        Command::Agents { cmd } => {
            ops::agents(
                &api::connect(&cli.nats_url, &cli.nats_auth).await?,
                &cli.prefix,
                cmd,
            )
            .await
        }
        Command::Ledger { cmd } => {
            ledger::run(
                cmd,
                &api::connect(&cli.nats_url, &cli.nats_auth).await?,
                &cli.prefix,
            )
            .await
        }
        Command::Pools { cmd } => {
            ops::pools(
                &api::connect(&cli.nats_url, &cli.nats_auth).await?,
                &cli.prefix,
                cmd,
            )
            .await
        }
        Command::Schedules { cmd } => {
            // Refuse a bad schedule before connecting anywhere.
            schedules::check(&cmd)?;
            schedules::run(
                &api::connect(&cli.nats_url, &cli.nats_auth).await?,
                &cli.prefix,
                cmd,
            )
            .await
        }
        Command::Submit(args) => {
            let client = api::connect(&cli.nats_url, &cli.nats_auth).await?;
            submit::run(args, &client, &cli.prefix).await
        }
        Command::Task {
            cmd: TaskCmd::Get { id, json },
        } => {
            let client = api::connect(&cli.nats_url, &cli.nats_auth).await?;
            let t = api::task_get(&client, &cli.prefix, &id).await?;
            if json {
                output::json(&t)
            } else {
                output::task_detail(&t);
                Ok(())
            }
        }
        Command::Tasks {
            cmd:
                TasksCmd::List {
                    pool,
                    status,
                    limit,
                    json,
                },
        } => {
            let client = api::connect(&cli.nats_url, &cli.nats_auth).await?;
            let ts = api::tasks_list(&client, &cli.prefix, pool, status, limit).await?;
            if json {
                output::json(&ts)
            } else {
                output::task_table(&ts);
                Ok(())
            }
        }
    }
}

impl Cli {
    /// Parse the command line; the `--nats-*` connection flags are accepted before or after
    /// the subcommand, like `--nats-url`.
    fn parse_args() -> Self {
        let cmd = Self::command().mut_args(|a| {
            if a.get_id().as_str().starts_with("nats_") {
                a.global(true).help_heading("NATS connection")
            } else {
                a
            }
        });
        Self::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
    }

    /// The NATS URL if the user gave one (flag or environment), for `dev` which otherwise
    /// starts its own server.
    fn nats_url_given(&self) -> Option<String> {
        let from_env = std::env::var("TASKBUS_NATS_URL").ok();
        let from_args = std::env::args().any(|a| a == "--nats-url" || a.starts_with("--nats-url="));
        (from_args || from_env.is_some()).then(|| self.nats_url.clone())
    }
}
