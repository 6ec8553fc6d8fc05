//! Direct mode (no KEDA, no HPA): every `interval` the scaler reads each pool's Deployment scale
//! subresource and patches `spec.replicas` by the [`DirectPolicy`] (min/max, step limits,
//! scale-down cool-down, never inside a freeze window). The Deployment of pool `p` is
//! `<deployment_prefix>p` in `namespace`. It needs RBAC `get`/`patch` on `deployments/scale`.
//!
//! Several scaler replicas may run direct mode at once: each reads the live replica count before
//! deciding, so they agree; the cool-down clock is per replica, which at worst delays a
//! scale-down by one cool-down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::Api;
use taskbus_runtime::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::ScaleLabel;
use crate::policy::{Decision, DirectPolicy, Hold, PoolState};
use crate::state::Shared;

/// Settings of direct mode.
#[derive(Clone)]
pub struct DirectConfig {
    /// The Kubernetes client; `None` = in-cluster or kubeconfig (`kube::Client::try_default`).
    pub client: Option<kube::Client>,
    pub namespace: String,
    /// Deployment name = prefix + pool name.
    pub deployment_prefix: String,
    pub interval: Duration,
    pub policy: DirectPolicy,
    /// Figures older than this are not acted on (NATS unreachable).
    pub max_staleness: Duration,
}

impl std::fmt::Debug for DirectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectConfig")
            .field("client", &self.client.as_ref().map(|_| "provided"))
            .field("namespace", &self.namespace)
            .field("deployment_prefix", &self.deployment_prefix)
            .field("interval", &self.interval)
            .field("policy", &self.policy)
            .field("max_staleness", &self.max_staleness)
            .finish()
    }
}

impl DirectConfig {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            client: None,
            namespace: namespace.into(),
            deployment_prefix: String::new(),
            interval: Duration::from_secs(2),
            policy: DirectPolicy::default(),
            max_staleness: Duration::from_secs(10),
        }
    }
}

/// Errors of one scale step.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("deployment {namespace}/{name} not found")]
    Missing { namespace: String, name: String },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// One round over every pool. Returns what was applied, for tests and logs.
pub async fn round(
    api: &Api<Deployment>,
    cfg: &DirectConfig,
    shared: &Shared,
    states: &mut HashMap<String, PoolState>,
    now_s: f64,
) -> Vec<(String, Result<Decision, ScaleError>)> {
    let pools = shared.pools();
    states.retain(|k, _| pools.iter().any(|(p, _)| p == k));
    let mut out = Vec::new();
    for (name, pool) in pools {
        // Act only on measured figures, never on the zeros of a pool not read yet.
        let Some(lag) = shared.measured(&name) else {
            continue;
        };
        let age = chrono::Utc::now().signed_duration_since(lag.updated_at);
        if age.to_std().unwrap_or_default() > cfg.max_staleness {
            debug!(pool = %name, "figures are stale; not scaling");
            continue;
        }
        let deployment = format!("{}{}", cfg.deployment_prefix, name);
        // A pool seen for the first time (or a restarted scaler) waits a full cool-down
        // before scaling down.
        let state = states.entry(name.clone()).or_insert_with(|| PoolState {
            last_change_s: None,
            last_needed_s: Some(now_s),
        });
        let r = step(api, cfg, &deployment, state, &pool.settings, &lag, now_s).await;
        let outcome = match &r {
            Ok(Decision::Scale { .. }) => "scaled",
            Ok(Decision::Hold(_)) => "held",
            Err(ScaleError::Missing { .. }) => "missing",
            Err(ScaleError::Kube(_)) => "failed",
        };
        shared
            .metrics
            .scale_actions
            .get_or_create(&ScaleLabel {
                pool: name.clone(),
                outcome: outcome.into(),
            })
            .inc();
        out.push((name, r));
    }
    out
}

async fn step(
    api: &Api<Deployment>,
    cfg: &DirectConfig,
    deployment: &str,
    state: &mut PoolState,
    settings: &taskbus_proto::PoolSettings,
    lag: &crate::lag::PoolLag,
    now_s: f64,
) -> Result<Decision, ScaleError> {
    let scale = api
        .get_scale(deployment)
        .await
        .map_err(|e| missing(e, &cfg.namespace, deployment))?;
    let current = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
    let decision = cfg.policy.decide(
        state,
        current,
        lag.desired_replicas,
        (settings.min_replicas, settings.max_replicas),
        lag.frozen,
        now_s,
    );
    if let Decision::Scale { from, to } = decision {
        let patch = serde_json::json!({ "spec": { "replicas": to } });
        api.patch_scale(deployment, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| missing(e, &cfg.namespace, deployment))?;
        state.applied(now_s);
        info!(
            deployment,
            from,
            to,
            desired = lag.desired_replicas,
            backlog = lag.backlog,
            "scaled"
        );
    } else if let Decision::Hold(Hold::Frozen) = decision {
        debug!(deployment, "inside a freeze window; not scaling");
    }
    Ok(decision)
}

fn missing(e: kube::Error, namespace: &str, name: &str) -> ScaleError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => ScaleError::Missing {
            namespace: namespace.into(),
            name: name.into(),
        },
        _ => ScaleError::Kube(e),
    }
}

/// Run rounds until shutdown.
pub async fn run(
    client: kube::Client,
    cfg: DirectConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let api: Api<Deployment> = Api::namespaced(client, &cfg.namespace);
    let clock = Instant::now();
    let mut states = HashMap::new();
    let mut warned: HashMap<String, bool> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for (pool, r) in round(
            &api,
            &cfg,
            &shared,
            &mut states,
            clock.elapsed().as_secs_f64(),
        )
        .await
        {
            match r {
                Err(e) => {
                    // Warn once per pool until it works again.
                    if !warned.insert(pool.clone(), true).unwrap_or(false) {
                        warn!(pool = %pool, error = %e, "direct scaling failed");
                    }
                }
                Ok(_) => {
                    warned.remove(&pool);
                }
            }
        }
    }
}
