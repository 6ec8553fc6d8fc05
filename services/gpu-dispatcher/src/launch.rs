//! What a backend gets to start one attempt of a placed task, and the rules both backends
//! share for turning a task's payload into a process's arguments and environment.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use taskbus_agent::{CancellationToken, TaskError};

/// Most arguments a task may pass in `payload.args`.
pub const MAX_ARGS: usize = 256;
/// Longest single argument, bytes.
pub const MAX_ARG_BYTES: usize = 4096;
/// Largest payload handed over in `TASKBUS_PAYLOAD` (Kubernetes) or on stdin (local), bytes.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// One attempt of a task, placed and ready to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub task_id: String,
    pub pool: String,
    pub attempt: u32,
    /// Chooses the program (local) or the Job template (Kubernetes) from the configuration.
    pub kind: String,
    pub payload: Value,
    pub labels: BTreeMap<String, String>,
    /// Whole GPUs the task asked for (at least 1).
    pub gpus: u32,
    /// Minimum memory per GPU, MiB, when the task asked for it.
    pub gpu_memory_mib: Option<u64>,
    /// GPU Feature Discovery product name, when the task asked for one.
    pub gpu_product: Option<String>,
    /// The GPUs given to the task (local backend: NVML indices or UUIDs; Kubernetes: empty,
    /// the scheduler picks the devices).
    pub devices: Vec<String>,
    /// The attempt's timeout (`timeout_ms` of the task).
    pub timeout: Duration,
    /// Fires when the attempt must stop: cancelled, timed out, or handed back at shutdown.
    pub cancel: CancellationToken,
    /// The task's W3C `traceparent`, handed to the program as `TRACEPARENT` (OpenTelemetry's
    /// environment carrier) so that its spans join the producer's trace.
    pub traceparent: Option<String>,
}

/// The extra arguments of a task: `payload.args`, which must be an array of strings when
/// present. Anything else in the payload is data for the program (stdin / `TASKBUS_PAYLOAD`).
pub fn task_args(payload: &Value) -> Result<Vec<String>, TaskError> {
    let Some(args) = payload.get("args") else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = args else {
        return Err(TaskError::Fatal(
            "payload.args must be an array of strings".into(),
        ));
    };
    if items.len() > MAX_ARGS {
        return Err(TaskError::Fatal(format!(
            "payload.args has {} items; at most {MAX_ARGS} are allowed",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) if s.len() > MAX_ARG_BYTES => Err(TaskError::Fatal(format!(
                "payload.args[{i}] is {} bytes; at most {MAX_ARG_BYTES} are allowed",
                s.len()
            ))),
            Value::String(s) if s.contains('\0') => Err(TaskError::Fatal(format!(
                "payload.args[{i}] contains a NUL character"
            ))),
            Value::String(s) => Ok(s.clone()),
            other => Err(TaskError::Fatal(format!(
                "payload.args[{i}] must be a string, not {other}"
            ))),
        })
        .collect()
}

/// The payload as JSON text, refused when larger than [`MAX_PAYLOAD_BYTES`].
pub fn payload_text(payload: &Value) -> Result<String, TaskError> {
    let text = payload.to_string();
    if text.len() > MAX_PAYLOAD_BYTES {
        return Err(TaskError::Fatal(format!(
            "the payload is {} bytes; a GPU task may carry at most {MAX_PAYLOAD_BYTES} \
             (put large inputs in object storage and pass their location)",
            text.len()
        )));
    }
    Ok(text)
}

/// The environment every GPU task gets, whichever the backend.
pub fn task_env(l: &Launch) -> Vec<(String, String)> {
    let mut env = vec![
        ("TASKBUS_TASK_ID".into(), l.task_id.clone()),
        ("TASKBUS_POOL".into(), l.pool.clone()),
        ("TASKBUS_ATTEMPT".into(), l.attempt.to_string()),
        ("TASKBUS_KIND".into(), l.kind.clone()),
    ];
    if let Some(tp) = &l.traceparent {
        env.push(("TRACEPARENT".into(), tp.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_are_strings_only() {
        assert_eq!(task_args(&json!({})).unwrap(), Vec::<String>::new());
        assert_eq!(
            task_args(&json!({"args": ["--lr", "0.1"]})).unwrap(),
            vec!["--lr", "0.1"]
        );
        for bad in [
            json!({"args": "--lr 0.1"}),
            json!({"args": [1]}),
            json!({"args": [null]}),
            json!({"args": ["a\u{0}b"]}),
            json!({"args": ["x".repeat(MAX_ARG_BYTES + 1)]}),
            json!({"args": vec!["a"; MAX_ARGS + 1]}),
        ] {
            let e = task_args(&bad).unwrap_err();
            assert!(matches!(e, TaskError::Fatal(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn payload_is_bounded() {
        assert_eq!(payload_text(&json!({"a": 1})).unwrap(), r#"{"a":1}"#);
        let big = json!({"x": "y".repeat(MAX_PAYLOAD_BYTES)});
        assert!(payload_text(&big)
            .unwrap_err()
            .to_string()
            .contains("at most"));
    }
}
