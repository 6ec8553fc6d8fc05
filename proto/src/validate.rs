//! Admission validation: turns raw submit bytes into a [`ValidTask`] or a [`Rejection`] with a
//! machine-readable reason and a sentence for humans. Never panics on any input.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::{Priority, Resources, RetryPolicy, TaskEnvelope, SCHEMA_VERSION};
use crate::ids::{is_valid_pool, is_valid_task_id, MAX_TASK_ID_LEN};

/// Why a submit message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Body is not a JSON object.
    InvalidJson,
    /// A field the envelope does not define.
    UnknownField,
    /// A required field (`kind`) is absent.
    MissingField,
    /// `id` breaks `[A-Za-z0-9_-]{1,128}`.
    InvalidId,
    /// A field has a value of the wrong type or out of range.
    InvalidValue,
    /// The message is larger than the configured limit.
    TooLarge,
    /// Too many labels, a label too long, a price with too many decimals, …
    LimitExceeded,
    /// The subject names a pool that is not configured.
    UnknownPool,
    /// `v` names an envelope version this coordinator does not speak.
    UnsupportedVersion,
    /// The payer's available balance does not cover the price.
    InsufficientFunds,
    /// The deadline had already passed at admission.
    DeadlinePassed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidId => "invalid_id",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::TooLarge => "too_large",
            RejectReason::LimitExceeded => "limit_exceeded",
            RejectReason::UnknownPool => "unknown_pool",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::InsufficientFunds => "insufficient_funds",
            RejectReason::DeadlinePassed => "deadline_passed",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message: reason code, human sentence, and the task id when one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
    /// The producer's id if it was present and valid (otherwise the coordinator names the
    /// rejection after the submit stream sequence, `seq-<n>`).
    pub task_id: Option<String>,
}

impl Rejection {
    fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            task_id: None,
        }
    }
}

/// Limits applied at admission. All configurable; the defaults are safe for a shared cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_kind_len: usize,
    pub max_labels: usize,
    pub max_label_key_len: usize,
    pub max_label_value_len: usize,
    pub max_attempts: u32,
    pub max_timeout_ms: u64,
    /// Digits after the decimal point a price may have.
    pub max_price_scale: u32,
    pub default_max_attempts: u32,
    pub default_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_kind_len: 128,
            max_labels: 32,
            max_label_key_len: 63,
            max_label_value_len: 256,
            max_attempts: 100,
            max_timeout_ms: 24 * 3600 * 1000,
            max_price_scale: 18,
            default_max_attempts: 3,
            default_timeout_ms: 5 * 60 * 1000,
        }
    }
}

/// A validated, normalised task ready for admission.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTask {
    pub id: String,
    pub pool: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: Priority,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    pub deadline: Option<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
    pub price: Option<Decimal>,
    pub payer: Option<String>,
    pub currency: Option<String>,
    pub resources: Option<Resources>,
    pub labels: BTreeMap<String, String>,
    pub retry: Option<RetryPolicy>,
}

impl ValidTask {
    /// The normalised envelope forwarded to agents.
    pub fn to_envelope(&self) -> TaskEnvelope {
        TaskEnvelope {
            v: Some(SCHEMA_VERSION),
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            id: Some(self.id.clone()),
            priority: Some(self.priority),
            max_attempts: Some(self.max_attempts),
            timeout_ms: Some(self.timeout_ms),
            deadline: self.deadline,
            not_before: self.not_before,
            price: self.price.map(|p| p.to_string()),
            payer: self.payer.clone(),
            currency: self.currency.clone(),
            resources: self.resources.clone(),
            labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
            retry: self.retry,
        }
    }
}

/// Validate raw submit bytes for `pool`. `pool_exists` answers whether the pool is configured;
/// `fallback_id` names a task whose body has no `id` (the coordinator passes the message's
/// `Nats-Msg-Id` or an id derived from its stream sequence, so a redelivery gets the same id).
pub fn validate(
    bytes: &[u8],
    pool: &str,
    limits: &Limits,
    pool_exists: impl FnOnce(&str) -> bool,
    fallback_id: impl FnOnce() -> String,
) -> Result<ValidTask, Rejection> {
    use RejectReason::*;
    if bytes.len() > limits.max_message_bytes {
        // Still name the rejection after the producer's id when one can be read, so a
        // producer watching its task's events learns why.
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<String>,
        }
        let task_id = serde_json::from_slice::<IdOnly>(bytes)
            .ok()
            .and_then(|x| x.id)
            .filter(|id| is_valid_task_id(id));
        return Err(Rejection { task_id, ..Rejection::new(
            TooLarge,
            format!(
                "message is {} bytes, the limit is {} bytes; put large inputs in object storage and send a reference",
                bytes.len(),
                limits.max_message_bytes
            ),
        ) });
    }
    // Parse loosely first so that an id can be recovered even from an invalid envelope.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        Rejection::new(InvalidJson, format!("body is not valid JSON ({e}); send a JSON object such as {{\"kind\":\"echo\",\"payload\":{{}}}}"))
    })?;
    let Some(obj) = value.as_object() else {
        return Err(Rejection::new(
            InvalidJson,
            "body must be a JSON object such as {\"kind\":\"echo\",\"payload\":{}}",
        ));
    };
    let raw_id = obj.get("id").and_then(|v| v.as_str()).map(str::to_owned);
    let recovered_id = raw_id.clone().filter(|id| is_valid_task_id(id));
    let with_id = |mut r: Rejection| {
        r.task_id = recovered_id.clone();
        r
    };
    if let Some(id_val) = obj.get("id") {
        match id_val.as_str() {
            Some(id) if is_valid_task_id(id) => {}
            Some(id) => {
                return Err(with_id(Rejection::new(
                    InvalidId,
                    format!(
                        "id {:?} is not allowed: use 1 to {MAX_TASK_ID_LEN} characters from A-Z a-z 0-9 _ -",
                        truncate(id, 64)
                    ),
                )))
            }
            None => {
                return Err(with_id(Rejection::new(
                    InvalidId,
                    "id must be a string of 1 to 128 characters from A-Z a-z 0-9 _ -",
                )))
            }
        }
    }
    if !is_valid_pool(pool) {
        return Err(with_id(Rejection::new(
            UnknownPool,
            format!("pool {:?} is not a valid pool name (a DNS label: lower-case letters, digits and '-')", truncate(pool, 64)),
        )));
    }
    if !pool_exists(pool) {
        return Err(with_id(Rejection::new(
            UnknownPool,
            format!("pool {pool:?} is not configured; create it with `taskbus pools set {pool}` or publish to an existing pool"),
        )));
    }
    let env: TaskEnvelope = serde_json::from_value(value).map_err(|e| {
        let text = e.to_string();
        let reason = if text.starts_with("unknown field") {
            UnknownField
        } else if text.starts_with("missing field") {
            MissingField
        } else {
            InvalidValue
        };
        with_id(Rejection::new(
            reason,
            format!("{text}; see docs/PROTOCOL.md for the envelope fields"),
        ))
    })?;
    let bad = |reason: RejectReason, msg: String| Err(with_id(Rejection::new(reason, msg)));

    if let Some(v) = env.v {
        if v != SCHEMA_VERSION {
            return bad(UnsupportedVersion, format!("envelope version {v} is not supported; this coordinator speaks version {SCHEMA_VERSION}"));
        }
    }
    if env.kind.is_empty()
        || env.kind.len() > limits.max_kind_len
        || env.kind.chars().any(char::is_control)
    {
        return bad(
            InvalidValue,
            format!(
                "kind must be 1 to {} printable characters",
                limits.max_kind_len
            ),
        );
    }
    let max_attempts = env.max_attempts.unwrap_or(limits.default_max_attempts);
    if max_attempts == 0 || max_attempts > limits.max_attempts {
        return bad(
            InvalidValue,
            format!(
                "max_attempts must be between 1 and {}, got {max_attempts}",
                limits.max_attempts
            ),
        );
    }
    let timeout_ms = env.timeout_ms.unwrap_or(limits.default_timeout_ms);
    if timeout_ms == 0 || timeout_ms > limits.max_timeout_ms {
        return bad(
            InvalidValue,
            format!(
                "timeout_ms must be between 1 and {}, got {timeout_ms}",
                limits.max_timeout_ms
            ),
        );
    }
    if let (Some(d), Some(nb)) = (env.deadline, env.not_before) {
        if d <= nb {
            return bad(
                InvalidValue,
                "deadline must be later than not_before".into(),
            );
        }
    }
    if let Some(d) = env.deadline {
        if d <= Utc::now() {
            return bad(
                DeadlinePassed,
                format!("deadline {} has already passed", d.to_rfc3339()),
            );
        }
    }
    let price = match env.price.as_deref() {
        None => None,
        Some(p) => Some(
            parse_price(p, limits.max_price_scale)
                .map_err(|(r, m)| with_id(Rejection::new(r, m)))?,
        ),
    };
    if price.is_some() {
        match env.payer.as_deref() {
            None => {
                return bad(
                    MissingField,
                    "a task with a price needs a payer account".into(),
                )
            }
            Some(p) if !is_valid_task_id(p) => {
                return bad(
                    InvalidValue,
                    "payer must be 1 to 128 characters from A-Z a-z 0-9 _ -".into(),
                )
            }
            _ => {}
        }
    } else if env.payer.is_some() || env.currency.is_some() {
        return bad(
            InvalidValue,
            "payer and currency only make sense with a price".into(),
        );
    }
    if let Some(c) = env.currency.as_deref() {
        if c.is_empty()
            || c.len() > 12
            || !c
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return bad(
                InvalidValue,
                format!(
                    "currency {:?} must be 1 to 12 upper-case letters or digits, e.g. USD or SAT",
                    truncate(c, 16)
                ),
            );
        }
    }
    if let Some(r) = &env.resources {
        if r.gpus == Some(0) || r.gpus.is_some_and(|g| g > 64) {
            return bad(
                InvalidValue,
                "resources.gpus must be between 1 and 64".into(),
            );
        }
        if r.gpu_product
            .as_deref()
            .is_some_and(|p| p.is_empty() || p.len() > 63)
        {
            return bad(
                InvalidValue,
                "resources.gpu_product must be 1 to 63 characters".into(),
            );
        }
    }
    if let Some(r) = env.retry {
        if r.base_ms == 0 || r.max_ms < r.base_ms || r.max_ms > 24 * 3600 * 1000 {
            return bad(
                InvalidValue,
                "retry needs 1 <= base_ms <= max_ms <= 86400000".into(),
            );
        }
    }
    let labels = env.labels.unwrap_or_default();
    if labels.len() > limits.max_labels {
        return bad(
            LimitExceeded,
            format!(
                "{} labels given, at most {} allowed",
                labels.len(),
                limits.max_labels
            ),
        );
    }
    for (k, v) in &labels {
        if k.is_empty()
            || k.len() > limits.max_label_key_len
            || v.len() > limits.max_label_value_len
        {
            return bad(
                LimitExceeded,
                format!(
                    "label {:?} is out of bounds: keys 1 to {} bytes, values up to {} bytes",
                    truncate(k, 32),
                    limits.max_label_key_len,
                    limits.max_label_value_len
                ),
            );
        }
    }
    Ok(ValidTask {
        id: raw_id.unwrap_or_else(fallback_id),
        pool: pool.to_string(),
        kind: env.kind,
        payload: env.payload,
        priority: env.priority.unwrap_or_default(),
        max_attempts,
        timeout_ms,
        deadline: env.deadline,
        not_before: env.not_before,
        price,
        payer: env.payer,
        currency: env.currency,
        resources: env.resources,
        labels,
        retry: env.retry,
    })
}

/// Parse a decimal price string: digits with an optional fraction, no sign, no exponent.
fn parse_price(p: &str, max_scale: u32) -> Result<Decimal, (RejectReason, String)> {
    let well_formed = {
        let mut parts = p.splitn(2, '.');
        let int = parts.next().unwrap_or("");
        let frac = parts.next();
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
    };
    if !well_formed || p.len() > 40 {
        return Err((
            RejectReason::InvalidValue,
            format!(
                "price {:?} must be a non-negative decimal string such as \"0.25\"",
                truncate(p, 40)
            ),
        ));
    }
    let d: Decimal = p.parse().map_err(|_| {
        (
            RejectReason::InvalidValue,
            format!("price {:?} is out of range", truncate(p, 40)),
        )
    })?;
    if d.scale() > max_scale {
        return Err((
            RejectReason::LimitExceeded,
            format!(
                "price {p:?} has {} decimals, at most {max_scale} allowed",
                d.scale()
            ),
        ));
    }
    Ok(d)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(body: &str) -> Result<ValidTask, Rejection> {
        validate(
            body.as_bytes(),
            "default",
            &Limits::default(),
            |p| p == "default",
            crate::ids::new_task_id,
        )
    }
    fn reason(body: &str) -> RejectReason {
        v(body).expect_err("should be rejected").reason
    }

    #[test]
    fn minimal_task_gets_defaults() {
        let t = v(r#"{"kind":"echo","payload":{"x":1}}"#).unwrap();
        assert_eq!(t.kind, "echo");
        assert_eq!(t.priority, Priority::Normal);
        assert_eq!(t.max_attempts, 3);
        assert_eq!(t.id.len(), 26);
        assert_eq!(t.payload["x"], 1);
    }

    #[test]
    fn full_task() {
        let t = v(r#"{"v":1,"kind":"k","id":"abc","priority":"high","max_attempts":5,"timeout_ms":1000,
            "deadline":"2999-01-01T00:00:00Z","not_before":"2998-01-01T00:00:00+02:00","price":"0.25","payer":"alice",
            "currency":"USD","resources":{"gpus":1,"gpu_memory_mib":8000,"gpu_product":"A100"},"labels":{"team":"x"}}"#)
        .unwrap();
        assert_eq!(t.id, "abc");
        assert_eq!(t.price, Some("0.25".parse().unwrap()));
        let env = t.to_envelope();
        assert_eq!(env.price.as_deref(), Some("0.25"));
    }

    #[test]
    fn every_reason() {
        assert_eq!(reason("not json"), RejectReason::InvalidJson);
        assert_eq!(reason("[1,2]"), RejectReason::InvalidJson);
        assert_eq!(
            reason(r#"{"kind":"a","bogus":1}"#),
            RejectReason::UnknownField
        );
        assert_eq!(reason(r#"{"payload":1}"#), RejectReason::MissingField);
        assert_eq!(
            reason(r#"{"kind":"a","id":"a.b"}"#),
            RejectReason::InvalidId
        );
        assert_eq!(reason(r#"{"kind":"a","id":7}"#), RejectReason::InvalidId);
        assert_eq!(
            reason(r#"{"kind":"a","priority":"urgent"}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","max_attempts":0}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","max_attempts":-1}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","timeout_ms":0}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(reason(r#"{"kind":""}"#), RejectReason::InvalidValue);
        assert_eq!(
            reason(r#"{"kind":"a","deadline":"tomorrow"}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","deadline":"2001-01-01T00:00:00Z"}"#),
            RejectReason::DeadlinePassed
        );
        assert_eq!(
            reason(r#"{"kind":"a","price":"-1","payer":"p"}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","price":"1e5","payer":"p"}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","price":"1"}"#),
            RejectReason::MissingField
        );
        assert_eq!(
            reason(r#"{"kind":"a","payer":"p"}"#),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(r#"{"kind":"a","price":"0.1234567890123456789","payer":"p"}"#),
            RejectReason::LimitExceeded
        );
        assert_eq!(
            reason(r#"{"kind":"a","v":2}"#),
            RejectReason::UnsupportedVersion
        );
        assert_eq!(
            reason(r#"{"kind":"a","resources":{"gpus":0}}"#),
            RejectReason::InvalidValue
        );
        let many: String = (0..40)
            .map(|i| format!("\"k{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            reason(&format!(r#"{{"kind":"a","labels":{{{many}}}}}"#)),
            RejectReason::LimitExceeded
        );
        let big = format!(r#"{{"kind":"a","payload":"{}"}}"#, "x".repeat(300 * 1024));
        assert_eq!(reason(&big), RejectReason::TooLarge);
        let r = validate(
            br#"{"kind":"a"}"#,
            "nope",
            &Limits::default(),
            |p| p == "default",
            crate::ids::new_task_id,
        )
        .unwrap_err();
        assert_eq!(r.reason, RejectReason::UnknownPool);
        let r = validate(
            br#"{"kind":"a"}"#,
            "Bad_Pool",
            &Limits::default(),
            |_| true,
            crate::ids::new_task_id,
        )
        .unwrap_err();
        assert_eq!(r.reason, RejectReason::UnknownPool);
    }

    #[test]
    fn rejection_keeps_valid_id() {
        let r = v(r#"{"id":"t-1","kind":"a","bogus":1}"#).unwrap_err();
        assert_eq!(r.task_id.as_deref(), Some("t-1"));
        let r = v(r#"{"id":"t.1","kind":"a"}"#).unwrap_err();
        assert_eq!(r.task_id, None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = validate(&bytes, "default", &Limits::default(), |_| true, crate::ids::new_task_id);
        }

        #[test]
        fn never_panics_on_json_like(s in r#"\{("[a-z_]{1,12}":("[^"]{0,8}"|[0-9-]{1,5}|null|\{\}|\[\]),?){0,6}\}"#) {
            let _ = validate(s.as_bytes(), "default", &Limits::default(), |_| true, crate::ids::new_task_id);
        }
    }
}
