//! The Kubernetes external metrics API (`external.metrics.k8s.io/v1beta1`) for a plain HPA with
//! `type: External`, and a JSON view of every pool's lag at `/v1/lag`.
//!
//! Metrics (all carry the label `pool`; select one with `labelSelector=pool=<pool>`):
//!
//! | metric | value | HPA target (AverageValue) |
//! |---|---|---|
//! | `taskbus-desired-replicas` | the scaler's desired replicas (held during a freeze) | `1` |
//! | `taskbus-backlog` | backlog + in flight (held at held × target during a freeze) | the pool's `target_per_replica` |
//! | `taskbus-pending` | backlog (`num_pending`) | |
//! | `taskbus-in-flight` | `num_ack_pending` | |
//! | `taskbus-delayed` | attempts waiting out a retry backoff | |
//! | `taskbus-agents` | agents heard from within 15 s (heartbeats) | |
//! | `taskbus-oldest-age-seconds` | age of the oldest waiting task | |
//! | `taskbus-arrival-rate` | tasks/s arriving | |
//! | `taskbus-completion-rate` | tasks/s completing | |
//! | `taskbus-service-time-seconds` | measured seconds per task | |
//!
//! Errors are Kubernetes `Status` objects with a message that says what is wrong.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::SecondsFormat;
use serde_json::{json, Value};

use crate::lag::PoolLag;
use crate::state::{Lookup, MetricKind, Pool, Shared};

pub const GROUP: &str = "external.metrics.k8s.io";
pub const VERSION: &str = "v1beta1";

/// The metric names served.
pub const METRICS: &[&str] = &[
    "taskbus-desired-replicas",
    "taskbus-backlog",
    "taskbus-pending",
    "taskbus-in-flight",
    "taskbus-delayed",
    "taskbus-agents",
    "taskbus-oldest-age-seconds",
    "taskbus-arrival-rate",
    "taskbus-completion-rate",
    "taskbus-service-time-seconds",
];

const MAX_SELECTOR_LEN: usize = 1024;

/// The value of `metric` for one pool, or `None` for an unknown metric name.
pub fn metric_value(metric: &str, pool: &Pool, lag: &PoolLag) -> Option<f64> {
    Some(match metric {
        "taskbus-desired-replicas" => MetricKind::Desired.value(lag, &pool.settings) as f64,
        "taskbus-backlog" => MetricKind::Backlog.value(lag, &pool.settings) as f64,
        "taskbus-pending" => lag.backlog as f64,
        "taskbus-in-flight" => lag.in_flight as f64,
        "taskbus-delayed" => lag.delayed as f64,
        "taskbus-agents" => f64::from(lag.agents),
        "taskbus-oldest-age-seconds" => lag.oldest_age_seconds,
        "taskbus-arrival-rate" => lag.arrival_rate,
        "taskbus-completion-rate" => lag.completion_rate,
        "taskbus-service-time-seconds" => lag.service_time_seconds,
        _ => return None,
    })
}

/// A Kubernetes quantity: an integer when whole, else thousandths (`1500m`).
pub fn quantity(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        return "0".into();
    }
    let milli = (v * 1000.0).round();
    if milli >= 9.0e18 {
        return format!("{}", i64::MAX / 1000);
    }
    let milli = milli as i64;
    if milli % 1000 == 0 {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
    }
}

/// Routes under `/apis/external.metrics.k8s.io` and `/v1/lag`.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/apis/external.metrics.k8s.io", get(group))
        .route("/apis/external.metrics.k8s.io/v1beta1", get(resources))
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}",
            get(values),
        )
        .route("/v1/lag", get(lag_json))
        .with_state(shared)
}

async fn group() -> Json<Value> {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    Json(json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [gv],
        "preferredVersion": gv,
    }))
}

async fn resources() -> Json<Value> {
    let resources: Vec<Value> = METRICS
        .iter()
        .map(|m| {
            json!({
                "name": m,
                "singularName": "",
                "namespaced": true,
                "kind": "ExternalMetricValueList",
                "verbs": ["get"],
            })
        })
        .collect();
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": resources,
    }))
}

/// A Kubernetes `Status` error.
pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: String) -> Self {
        Self {
            code: StatusCode::BAD_REQUEST,
            reason: "BadRequest",
            message,
        }
    }
    fn not_found(message: String) -> Self {
        Self {
            code: StatusCode::NOT_FOUND,
            reason: "NotFound",
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        (self.code, Json(body)).into_response()
    }
}

/// The pools a label selector names: `None` = every pool. Accepts `pool=x`, `pool==x` and
/// `pool in (x,y)`; other labels are refused since metrics carry only `pool`.
pub fn parse_selector(sel: &str) -> Result<Option<Vec<String>>, String> {
    let sel = sel.trim();
    if sel.is_empty() {
        return Ok(None);
    }
    if sel.len() > MAX_SELECTOR_LEN {
        return Err(format!(
            "labelSelector is longer than {MAX_SELECTOR_LEN} bytes"
        ));
    }
    let mut pools: Option<Vec<String>> = None;
    for req in split_requirements(sel) {
        let req = req.trim();
        let (key, values) = if let Some((k, v)) =
            req.split_once("==").or_else(|| req.split_once('='))
        {
            if k.ends_with('!') {
                return Err(format!(
                    "labelSelector {req:?}: only `pool=<pool>` or `pool in (...)` is supported"
                ));
            }
            (k.trim(), vec![v.trim().to_string()])
        } else if let Some((k, rest)) = req.split_once(" in ") {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("labelSelector {req:?}: `in` needs a parenthesised list"))?;
            (
                k.trim(),
                inner.split(',').map(|s| s.trim().to_string()).collect(),
            )
        } else {
            return Err(format!(
                "labelSelector {req:?} is not `pool=<pool>` or `pool in (...)`"
            ));
        };
        if key != "pool" {
            return Err(format!(
                "labelSelector names label {key:?}: taskbus metrics carry only the `pool` label"
            ));
        }
        for v in &values {
            if !taskbus_proto::ids::is_valid_pool(v) {
                return Err(format!(
                    "labelSelector pool {v:?} is not a valid pool name (a DNS label)"
                ));
            }
        }
        // Several requirements on `pool` must all hold: intersect.
        pools = Some(match pools {
            None => values,
            Some(prev) => prev.into_iter().filter(|p| values.contains(p)).collect(),
        });
    }
    Ok(pools)
}

/// Split on commas outside parentheses.
fn split_requirements(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_namespace(ns: &str) -> bool {
    taskbus_proto::ids::is_valid_pool(ns)
}

async fn values(
    State(shared): State<Arc<Shared>>,
    Path((ns, metric)): Path<(String, String)>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(format!("query string: {e}")))?;
    if !valid_namespace(&ns) {
        return Err(ApiError::bad(format!(
            "namespace {:?} is not a valid namespace name",
            short(&ns)
        )));
    }
    if !METRICS.contains(&metric.as_str()) {
        return Err(ApiError::not_found(format!(
            "no external metric {:?}; served: {}",
            short(&metric),
            METRICS.join(", ")
        )));
    }
    let selected = parse_selector(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad)?;
    let names: Vec<String> = match selected {
        Some(names) => names,
        None => shared.pools().into_iter().map(|(n, _)| n).collect(),
    };
    let mut items = Vec::new();
    for name in names {
        let (pool, lag) = match shared.lookup(&name) {
            Ok(x) => x,
            Err(Lookup::Unknown) => {
                return Err(ApiError::not_found(format!(
                    "pool {name:?} is not configured"
                )))
            }
            Err(Lookup::Invalid(e)) => {
                return Err(ApiError::bad(format!(
                    "pool {name:?} has unusable settings: {e}"
                )))
            }
        };
        let Some(v) = metric_value(&metric, &pool, &lag) else {
            continue;
        };
        items.push(json!({
            "metricName": metric,
            "metricLabels": {"pool": name},
            "timestamp": lag.updated_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            "value": quantity(v),
        }));
    }
    Ok(Json(json!({
        "kind": "ExternalMetricValueList",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {},
        "items": items,
    })))
}

async fn lag_json(State(shared): State<Arc<Shared>>) -> Json<Vec<PoolLag>> {
    Json(shared.lags())
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for (v, q) in [
            (0.0, "0"),
            (3.0, "3"),
            (1.5, "1500m"),
            (0.0004, "0"),
            (0.0006, "1m"),
            (12.25, "12250m"),
            (-4.0, "0"),
            (f64::NAN, "0"),
            (f64::INFINITY, "0"),
            (1e30, "9223372036854775"),
        ] {
            assert_eq!(quantity(v), q, "{v}");
        }
    }

    #[test]
    fn selectors() {
        assert_eq!(parse_selector("").unwrap(), None);
        assert_eq!(
            parse_selector("pool=cpu").unwrap(),
            Some(vec!["cpu".into()])
        );
        assert_eq!(
            parse_selector(" pool == cpu ").unwrap(),
            Some(vec!["cpu".into()])
        );
        assert_eq!(
            parse_selector("pool in (a, b)").unwrap(),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_selector("pool in (a,b),pool=b").unwrap(),
            Some(vec!["b".into()])
        );
        for (bad, want) in [
            ("app=x", "only the `pool` label"),
            ("pool!=x", "only `pool=<pool>`"),
            ("pool", "is not `pool=<pool>`"),
            ("pool=CPU", "not a valid pool name"),
            ("pool=a/../b", "not a valid pool name"),
            ("pool in a", "parenthesised"),
            ("pool=", "not a valid pool name"),
        ] {
            let e = parse_selector(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(parse_selector(&format!("pool={}", "a".repeat(2000)))
            .unwrap_err()
            .contains("longer than"));
    }
}
