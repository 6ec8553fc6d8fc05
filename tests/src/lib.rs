//! The test harness: a real `nats-server` per test (random port, temp store; a 3-node cluster
//! helper too) and a fresh PostgreSQL database per test on the server named by
//! `TASKBUS_TEST_DATABASE_URL` (the README's test command starts one and sets it).
//! Services run in-process through their `start(config, shutdown)` functions.

use std::future::Future;

use futures::StreamExt;
use std::time::{Duration, Instant};

pub use taskbus_runtime::devservers::{NatsCluster, NatsServer, PgServer};

#[path = "../http_get.rs"]
mod http;
pub use http::http_get;

/// Log to the test output when `TASKBUS_TEST_LOG` is set (e.g. `TASKBUS_TEST_LOG=debug`).
pub fn init_logging() {
    if let Ok(level) = std::env::var("TASKBUS_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_test_writer()
            .try_init();
    }
}

/// Admin URL of the test PostgreSQL server.
pub fn admin_database_url() -> String {
    std::env::var("TASKBUS_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "TASKBUS_TEST_DATABASE_URL is not set: run the tests through `scripts/test.sh`, which starts \
             PostgreSQL and sets it, or point it at a server where you may create databases \
             (e.g. postgres://taskbus:taskbus@127.0.0.1:5432/postgres)"
        )
    })
}

/// A fresh database, dropped (with its connections) when this value is dropped, unless the
/// test is failing: then it is kept and its name printed.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    /// A fresh database on the test server (`TASKBUS_TEST_DATABASE_URL`).
    pub async fn new() -> Self {
        Self::new_on(&admin_database_url()).await
    }

    /// A fresh database on the server of `admin` (a URL where databases may be created).
    pub async fn new_on(admin: &str) -> Self {
        let admin = admin.to_string();
        let name = format!(
            "taskbus_test_{}",
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL at {admin}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .expect("create test database");
        pool.close().await;
        let url = with_database(&admin, &name);
        Self { name, url, admin }
    }

    /// A small pool on this database (migrations not run; services run them on start).
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test keeps its database for a post-mortem.
            eprintln!(
                "test failed: database {} kept for inspection ({}); drop it with `DROP DATABASE {}`",
                self.name, self.url, self.name
            );
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs outside async context guarantees: use a private runtime on a thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&admin)
                    .await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Replace the database name in a PostgreSQL URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres", "x"),
            "postgres://u:p@h:5/x"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}

/// A file of the test certificates in `tests/fixtures/tls/` (see its README).
pub fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tls")
        .join(name)
}

/// A Python with nats-py: the test virtualenv's (`$TASKBUS_VENV`, else ~/.cache/taskbus-venv),
/// then `python3` on PATH. Without one the caller's test says so and passes, unless
/// `TASKBUS_REQUIRE_PYTHON` is set, as scripts/test.sh does, so that CI cannot skip it silently.
pub fn python_with_nats_or_skip() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let venv = std::env::var_os("TASKBUS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/taskbus-venv")));
    let candidates = venv
        .map(|v| v.join("bin/python"))
        .into_iter()
        .chain([PathBuf::from("python3")]);
    let found = candidates.into_iter().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import nats"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("TASKBUS_REQUIRE_PYTHON").is_none(),
            "TASKBUS_REQUIRE_PYTHON is set but no python with nats-py was found"
        );
        eprintln!("skipped: no python3 with nats-py (pip install nats-py)");
    }
    found
}

/// `python -m taskbus_agent default sdk_handlers:handle`: the Python agent SDK (sdk/python)
/// serving pool `default` with the handlers of tests/python/sdk_handlers.py, killed on drop.
pub fn python_sdk_agent(python: &std::path::Path) -> tokio::process::Command {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut c = tokio::process::Command::new(python);
    c.args(["-m", "taskbus_agent", "default", "sdk_handlers:handle"])
        .env(
            "PYTHONPATH",
            format!(
                "{}:{}",
                root.join("sdk/python").display(),
                root.join("tests/python").display()
            ),
        )
        .kill_on_drop(true);
    c
}

/// Path of a workspace binary built beside the test executable (`target/<profile>/<name>`).
/// scripts/test.sh builds them first (`cargo build --workspace --bins`): cargo builds a
/// package's binaries only for that package's own integration tests.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing; build it first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// NATS request/reply with a timeout; `None` when nobody answered in time.
pub async fn ask(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
) -> Option<serde_json::Value> {
    let m = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(subject.to_string(), body.into()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&m.payload).ok()
}

/// Deposit through the ledger's API, retried (with the same key) until it is accepted.
pub async fn deposit(client: &async_nats::Client, account: &str, amount: &str, key: &str) {
    let body = serde_json::to_vec(&serde_json::json!({
        "account": account, "amount": amount, "currency": "USD", "key": key
    }))
    .unwrap();
    eventually(
        &format!("deposit to {account}"),
        Duration::from_secs(60),
        || {
            let body = body.clone();
            async move {
                let v = ask(client, "taskbus.ledger.deposit", body).await?;
                v.get("ok").map(|_| ())
            }
        },
    )
    .await;
}

/// Every durable event of one kind on the events stream, in stream order.
pub async fn stream_events(
    js: &async_nats::jetstream::Context,
    kind: &str,
) -> Vec<taskbus_proto::events::Event> {
    let stream = js.get_stream("TASKBUS_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("taskbus.events.*.*.{kind}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = consumer.cached_info().num_pending as usize;
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    let mut msgs = consumer.messages().await.unwrap();
    while out.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .expect("stream read")
            .unwrap()
            .unwrap();
        out.push(serde_json::from_slice(&m.payload).expect("a taskbus event"));
    }
    out
}

/// A whole stack for tests: nats-server, a fresh database, the coordinator in-process.
pub mod stack {
    use std::time::Duration;

    use async_nats::jetstream;
    use taskbus_coordinator::{Config, Running};
    use taskbus_proto::{PoolSettings, Subjects};
    use taskbus_runtime::CancellationToken;

    use super::{NatsServer, TestDb};

    pub struct Stack {
        pub nats: NatsServer,
        pub db: TestDb,
        pub client: async_nats::Client,
        pub js: jetstream::Context,
        pub subjects: Subjects,
        pub pg: sqlx::PgPool,
    }

    impl Stack {
        /// nats-server + database, with pool `default` configured with `ack_wait_ms`.
        pub async fn new(ack_wait_ms: u64) -> Self {
            Self::on_database(ack_wait_ms, TestDb::new().await).await
        }

        /// The same on a given database (e.g. one on a private server a test crashes).
        pub async fn on_database(ack_wait_ms: u64, db: TestDb) -> Self {
            super::init_logging();
            let nats = NatsServer::start().await.expect("start nats-server");
            let client = async_nats::connect(nats.url()).await.expect("connect");
            let js = jetstream::new(client.clone());
            let subjects = Subjects::default();
            taskbus_runtime::nats::ensure_streams(&js, &subjects, &Default::default())
                .await
                .expect("streams");
            let s = Self {
                pg: db.pool().await,
                nats,
                db,
                client,
                js,
                subjects,
            };
            s.set_pool(
                "default",
                PoolSettings {
                    ack_wait_ms,
                    ..Default::default()
                },
            )
            .await;
            s
        }

        pub async fn set_pool(&self, name: &str, settings: PoolSettings) {
            let kv = taskbus_runtime::nats::pools_bucket(&self.js, &self.subjects, 1)
                .await
                .expect("kv");
            kv.put(name, serde_json::to_vec(&settings).unwrap().into())
                .await
                .expect("put pool");
        }

        pub fn coordinator_config(&self) -> Config {
            let mut c = Config::new(self.nats.url(), self.db.url.clone());
            c.ensure_pools = vec![];
            c
        }

        pub async fn coordinator(&self) -> (Running, CancellationToken) {
            let token = CancellationToken::new();
            let running = taskbus_coordinator::start(self.coordinator_config(), token.clone())
                .await
                .expect("coordinator starts");
            (running, token)
        }

        /// Publish raw bytes to `taskbus.submit.<pool>` and wait for JetStream's ack.
        pub async fn submit_raw(&self, pool: &str, body: impl Into<bytes::Bytes>) {
            self.js
                .publish(self.subjects.submit(pool), body.into())
                .await
                .expect("publish")
                .await
                .expect("publish ack");
        }

        pub async fn submit(&self, pool: &str, body: serde_json::Value) {
            self.submit_raw(pool, serde_json::to_vec(&body).unwrap())
                .await
        }

        /// An in-process echo agent on pool `default` (5 s grace) that counts its runs; it
        /// stops when the token is cancelled.
        pub fn echo_agent(
            &self,
            id: &str,
            concurrency: usize,
        ) -> (
            tokio::task::JoinHandle<()>,
            CancellationToken,
            std::sync::Arc<std::sync::atomic::AtomicU64>,
        ) {
            use std::sync::atomic::{AtomicU64, Ordering};
            use std::sync::Arc;
            use taskbus_agent::{Agent, AgentConfig, TaskContext, TaskError};

            let mut cfg = AgentConfig::new(self.nats.url(), "default");
            cfg.agent_id = id.into();
            cfg.concurrency = concurrency;
            cfg.grace = Duration::from_secs(5);
            let runs = Arc::new(AtomicU64::new(0));
            let r = runs.clone();
            let agent = Agent::new(cfg, move |t: TaskContext| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, TaskError>(t.payload)
                }
            });
            let token = CancellationToken::new();
            let t = token.clone();
            let handle = tokio::spawn(async move {
                agent.run(t).await.expect("agent runs");
            });
            (handle, token, runs)
        }

        /// `taskbus dev` on this stack's nats-server and database, with `args` after those, its
        /// output discarded; killed when dropped. Needs the workspace's binaries built.
        pub fn taskbus_dev<I, S>(&self, args: I) -> tokio::process::Child
        where
            I: IntoIterator<Item = S>,
            S: AsRef<std::ffi::OsStr>,
        {
            tokio::process::Command::new(super::workspace_bin("taskbus"))
                .args([
                    "dev",
                    "--nats-url",
                    &self.nats.url(),
                    "--database-url",
                    &self.db.url,
                ])
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("run taskbus dev")
        }

        /// `(status, attempt, agent_id, result, reason)` of a task.
        pub async fn task(&self, id: &str) -> Option<TaskRow> {
            sqlx::query_as::<_, TaskRow>(
                "SELECT status, attempt, agent_id, result, reason, error FROM coordinator.tasks WHERE task_id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pg)
            .await
            .ok()
            .flatten()
        }

        /// Wait until the task has `status`.
        pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> TaskRow {
            super::eventually(&format!("task {id} to be {status}"), timeout, || async {
                self.task(id).await.filter(|t| t.status == status)
            })
            .await
        }

        /// Publish an agent's `succeeded` outcome the way the agent SDK does (JetStream,
        /// awaited), on pool `default`.
        pub async fn publish_succeeded(&self, id: &str, attempt: u32, agent: &str) {
            use taskbus_proto::events::{self, Event};
            let ev = Event::Succeeded(events::Succeeded {
                task_id: id.into(),
                pool: "default".into(),
                at: chrono::Utc::now(),
                attempt,
                agent_id: agent.into(),
                result: serde_json::json!({"by": agent}),
                duration_ms: 1,
                reputation: Some("1".into()),
            });
            let p = jetstream::message::PublishMessage::build()
                .payload(ev.to_json().into())
                .message_id(format!("{id}:{attempt}:outcome"));
            self.js
                .send_publish(
                    self.subjects
                        .event("default", id, events::EventKind::Succeeded),
                    p,
                )
                .await
                .expect("publish")
                .await
                .expect("outcome stored");
        }

        /// Wait until the stream `name` holds no message (every one acked off a work queue).
        pub async fn wait_stream_empty(&self, name: &str, timeout: Duration) {
            super::eventually(&format!("stream {name} to be empty"), timeout, || async {
                let mut st = self.js.get_stream(name).await.ok()?;
                (st.info().await.ok()?.state.messages == 0).then_some(())
            })
            .await;
        }

        pub async fn count(&self, status: &str) -> i64 {
            sqlx::query_scalar("SELECT count(*) FROM coordinator.tasks WHERE status = $1")
                .bind(status)
                .fetch_one(&self.pg)
                .await
                .unwrap_or(0)
        }
    }

    #[derive(Debug, Clone, sqlx::FromRow)]
    pub struct TaskRow {
        pub status: String,
        pub attempt: i32,
        pub agent_id: Option<String>,
        pub result: Option<serde_json::Value>,
        pub reason: Option<String>,
        pub error: Option<String>,
    }
}
