//! The agent registry (heartbeats, kept in memory by every replica) and reputation publishing
//! (the KV bucket `taskbus_reputation`, key = agent id, value = multiplier as a decimal string).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use chrono::Utc;
use futures::StreamExt;
use rust_decimal::Decimal;
use taskbus_proto::api::{AgentInfo, Heartbeat};
use taskbus_runtime::CancellationToken;
use tracing::{debug, warn};

use crate::{store, CoordinatorError, Ctx};

#[derive(Clone)]
pub(crate) struct Registry {
    beats: Arc<Mutex<HashMap<String, Heartbeat>>>,
    /// Outcomes per agent not yet folded into `coordinator.agents` (flushed once a second).
    pending: Arc<Mutex<HashMap<String, store::AgentBatch>>>,
    published: Arc<Mutex<HashMap<String, Decimal>>>,
    kv: kv::Store,
}

impl Registry {
    pub(crate) async fn new(
        js: &async_nats::jetstream::Context,
        bucket: String,
        replicas: usize,
    ) -> Result<Self, CoordinatorError> {
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "taskbus agent reputation multipliers".into(),
                    history: 1,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                Err(e) => js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|_| CoordinatorError::js(e))?,
            },
        };
        Ok(Self {
            beats: Arc::default(),
            pending: Arc::default(),
            published: Arc::default(),
            kv,
        })
    }
}

/// Add a batch's outcomes per agent to what the next [`flush_reputation`] folds in.
pub(crate) fn accumulate(ctx: &Ctx, batch: HashMap<String, store::AgentBatch>) {
    let mut p = ctx
        .registry
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for (agent, b) in batch {
        let e = p.entry(agent).or_default();
        e.pool = b.pool;
        e.successes += b.successes;
        e.failures += b.failures;
        e.latency_sum_ms += b.latency_sum_ms;
    }
}

/// Fold the accumulated outcomes into each agent's EWMAs and publish changed multipliers. Runs
/// once a second (maintenance), so reputation costs two statements a second, not two per batch.
pub(crate) async fn flush_reputation(ctx: &Ctx) {
    let batch = std::mem::take(
        &mut *ctx
            .registry
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    if batch.is_empty() {
        return;
    }
    match store::update_reputation(&ctx.db, &batch).await {
        Ok(reps) => publish_reputations(ctx, reps).await,
        Err(e) => {
            warn!(error = %e, "cannot update reputation; keeping the outcomes for the next pass");
            accumulate(ctx, batch);
        }
    }
}

/// Write changed multipliers to the KV bucket.
pub(crate) async fn publish_reputations(ctx: &Ctx, reps: Vec<(String, Decimal)>) {
    for (agent, rep) in reps {
        let changed = {
            let mut p = ctx
                .registry
                .published
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.insert(agent.clone(), rep) != Some(rep)
        };
        if changed {
            if let Err(e) = ctx.registry.kv.put(&agent, rep.to_string().into()).await {
                warn!(agent_id = %agent, error = %e, "cannot publish reputation");
            }
        }
    }
}

pub(crate) async fn heartbeat_subscription(
    ctx: &Ctx,
) -> Result<async_nats::Subscriber, CoordinatorError> {
    ctx.client
        .subscribe(ctx.subjects.agent_heartbeat_all())
        .await
        .map_err(CoordinatorError::js)
}

/// Keep the latest heartbeat of every agent.
pub(crate) async fn run_heartbeats(
    ctx: Arc<Ctx>,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => m,
        };
        let Some(msg) = msg else { return };
        match serde_json::from_slice::<Heartbeat>(&msg.payload) {
            Ok(hb) if taskbus_proto::ids::is_valid_agent_id(&hb.agent_id) => {
                let mut beats = ctx.registry.beats.lock().unwrap_or_else(|e| e.into_inner());
                // Forget agents not heard of for an hour, so the map stays bounded.
                if beats.len() > 10_000 {
                    let cutoff = Utc::now() - chrono::Duration::hours(1);
                    beats.retain(|_, b| b.at > cutoff);
                }
                beats.insert(hb.agent_id.clone(), hb);
            }
            Ok(_) => debug!("heartbeat with an invalid agent id ignored"),
            Err(e) => debug!(error = %e, "unreadable heartbeat ignored"),
        }
    }
}

/// Health from the age of the last heartbeat and the breaker state.
fn health(hb: Option<&Heartbeat>) -> &'static str {
    let Some(hb) = hb else { return "gone" };
    let age = (Utc::now() - hb.at).num_seconds();
    if age > 60 {
        "gone"
    } else if age > 15 {
        "stale"
    } else if hb.breaker != "closed" {
        "paused"
    } else {
        "healthy"
    }
}

/// Every agent known from heartbeats or outcomes.
pub(crate) async fn list(ctx: &Ctx) -> Result<Vec<AgentInfo>, sqlx::Error> {
    let rows = store::agents(&ctx.db).await?;
    let beats = ctx
        .registry
        .beats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (agent_id, pool, successes, failures, success_rate, latency_ms, reputation) in rows {
        let hb = beats.get(&agent_id);
        seen.insert(agent_id.clone());
        out.push(AgentInfo {
            health: health(hb).into(),
            last_seen: hb.map(|h| h.at),
            capacity: hb.map_or(0, |h| h.capacity),
            in_flight: hb.map_or(0, |h| h.in_flight),
            version: hb.map(|h| h.version.clone()).unwrap_or_default(),
            breaker: hb.map(|h| h.breaker.clone()).unwrap_or_else(|| "-".into()),
            agent_id,
            pool,
            successes,
            failures,
            success_rate,
            latency_ms,
            reputation: reputation.to_string(),
        });
    }
    for (id, hb) in beats.iter().filter(|(id, _)| !seen.contains(*id)) {
        out.push(AgentInfo {
            agent_id: id.clone(),
            pool: hb.pool.clone(),
            health: health(Some(hb)).into(),
            last_seen: Some(hb.at),
            capacity: hb.capacity,
            in_flight: hb.in_flight,
            version: hb.version.clone(),
            breaker: hb.breaker.clone(),
            successes: 0,
            failures: 0,
            success_rate: 1.0,
            latency_ms: None,
            reputation: "1".into(),
        });
    }
    out.sort_by(|a, b| (&a.pool, &a.agent_id).cmp(&(&b.pool, &b.agent_id)));
    Ok(out)
}
