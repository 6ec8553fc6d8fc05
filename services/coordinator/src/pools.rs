//! The pool registry: settings from the JetStream KV bucket, kept fresh by a watcher, plus the
//! work consumers (one per priority band) each pool needs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use taskbus_proto::{streams, PoolSettings, Priority, Subjects};
use taskbus_runtime::CancellationToken;
use tracing::{debug, info, warn};

use crate::CoordinatorError;

/// Shared, live view of the configured pools.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<RwLock<HashMap<String, PoolSettings>>>,
    kv: kv::Store,
    js: jetstream::Context,
    subjects: Subjects,
}

/// Create pool `name` with default settings unless it exists. Any other failure (a fresh
/// clustered bucket that does not answer yet, a timeout under load) is retried for about 20 s,
/// then refused: a coordinator that started without its pools would look healthy while no
/// agent could ever find its work consumers.
async fn ensure_pool(kv: &kv::Store, name: &str, default: &[u8]) -> Result<(), CoordinatorError> {
    let mut wait = Duration::from_millis(100);
    let mut last = None;
    for _ in 0..12 {
        match kv.create(name, default.to_vec().into()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(()),
            Err(e) => {
                if let Ok(Some(_)) = kv.get(name).await {
                    return Ok(());
                }
                debug!(pool = name, error = %e, "cannot create the pool yet; retrying");
                last = Some(e);
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(3));
    }
    Err(CoordinatorError::Pools(format!(
        "cannot create pool {name:?} in the pools bucket: {} (is JetStream available?)",
        last.map_or_else(|| "no answer".to_string(), |e| e.to_string())
    )))
}

impl Pools {
    /// Create the `ensure` pools when missing, then load every pool and its work consumer.
    pub async fn load(
        kv: kv::Store,
        js: jetstream::Context,
        subjects: Subjects,
        ensure: &[String],
    ) -> Result<Self, CoordinatorError> {
        let default = serde_json::to_vec(&PoolSettings::default()).unwrap_or_default();
        for pool in ensure {
            if !taskbus_proto::ids::is_valid_pool(pool) {
                return Err(CoordinatorError::Pools(format!(
                    "{pool:?} is not a valid pool name (a DNS label)"
                )));
            }
            ensure_pool(&kv, pool, &default).await?;
        }
        let me = Self {
            inner: Arc::default(),
            kv,
            js,
            subjects,
        };
        let mut keys = me.kv.keys().await.map_err(CoordinatorError::js)?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(CoordinatorError::js)?);
        }
        for name in names {
            if let Some(bytes) = me.kv.get(&name).await.map_err(CoordinatorError::js)? {
                me.apply(&name, &bytes).await;
            }
        }
        Ok(me)
    }

    async fn apply(&self, name: &str, bytes: &[u8]) {
        if !taskbus_proto::ids::is_valid_pool(name) {
            warn!(
                pool = name,
                "ignoring pool with an invalid name in the pools bucket"
            );
            return;
        }
        let settings = match serde_json::from_slice::<PoolSettings>(bytes) {
            Ok(s) => match s.validate() {
                Ok(()) => s,
                Err(e) => {
                    warn!(pool = name, error = %e, "ignoring invalid pool settings");
                    return;
                }
            },
            Err(e) => {
                warn!(pool = name, error = %e, "ignoring unreadable pool settings");
                return;
            }
        };
        if let Err(e) = self.ensure_work_consumers(name, &settings).await {
            warn!(pool = name, error = %e, "cannot create the pool's work consumers");
        }
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), settings);
    }

    /// One durable consumer per priority band (`work-<pool>-high|normal|low`). The single
    /// `work-<pool>` consumer of earlier releases overlaps them on the work-queue stream, so it
    /// is removed first; messages it had not delivered stay in the stream for the new ones.
    async fn ensure_work_consumers(
        &self,
        pool: &str,
        s: &PoolSettings,
    ) -> Result<(), CoordinatorError> {
        let stream = self
            .js
            .get_stream(self.subjects.work_stream())
            .await
            .map_err(CoordinatorError::js)?;
        let legacy = self.subjects.legacy_work_consumer(pool);
        if let Ok(info) = stream.consumer_info(&legacy).await {
            if info.config.filter_subject == self.subjects.work_pool(pool) {
                info!(
                    pool,
                    consumer = %legacy,
                    "removing the pre-priority work consumer"
                );
                stream
                    .delete_consumer(&legacy)
                    .await
                    .map_err(CoordinatorError::js)?;
            }
        }
        for priority in Priority::ALL {
            let cfg = streams::work_consumer(
                &self.subjects,
                pool,
                priority,
                Duration::from_millis(s.ack_wait_ms),
            );
            stream
                .create_consumer(cfg)
                .await
                .map_err(CoordinatorError::js)?;
        }
        Ok(())
    }

    /// The configured pools' names.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn exists(&self, pool: &str) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(pool)
    }

    pub fn get(&self, pool: &str) -> Option<PoolSettings> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pool)
            .cloned()
    }

    /// Follow the bucket until shutdown; reconnects after errors.
    pub async fn watch(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let mut watch = match self.kv.watch_all().await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "cannot watch the pools bucket; retrying");
                    crate::pause(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = watch.next() => e,
                };
                match entry {
                    Some(Ok(e)) => match e.operation {
                        kv::Operation::Put => {
                            info!(pool = %e.key, "pool settings changed");
                            self.apply(&e.key, &e.value).await;
                        }
                        kv::Operation::Delete | kv::Operation::Purge => {
                            info!(pool = %e.key, "pool removed");
                            self.inner
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&e.key);
                        }
                    },
                    Some(Err(e)) => {
                        warn!(error = %e, "pools watch error; restarting the watch");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}
