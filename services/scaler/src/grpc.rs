//! KEDA's External Scaler service (`externalscaler.ExternalScaler`).
//!
//! Trigger metadata (`scalerMetadata`): `pool` (required, a configured pool) and `metric`
//! (optional: `desired`, the default, or `backlog`). The metric name is
//! `taskbus-<pool>-<metric>`; targets: `desired` → 1 (the value is the replica count),
//! `backlog` → the pool's `target_per_replica` (the value is backlog + in flight).
//! Every response fills both the integer and the float fields (KEDA ignores a float of 0).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use taskbus_runtime::CancellationToken;
use tonic::{Request, Response, Status};

use crate::lag::PoolLag;
use crate::pb::external_scaler_server::ExternalScaler;
use crate::pb::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use crate::state::{Lookup, MetricKind, Pool, Shared};

/// Longest metadata value accepted (pool names are DNS labels, 63 characters).
const MAX_VALUE_LEN: usize = 253;

/// Keys KEDA itself reads from an external trigger's metadata and passes along.
const KEDA_KEYS: &[&str] = &[
    "scalerAddress",
    "caCert",
    "tlsCertFile",
    "tlsClientCert",
    "tlsClientKey",
    "unsafeSsl",
    "enableTLS",
];

/// The gRPC service.
#[derive(Clone)]
pub struct Scaler {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Scaler {
    pub fn new(shared: Arc<Shared>, shutdown: CancellationToken) -> Self {
        Self { shared, shutdown }
    }

    fn resolve(
        &self,
        meta: &HashMap<String, String>,
    ) -> Result<(String, MetricKind, Pool, PoolLag), Status> {
        let (pool, metric) = parse_metadata(meta)?;
        match self.shared.lookup(&pool) {
            Ok((p, lag)) => Ok((pool, metric, p, lag)),
            Err(Lookup::Unknown) => Err(Status::not_found(format!(
                "pool {pool:?} is not configured: add it to the pools bucket (taskbus pools set {pool} ...)"
            ))),
            Err(Lookup::Invalid(e)) => Err(Status::failed_precondition(format!(
                "pool {pool:?} has settings the scaler cannot use: {e}"
            ))),
        }
    }

    fn record<T>(&self, rpc: &str, r: Result<T, Status>) -> Result<T, Status> {
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.shared.metrics.rpc(rpc, code);
        r
    }
}

/// `pool` and `metric` from trigger metadata, with an error naming the bad key.
pub fn parse_metadata(meta: &HashMap<String, String>) -> Result<(String, MetricKind), Status> {
    for (k, v) in meta {
        if !matches!(k.as_str(), "pool" | "metric") && !KEDA_KEYS.contains(&k.as_str()) {
            return Err(Status::invalid_argument(format!(
                "unknown scalerMetadata key {:?}: taskbus-scaler reads `pool` (required) and `metric` (backlog|desired)",
                truncate(k)
            )));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(Status::invalid_argument(format!(
                "scalerMetadata {k:?} is longer than {MAX_VALUE_LEN} bytes"
            )));
        }
    }
    let pool = meta
        .get("pool")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::invalid_argument("scalerMetadata must name the pool: set `pool: <pool name>` in the trigger metadata"))?;
    if !taskbus_proto::ids::is_valid_pool(pool) {
        return Err(Status::invalid_argument(format!(
            "scalerMetadata pool {:?} is not a valid pool name (a DNS label: lower-case letters, digits and '-', at most 63)",
            truncate(pool)
        )));
    }
    let metric = match meta.get("metric").map(|s| s.trim()) {
        None | Some("") => MetricKind::Desired,
        Some(m) => MetricKind::parse(m).ok_or_else(|| {
            Status::invalid_argument(format!(
                "scalerMetadata metric {:?} is not one of: backlog, desired",
                truncate(m)
            ))
        })?,
    };
    Ok((pool.to_string(), metric))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `taskbus-<pool>-<metric>`
pub fn metric_name(pool: &str, metric: MetricKind) -> String {
    format!("taskbus-{pool}-{}", metric.as_str())
}

fn meta_of(r: Option<&ScaledObjectRef>) -> Result<&HashMap<String, String>, Status> {
    r.map(|r| &r.scaler_metadata)
        .ok_or_else(|| Status::invalid_argument("GetMetricsRequest has no scaledObjectRef"))
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let r = self
            .resolve(&request.get_ref().scaler_metadata)
            .map(|(_, _, _, lag)| {
                Response::new(IsActiveResponse {
                    result: lag.is_active(),
                })
            });
        self.record("IsActive", r)
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let resolved = self
            .resolve(&request.get_ref().scaler_metadata)
            .map(|(pool, ..)| pool);
        let pool = self.record("StreamIsActive", resolved)?;
        let rx = self.shared.subscribe();
        let shared = self.shared.clone();
        let shutdown = self.shutdown.clone();
        // State: (tick receiver, was the pool active at the last look). A fresh stream starts
        // from "inactive", so an already-active pool is reported at once.
        let stream = futures::stream::unfold((rx, false), move |(mut rx, mut was)| {
            let (shared, shutdown, pool) = (shared.clone(), shutdown.clone(), pool.clone());
            async move {
                loop {
                    let active = match shared.lookup(&pool) {
                        Ok((_, lag)) => lag.is_active(),
                        Err(_) => {
                            let s = Status::not_found(format!(
                                "pool {pool:?} was removed from the pools bucket"
                            ));
                            // End the stream after telling KEDA why.
                            return if was {
                                None
                            } else {
                                Some((Err(s), (rx, true)))
                            };
                        }
                    };
                    let fire = active && !was;
                    was = active;
                    if fire {
                        return Some((Ok(IsActiveResponse { result: true }), (rx, was)));
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return None },
                        _ = shutdown.cancelled() => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let r = self
            .resolve(&request.get_ref().scaler_metadata)
            .map(|(pool, metric, p, _)| {
                let target = metric.target(&p.settings);
                Response::new(GetMetricSpecResponse {
                    metric_specs: vec![MetricSpec {
                        metric_name: metric_name(&pool, metric),
                        target_size: i64::from(target),
                        target_size_float: f64::from(target),
                    }],
                })
            });
        self.record("GetMetricSpec", r)
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.get_ref();
        let r = meta_of(req.scaled_object_ref.as_ref())
            .and_then(|m| self.resolve(m))
            .map(|(pool, metric, p, lag)| {
                let value = metric.value(&lag, &p.settings);
                // KEDA asks with the name it got from GetMetricSpec (it may add its own
                // `sN-` prefix); answer under the name it asked for.
                let name = if req.metric_name.is_empty() {
                    metric_name(&pool, metric)
                } else {
                    req.metric_name.clone()
                };
                Response::new(GetMetricsResponse {
                    metric_values: vec![MetricValue {
                        metric_name: name,
                        metric_value: i64::try_from(value).unwrap_or(i64::MAX),
                        metric_value_float: value as f64,
                    }],
                })
            });
        self.record("GetMetrics", r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn metadata_parsing() {
        assert_eq!(
            parse_metadata(&meta(&[("pool", "cpu")])).unwrap(),
            ("cpu".into(), MetricKind::Desired)
        );
        assert_eq!(
            parse_metadata(&meta(&[("pool", " cpu "), ("metric", "backlog")])).unwrap(),
            ("cpu".into(), MetricKind::Backlog)
        );
        let long = "a".repeat(10_000);
        let bad: Vec<(HashMap<String, String>, &str)> = vec![
            (meta(&[]), "must name the pool"),
            (meta(&[("pool", "")]), "must name the pool"),
            (meta(&[("pool", "CPU")]), "not a valid pool name"),
            (meta(&[("pool", "a.b")]), "not a valid pool name"),
            (meta(&[("pool", "-x")]), "not a valid pool name"),
            (meta(&[("pool", "p\u{0}")]), "not a valid pool name"),
            (meta(&[("pool", &long)]), "longer than"),
            (
                meta(&[("pool", "cpu"), ("metric", "cpu")]),
                "not one of: backlog, desired",
            ),
            (
                meta(&[("pool", "cpu"), ("poool", "x")]),
                "unknown scalerMetadata key",
            ),
        ];
        for (m, want) in bad {
            let e = parse_metadata(&m).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{m:?}");
            assert!(e.message().contains(want), "{m:?}: {}", e.message());
        }
    }
}
