//! Demo handlers of `taskbus-agent --handler H`.

use std::time::Duration;

use serde_json::Value;

use crate::{TaskContext, TaskError};

/// Result = payload.
pub async fn echo(task: TaskContext) -> Result<Value, TaskError> {
    Ok(task.payload)
}

/// Sleeps `payload.ms` milliseconds (default 100, at most one hour), returns `{"slept_ms": n}`.
/// Stops early, failing retryably, when the attempt is cancelled.
pub async fn sleep(task: TaskContext) -> Result<Value, TaskError> {
    let ms = match task.payload.get("ms") {
        None => 100,
        Some(v) => v.as_u64().filter(|ms| *ms <= 3_600_000).ok_or_else(|| {
            TaskError::Fatal(format!(
                "payload.ms must be an integer from 0 to 3600000, got {v}"
            ))
        })?,
    };
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(serde_json::json!({ "slept_ms": ms })),
        _ = task.cancel.cancelled() => Err(TaskError::Retryable("cancelled".into())),
    }
}

/// Fails every attempt (retryably, so retries and dead-lettering can be watched).
pub async fn fail(task: TaskContext) -> Result<Value, TaskError> {
    Err(TaskError::Retryable(format!(
        "the fail handler fails every attempt (attempt {})",
        task.attempt
    )))
}

/// The demo handler names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Demo {
    /// Result = payload.
    Echo,
    /// Sleep payload.ms milliseconds.
    Sleep,
    /// Fail every attempt.
    Fail,
}

impl Demo {
    pub async fn run(self, task: TaskContext) -> Result<Value, TaskError> {
        match self {
            Demo::Echo => echo(task).await,
            Demo::Sleep => sleep(task).await,
            Demo::Fail => fail(task).await,
        }
    }
}
