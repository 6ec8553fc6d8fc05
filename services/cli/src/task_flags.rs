//! The task flags `taskbus submit` and `taskbus schedules set` share: what to run and how.

use std::collections::BTreeMap;

use anyhow::Context;
use taskbus_proto::{Priority, TaskEnvelope};

#[derive(clap::Args, Debug)]
pub struct TaskFlags {
    /// Task kind (what the agent should do), e.g. echo.
    #[arg(long)]
    pub kind: String,
    /// Pool (DNS label).
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// JSON payload, or @FILE to read it from a file.
    #[arg(long, default_value = "{}")]
    pub payload: String,
    /// high, normal or low.
    #[arg(long, value_parser = parse_priority)]
    pub priority: Option<Priority>,
    /// Attempts before the task is dead (1 = no retries).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout, milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Price as a decimal string (needs --payer).
    #[arg(long)]
    pub price: Option<String>,
    /// Ledger account that pays the price.
    #[arg(long)]
    pub payer: Option<String>,
    /// Currency of the price (default: the ledger's).
    #[arg(long)]
    pub currency: Option<String>,
    /// Whole GPUs the task needs (GPU pools; docs/GPU.md).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub gpus: Option<u32>,
    /// GPU product, as GPU Feature Discovery spells it (e.g. NVIDIA-H100-80GB-HBM3).
    #[arg(long)]
    pub gpu_product: Option<String>,
    /// Least memory per GPU, MiB.
    #[arg(long)]
    pub gpu_memory_mib: Option<u64>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    s.parse()
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like KEY=VALUE")),
    }
}

impl TaskFlags {
    /// The envelope these flags describe, without id, deadline or start time (the caller adds
    /// what it has); the payload file is read and the payload parsed here.
    pub fn envelope(&self) -> anyhow::Result<TaskEnvelope> {
        let raw = match self.payload.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read payload file {path}"))?,
            None => self.payload.clone(),
        };
        let payload: serde_json::Value = serde_json::from_str(&raw)
            .context("--payload is not valid JSON (quote strings: '\"text\"')")?;
        let labels: BTreeMap<String, String> = self.labels.iter().cloned().collect();
        Ok(TaskEnvelope {
            v: None,
            kind: self.kind.clone(),
            payload,
            id: None,
            priority: self.priority,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            deadline: None,
            not_before: None,
            price: self.price.clone(),
            payer: self.payer.clone(),
            currency: self.currency.clone(),
            resources: (self.gpus.is_some()
                || self.gpu_product.is_some()
                || self.gpu_memory_mib.is_some())
            .then(|| taskbus_proto::Resources {
                gpus: self.gpus,
                gpu_memory_mib: self.gpu_memory_mib,
                gpu_product: self.gpu_product.clone(),
            }),
            labels: (!labels.is_empty()).then_some(labels),
            retry: None,
        })
    }
}
