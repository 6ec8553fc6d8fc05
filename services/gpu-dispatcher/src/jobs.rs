//! The Kubernetes backend: one `batch/v1` Job per attempt of a GPU task.
//!
//! [`JobBackend::run`] creates the attempt's Job (named by [`job_name`], so the same attempt
//! always maps to the same Job), watches it with a kube watcher and turns its end into the
//! attempt's outcome:
//!
//! - `Complete` → `Ok({"job", "namespace", "adopted", "start_time", "completion_time",
//!   "duration_s"})`.
//! - `Failed` → [`TaskError::Retryable`] with the condition's reason and message
//!   (`DeadlineExceeded`: the task ran past its timeout; `BackoffLimitExceeded`: its container
//!   failed) and what the pods say (exit code, reason, the termination message, which is the
//!   end of the log of a failed container). Retries belong to the coordinator, hence
//!   `backoffLimit: 0`.
//! - The Job deleted by someone else → `Retryable("job was deleted …")`.
//! - The attempt's cancel token fires (cancel, timeout, hand-back) → the Job is deleted with
//!   propagation `Background` (its pods go too) and `Retryable("… cancelled …")` returned.
//!   To leave the Job running for the next dispatcher process instead (so a restart loses no
//!   work), drop the future of `run` without cancelling: [`JobBackend::run_attempt`] does that
//!   when the cancel comes from the end of an agent's shutdown grace.
//!
//! **Restarts.** The name is deterministic, so when the coordinator redelivers an attempt after
//! a dispatcher restart, `run` gets `409 AlreadyExists` on create and *adopts* the Job: it
//! checks the Job's annotations name the same task and attempt, then watches it as if it had
//! created it; a Job that finished while no dispatcher watched still yields its outcome (it is
//! kept for `ttl_after_finished`). [`JobBackend::sweep`] deletes the Jobs of attempts the
//! coordinator no longer has (finished, retried, dead), so nothing is orphaned.
//!
//! **API errors on create.** `409` adopts; `403` (RBAC) and other `4xx` (`422` invalid, `404`
//! no such namespace) are fatal, with the API's message and a hint; `403 … exceeded quota`,
//! `429`, `5xx` and connection errors are retryable (quota frees up as other Jobs finish).
//!
//! **Labels.** Every Job and its pods carry `app.kubernetes.io/managed-by:
//! taskbus-gpu-dispatcher`, `app.kubernetes.io/part-of: taskbus`, `taskbus.dev/pool`,
//! `taskbus.dev/attempt` and `taskbus.dev/task-id` (the id itself when it is a valid label
//! value, else a valid prefix plus a hash); the exact task id is in the annotation
//! `taskbus.dev/task-id` and the kind in `taskbus.dev/kind`. The task's own labels are
//! arbitrary strings, so they never become Kubernetes labels: each is copied to an annotation
//! `taskbus.dev/label-<key>` when `label-<key>` is a valid annotation name (at most 63 of
//! `A-Z a-z 0-9 - _ .`, alphanumeric at the end) and its value is at most 4 KiB; the others
//! are skipped.
//!
//! **Pod.** Container `task`: the template's image, its command (or the image's entrypoint),
//! `payload.args` as `args`; env `TASKBUS_TASK_ID`, `TASKBUS_POOL`, `TASKBUS_ATTEMPT`,
//! `TASKBUS_KIND`, `TRACEPARENT` when the task has one, and the payload as JSON in
//! `TASKBUS_PAYLOAD` (never `NVIDIA_VISIBLE_DEVICES`:
//! the device plugin sets it); `nvidia.com/gpu` in limits; node selector on GFD's
//! `nvidia.com/gpu.product`, required node affinity `nvidia.com/gpu.memory Gt <MiB-1>`;
//! toleration of `nvidia.com/gpu:NoSchedule`; `/dev/shm` an in-memory emptyDir;
//! `restartPolicy: Never`; no service-account token unless a service account is configured;
//! no privilege escalation; a pod evicted by a drain or preemption is replaced, not counted as
//! a failure (`podFailurePolicy` ignores `DisruptionTarget`).

mod names;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use taskbus_agent::{CancellationToken, TaskError};
use tracing::{debug, info, warn};

use crate::launch::Launch;

pub use names::{is_dns_label, job_name, label_value};
pub use spec::{
    deadline_seconds, is_quantity, parse_template, JobTemplate, JobsConfig, ATTEMPT_LABEL,
    CONTAINER, GPU_MEMORY_LABEL, GPU_PRODUCT_LABEL, GPU_RESOURCE, KIND_ANNOTATION,
    MANAGED_BY_LABEL, MANAGER, PART_OF_LABEL, POOL_LABEL, TASK_ID_ANNOTATION, TASK_ID_LABEL,
    TASK_LABEL_ANNOTATION_PREFIX,
};

/// The Kubernetes permissions the backend uses in its namespace, as (API group, resource,
/// verbs): exactly what deploy/gpu-dispatcher/'s Role grants (its test compares the two).
/// Pods are only listed, for the diagnostics of a failed Job.
pub const RBAC_RULES: &[(&str, &str, &[&str])] = &[
    (
        "batch",
        "jobs",
        &["create", "delete", "get", "list", "watch"],
    ),
    ("", "pods", &["list"]),
];

/// Consecutive `403 Forbidden` answers to the watch after which the attempt fails (RBAC).
const MAX_FORBIDDEN_WATCHES: u32 = 3;
/// Longest termination message quoted in an error, characters.
const MAX_MESSAGE_CHARS: usize = 2000;

/// Errors of [`JobBackend::sweep`].
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(
        "listing the Jobs of pool {pool} in namespace {namespace}: {source} \
         (the dispatcher needs `list` on batch/jobs there)"
    )]
    List {
        pool: String,
        namespace: String,
        #[source]
        source: kube::Error,
    },
}

/// Runs attempts as Kubernetes Jobs in one namespace.
#[derive(Clone)]
pub struct JobBackend {
    /// Shared, so that a clone (one per task) is a pointer.
    inner: Arc<Inner>,
}

struct Inner {
    config: JobsConfig,
    jobs: Api<Job>,
    pods: Api<Pod>,
}

impl std::fmt::Debug for JobBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn cancelled(name: &str) -> TaskError {
    TaskError::Retryable(format!(
        "the attempt was cancelled; its Job {name} was deleted"
    ))
}

/// Whether a kube error is the API's `403 Forbidden`.
fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

fn watch_forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => is_forbidden(e),
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

impl JobBackend {
    pub fn new(client: kube::Client, config: JobsConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                jobs: Api::namespaced(client.clone(), &config.namespace),
                pods: Api::namespaced(client, &config.namespace),
                config,
            }),
        }
    }

    pub fn config(&self) -> &JobsConfig {
        &self.inner.config
    }

    /// Pure: the Job for one attempt. Fatal errors (with a sentence): a kind without a
    /// template (naming the configured kinds), bad `payload.args`, a payload over the limit,
    /// no GPU asked for, a `gpu_product` that no node label can carry.
    pub fn job_for(&self, l: &Launch) -> Result<Job, TaskError> {
        spec::build(&self.inner.config, l)
    }

    /// [`JobBackend::run`] for an agent's attempt: `l.cancel` deletes the Job when the task is
    /// cancelled or times out, but not when it fires because the agent gives up on the attempt
    /// at the end of its shutdown grace (`shutdown` is cancelled too). Then the Job keeps
    /// running and this future never ends (the agent drops it); the dispatcher that gets the
    /// redelivered attempt adopts the Job. A rollout of dispatchers must not kill a 2-hour
    /// training run.
    pub async fn run_attempt(
        &self,
        l: Launch,
        shutdown: CancellationToken,
    ) -> Result<Value, TaskError> {
        let cancel = l.cancel.clone();
        let stop = CancellationToken::new();
        let l = Launch {
            cancel: stop.clone(),
            ..l
        };
        let forward = async {
            cancel.cancelled().await;
            if !shutdown.is_cancelled() {
                stop.cancel();
            }
        };
        let run = self.run(l);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => return r,
            () = forward => {}
        }
        if stop.is_cancelled() {
            run.await
        } else {
            std::future::pending().await
        }
    }

    /// Runs one attempt as a Job to its end (see the module docs for the outcomes).
    pub async fn run(&self, l: Launch) -> Result<Value, TaskError> {
        let job = self.job_for(&l)?;
        let name = job.name_any();
        if l.cancel.is_cancelled() {
            return Err(TaskError::Retryable(
                "the attempt was cancelled before its Job was created".into(),
            ));
        }
        let adopted = tokio::select! {
            biased;
            _ = l.cancel.cancelled() => {
                self.delete_quietly(&name).await;
                return Err(cancelled(&name));
            }
            r = self.create_or_adopt(&job, &l) => r?,
        };
        let outcome = tokio::select! {
            biased;
            _ = l.cancel.cancelled() => {
                self.delete_quietly(&name).await;
                return Err(cancelled(&name));
            }
            r = self.watch(&name, adopted) => r,
        };
        if let Err(TaskError::Fatal(_)) = &outcome {
            // We could not watch it (RBAC): stop it rather than leave it running unobserved.
            self.delete_quietly(&name).await;
        }
        outcome
    }

    /// Creates the Job; on `409 AlreadyExists` adopts the existing one when it belongs to the
    /// same attempt. Returns whether it adopted.
    async fn create_or_adopt(&self, job: &Job, l: &Launch) -> Result<bool, TaskError> {
        let name = job.name_any();
        let ns = &self.inner.config.namespace;
        for _ in 0..3 {
            match self.inner.jobs.create(&PostParams::default(), job).await {
                Ok(_) => {
                    info!(
                        job = %name, namespace = %ns, task_id = %l.task_id, attempt = l.attempt,
                        "created Job"
                    );
                    return Ok(false);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(self.create_error(&name, e)),
            }
            let existing = match self.inner.jobs.get_opt(&name).await {
                Ok(Some(j)) => j,
                Ok(None) => continue, // deleted in between: create it again
                Err(e) => return Err(self.create_error(&name, e)),
            };
            let ann = existing.annotations();
            let owner = (
                existing.labels().get(MANAGED_BY_LABEL).map(String::as_str),
                ann.get(TASK_ID_ANNOTATION).map(String::as_str),
                existing.labels().get(ATTEMPT_LABEL).map(String::as_str),
                existing.labels().get(POOL_LABEL).map(String::as_str),
            );
            let attempt = l.attempt.to_string();
            let ours = (
                Some(MANAGER),
                Some(l.task_id.as_str()),
                Some(attempt.as_str()),
                Some(l.pool.as_str()),
            );
            if owner != ours {
                return Err(TaskError::Fatal(format!(
                    "a Job named {name} already exists in namespace {ns} and is not this \
                     attempt's (managed-by, task id, attempt, pool = {owner:?}); delete it or \
                     rename it"
                )));
            }
            if existing.metadata.deletion_timestamp.is_some() {
                return Err(TaskError::Retryable(format!(
                    "the Job {name} of this attempt is being deleted"
                )));
            }
            info!(
                job = %name, namespace = %ns, task_id = %l.task_id, attempt = l.attempt,
                "adopted the existing Job of this attempt"
            );
            return Ok(true);
        }
        Err(TaskError::Retryable(format!(
            "the Job {name} kept disappearing between create and get"
        )))
    }

    /// The attempt's error for a failed create (or get after a conflict).
    fn create_error(&self, name: &str, e: kube::Error) -> TaskError {
        let ns = &self.inner.config.namespace;
        let kube::Error::Api(s) = &e else {
            return TaskError::Retryable(format!(
                "creating the Job {name} in namespace {ns}: the Kubernetes API is unreachable: {e}"
            ));
        };
        let msg = if s.message.is_empty() {
            s.reason.clone()
        } else {
            s.message.clone()
        };
        match s.code {
            403 if msg.contains("exceeded quota") => TaskError::Retryable(format!(
                "creating the Job {name} in namespace {ns}: {msg} (a ResourceQuota is full; \
                 retrying once other Jobs finish)"
            )),
            403 => TaskError::Fatal(format!(
                "creating the Job {name} in namespace {ns} was forbidden: {msg} (check the \
                 dispatcher's RBAC: its service account needs create, get, list, watch and \
                 delete on batch/jobs in namespace {ns}; or an admission policy refused it)"
            )),
            404 => TaskError::Fatal(format!(
                "creating the Job {name} in namespace {ns}: {msg} (does namespace {ns} exist?)"
            )),
            400 | 422 => TaskError::Fatal(format!(
                "the API refused the Job {name} as invalid: {msg} (check the Job template \
                 and the dispatcher's --shm-size, --service-account, --image-pull-secret and \
                 the task's gpu_product)"
            )),
            408 | 429 => TaskError::Retryable(format!(
                "creating the Job {name} in namespace {ns}: {msg} (the API server is busy)"
            )),
            c if (400..500).contains(&c) => TaskError::Fatal(format!(
                "creating the Job {name} in namespace {ns}: HTTP {c}: {msg} (check RBAC, \
                 quotas and admission policies)"
            )),
            c => TaskError::Retryable(format!(
                "creating the Job {name} in namespace {ns}: HTTP {c}: {msg}"
            )),
        }
    }

    /// Watches the Job until it completes, fails or goes away.
    async fn watch(&self, name: &str, adopted: bool) -> Result<Value, TaskError> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(self.inner.jobs.clone(), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // Whether the current (re)list has shown the Job.
        let mut listed = false;
        let mut forbidden = 0;
        while let Some(event) = stream.next().await {
            let job = match event {
                Ok(watcher::Event::Init) => {
                    listed = false;
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    forbidden = 0;
                    if !listed {
                        return Err(TaskError::Retryable(format!(
                            "job was deleted: the Job {name} is gone from namespace {}",
                            self.inner.config.namespace
                        )));
                    }
                    continue;
                }
                Ok(watcher::Event::Delete(job)) if job.name_any() == name => {
                    return Err(TaskError::Retryable(format!(
                        "job was deleted: the Job {name} was deleted before it finished"
                    )));
                }
                Ok(watcher::Event::Delete(_)) => continue,
                Ok(watcher::Event::InitApply(job) | watcher::Event::Apply(job)) => job,
                Err(e) => {
                    if watch_forbidden(&e) {
                        forbidden += 1;
                        if forbidden >= MAX_FORBIDDEN_WATCHES {
                            return Err(TaskError::Fatal(format!(
                                "watching the Job {name} was forbidden: {e} (the dispatcher's \
                                 service account needs list and watch on batch/jobs in \
                                 namespace {})",
                                self.inner.config.namespace
                            )));
                        }
                    }
                    warn!(job = %name, error = %e, "watching the Job failed; watching again");
                    continue;
                }
            };
            forbidden = 0;
            if job.name_any() != name {
                continue;
            }
            listed = true;
            if let Some(outcome) = self.outcome(&job, adopted).await {
                return outcome;
            }
        }
        Err(TaskError::Retryable(format!(
            "the watch of the Job {name} ended"
        )))
    }

    /// The attempt's outcome once the Job has finished; `None` while it runs.
    async fn outcome(&self, job: &Job, adopted: bool) -> Option<Result<Value, TaskError>> {
        let name = job.name_any();
        let status = job.status.as_ref()?;
        let conditions = status.conditions.as_deref().unwrap_or_default();
        let done = |t: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == t && c.status == "True")
        };
        if done("Complete").is_some() {
            let start = status.start_time.as_ref();
            let end = status.completion_time.as_ref();
            let duration = start
                .zip(end)
                .map(|(s, e)| e.0.as_second() - s.0.as_second());
            debug!(job = %name, "Job complete");
            return Some(Ok(json!({
                "job": name,
                "namespace": self.inner.config.namespace,
                "adopted": adopted,
                "start_time": start,
                "completion_time": end,
                "duration_s": duration,
            })));
        }
        let failed = done("Failed")?;
        let reason = failed.reason.as_deref().unwrap_or("Failed");
        let mut text = format!("Job {name} failed: {reason}");
        if let Some(m) = failed.message.as_deref().filter(|m| !m.is_empty()) {
            text.push_str(": ");
            text.push_str(m);
        }
        if reason == "DeadlineExceeded" {
            text.push_str(" (the task ran past its timeout, counted from the Job's start)");
        }
        for d in self.pod_diagnostics(&name).await {
            text.push_str("; ");
            text.push_str(&d);
        }
        Some(Err(TaskError::Retryable(text)))
    }

    /// What the pods of a failed Job say: phase, exit code and reason of the task container,
    /// its termination message (the end of its log when it failed). Best effort: empty when
    /// the pods are gone or cannot be listed within a few seconds.
    async fn pod_diagnostics(&self, job: &str) -> Vec<String> {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        let pods =
            match tokio::time::timeout(Duration::from_secs(5), self.inner.pods.list(&lp)).await {
                Ok(Ok(list)) => list.items,
                Ok(Err(e)) => {
                    debug!(job, error = %e, "cannot list the Job's pods");
                    return Vec::new();
                }
                Err(_) => return Vec::new(),
            };
        let mut out = Vec::new();
        for pod in pods.iter().take(3) {
            let pod_name = pod.name_any();
            let Some(status) = pod.status.as_ref() else {
                continue;
            };
            let mut said = false;
            let statuses = status.container_statuses.as_deref().unwrap_or_default();
            for c in statuses.iter().filter(|c| c.name == CONTAINER) {
                let state = c.state.as_ref();
                if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
                    let mut s =
                        format!("pod {pod_name}: container exited with code {}", t.exit_code);
                    if let Some(r) = t.reason.as_deref() {
                        s.push_str(&format!(" ({r})"));
                    }
                    if let Some(m) = t
                        .message
                        .as_deref()
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                    {
                        let tail: String = {
                            let n = m.chars().count();
                            m.chars()
                                .skip(n.saturating_sub(MAX_MESSAGE_CHARS))
                                .collect()
                        };
                        s.push_str(": ");
                        s.push_str(&tail);
                    }
                    out.push(s);
                    said = true;
                } else if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
                    // Never started: image pull errors, bad command, …
                    out.push(format!(
                        "pod {pod_name}: container waiting: {}{}",
                        w.reason.as_deref().unwrap_or("unknown"),
                        w.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    ));
                    said = true;
                }
            }
            if !said {
                if let Some(reason) = status.reason.as_deref() {
                    out.push(format!(
                        "pod {pod_name}: {reason}: {}",
                        status.message.as_deref().unwrap_or_default()
                    ));
                } else if status.phase.as_deref() == Some("Pending") {
                    out.push(format!(
                        "pod {pod_name}: never scheduled or started (Pending)"
                    ));
                }
            }
        }
        out
    }

    /// Deletes a Job with its pods (propagation `Background`), a few times on transient
    /// errors; a Job already gone is fine. What still fails is logged: the sweep gets it later.
    async fn delete_quietly(&self, name: &str) {
        let mut delay = Duration::from_millis(200);
        for _ in 0..3 {
            match self
                .inner
                .jobs
                .delete(name, &DeleteParams::background())
                .await
            {
                Ok(_) => {
                    info!(job = %name, "deleted the Job");
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(kube::Error::Api(s)) if (400..500).contains(&s.code) && s.code != 429 => {
                    warn!(job = %name, error = %s.message, "cannot delete the Job");
                    return;
                }
                Err(e) => {
                    warn!(job = %name, error = %e, "deleting the Job failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
    }

    /// Deletes this pool's Jobs whose attempt is no longer live. `live(task_id, attempt)` says
    /// whether the coordinator still has that attempt queued or running: `Some(false)` deletes
    /// the Job (with its pods), `Some(true)` and `None` (unknown) leave it. Jobs named in
    /// `watching` (run by this process), Jobs already being deleted, and Jobs without the
    /// backend's labels and task-id annotation are never touched. Returns how many it deleted.
    /// A failed delete is logged and skipped (the next sweep tries again). Put a Job's name
    /// ([`job_name`]) in `watching` before calling [`JobBackend::run`] for it, so a sweep never
    /// races a create.
    pub async fn sweep<F, Fut>(
        &self,
        pool: &str,
        watching: &HashSet<String>,
        live: F,
    ) -> Result<usize, JobsError>
    where
        F: Fn(String, u32) -> Fut,
        Fut: Future<Output = Option<bool>>,
    {
        let selector = format!("{MANAGED_BY_LABEL}={MANAGER},{POOL_LABEL}={pool}");
        let mut lp = ListParams::default().labels(&selector).limit(500);
        let mut deleted = 0;
        loop {
            let page = self
                .inner
                .jobs
                .list(&lp)
                .await
                .map_err(|source| JobsError::List {
                    pool: pool.to_string(),
                    namespace: self.inner.config.namespace.clone(),
                    source,
                })?;
            for job in &page.items {
                let name = job.name_any();
                if watching.contains(&name) || job.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let labels = job.labels();
                let ours = labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER)
                    && labels.get(POOL_LABEL).map(String::as_str) == Some(pool);
                let task_id = job.annotations().get(TASK_ID_ANNOTATION);
                let attempt = labels
                    .get(ATTEMPT_LABEL)
                    .and_then(|a| a.parse::<u32>().ok());
                let (true, Some(task_id), Some(attempt)) = (ours, task_id, attempt) else {
                    debug!(job = %name, "not a Job of this backend: left alone");
                    continue;
                };
                match live(task_id.clone(), attempt).await {
                    Some(false) => {}
                    Some(true) | None => continue,
                }
                match self
                    .inner
                    .jobs
                    .delete(&name, &DeleteParams::background())
                    .await
                {
                    Ok(_) => {
                        info!(
                            job = %name, task_id = %task_id, attempt,
                            "swept the Job of an attempt that is no longer live"
                        );
                        deleted += 1;
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        warn!(
                            job = %name, error = %e,
                            "cannot delete the Job; the next sweep tries again"
                        )
                    }
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => lp.continue_token = Some(token),
                None => return Ok(deleted),
            }
        }
    }
}
