//! The configuration of the Kubernetes backend and the Job it makes of one attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, EmptyDirVolumeSource, EnvVar, LocalObjectReference, NodeAffinity,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, PodTemplateSpec,
    ResourceRequirements, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use taskbus_agent::TaskError;

use super::names::{
    is_dns_label, is_key_name, is_label_key, is_label_value, job_name, label_value,
};
use crate::launch::{payload_text, task_args, task_env, Launch};

/// `app.kubernetes.io/managed-by` value on every Job of the backend; with the pool label it is
/// the selector of [`super::JobBackend::sweep`], which touches nothing without it.
pub const MANAGER: &str = "taskbus-gpu-dispatcher";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
pub const POOL_LABEL: &str = "taskbus.dev/pool";
pub const ATTEMPT_LABEL: &str = "taskbus.dev/attempt";
/// Label with a label-safe form of the task id ([`super::names::label_value`]); the exact id is
/// in the annotation [`TASK_ID_ANNOTATION`].
pub const TASK_ID_LABEL: &str = "taskbus.dev/task-id";
pub const TASK_ID_ANNOTATION: &str = "taskbus.dev/task-id";
pub const KIND_ANNOTATION: &str = "taskbus.dev/kind";
/// Prefix of the annotations that carry the task's labels (`taskbus.dev/label-<key>`).
pub const TASK_LABEL_ANNOTATION_PREFIX: &str = "taskbus.dev/label-";
/// Longest task label value copied into an annotation, bytes.
pub const MAX_TASK_LABEL_VALUE: usize = 4096;

/// The container of a task's pod.
pub const CONTAINER: &str = "task";
/// The GPU extended resource of NVIDIA's device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// GPU Feature Discovery's labels: the product name and the memory of one GPU in MiB.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
pub const GPU_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";

/// The image (and optionally the command) that runs the tasks of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTemplate {
    pub image: String,
    /// The container's `command`; empty = the image's entrypoint. The task's `payload.args`
    /// become the container's `args` either way.
    pub command: Vec<String>,
}

/// Settings of the Kubernetes backend.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Where the Jobs go (the dispatcher needs the RBAC of `RBAC_RULES` there).
    pub namespace: String,
    /// Task kind → what runs it. A kind without a template fails its tasks (fatal).
    pub templates: BTreeMap<String, JobTemplate>,
    /// `ttlSecondsAfterFinished`: how long a finished Job (and its pods, logs) stays.
    pub ttl_after_finished: Duration,
    /// Size limit of the in-memory `/dev/shm` (a quantity, e.g. `16Gi`); `None` = no limit
    /// (it still counts against the pod's memory).
    pub shm_size: Option<String>,
    /// The pods' service account; `None` = the namespace's default, with no API token mounted.
    pub service_account: Option<String>,
    pub image_pull_secrets: Vec<String>,
    /// Labels added to every Job and pod (the taskbus labels win over these).
    pub extra_labels: BTreeMap<String, String>,
    /// The task container's CPU and memory requests (quantities), when set.
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
}

impl JobsConfig {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            templates: BTreeMap::new(),
            ttl_after_finished: Duration::from_secs(3600),
            shm_size: None,
            service_account: None,
            image_pull_secrets: Vec::new(),
            extra_labels: BTreeMap::new(),
            cpu_request: None,
            memory_request: None,
        }
    }

    /// Every problem of the configuration, one sentence each (the dispatcher checks this at
    /// start-up, so a typo fails there rather than in every task as a 422 from the API).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !is_dns_label(&self.namespace) {
            p.push(format!(
                "namespace {:?} is not a Kubernetes namespace name (a DNS-1123 label)",
                self.namespace
            ));
        }
        if self.templates.is_empty() {
            p.push("no Job template: give --job-template KIND=IMAGE at least once".into());
        }
        for (kind, t) in &self.templates {
            if let Err(e) = check_kind(kind).and_then(|_| check_image(&t.image)) {
                p.push(format!("Job template {kind:?}: {e}"));
            }
        }
        if self.ttl_after_finished.as_secs() > i32::MAX as u64 {
            p.push("the Job TTL does not fit ttlSecondsAfterFinished (an i32)".into());
        }
        for (what, q) in [
            ("shm size", &self.shm_size),
            ("CPU request", &self.cpu_request),
            ("memory request", &self.memory_request),
        ] {
            if let Some(q) = q.as_deref().filter(|q| !is_quantity(q)) {
                p.push(format!(
                    "{what} {q:?} is not a Kubernetes quantity (e.g. 16Gi, 500m, 2)"
                ));
            }
        }
        if let Some(sa) = self.service_account.as_deref().filter(|s| !is_subdomain(s)) {
            p.push(format!("service account {sa:?} is not a valid name"));
        }
        for s in self.image_pull_secrets.iter().filter(|s| !is_subdomain(s)) {
            p.push(format!("image pull secret {s:?} is not a valid name"));
        }
        for (k, v) in &self.extra_labels {
            if !is_label_key(k) || !is_label_value(v) {
                p.push(format!(
                    "extra label {k}={v:?} is not a valid Kubernetes label"
                ));
            } else if k.starts_with("taskbus.dev/") || k == MANAGED_BY_LABEL {
                p.push(format!(
                    "extra label {k} would clash with the backend's own labels"
                ));
            }
        }
        p
    }
}

fn check_kind(kind: &str) -> Result<(), String> {
    let n = kind.chars().count();
    if !(1..=128).contains(&n) {
        return Err(format!("the kind must be 1 to 128 characters, not {n}"));
    }
    if kind.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the kind must be printable, without spaces".into());
    }
    Ok(())
}

fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("the image is empty".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the image {image:?} contains spaces or control characters"
        ));
    }
    Ok(())
}

/// Parses `--job-template KIND=IMAGE [COMMAND ARGS...]` (whitespace separated): the kind is 1 to
/// 128 printable characters without spaces or `=`, the image is not empty; the words after it,
/// if any, are the container's command.
pub fn parse_template(spec: &str) -> Result<(String, JobTemplate), String> {
    let mut words = spec.split_whitespace();
    let first = words
        .next()
        .ok_or("an empty Job template: expected KIND=IMAGE [COMMAND ARGS...]")?;
    let (kind, image) = first.split_once('=').ok_or_else(|| {
        format!("{first:?} is not KIND=IMAGE (expected KIND=IMAGE [COMMAND ARGS...])")
    })?;
    check_kind(kind).map_err(|e| format!("Job template {spec:?}: {e}"))?;
    check_image(image).map_err(|e| format!("Job template {spec:?}: {e}"))?;
    Ok((
        kind.to_string(),
        JobTemplate {
            image: image.to_string(),
            command: words.map(str::to_string).collect(),
        },
    ))
}

/// Whether `s` looks like a Kubernetes quantity: a decimal number with an optional binary
/// (`Ki`…`Ei`) or decimal (`n u m k M G T P E`) suffix or exponent.
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let dots = number.matches('.').count();
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()));
    digits > 0 && dots <= 1 && suffix_ok
}

/// A DNS-1123 subdomain (names of service accounts and secrets).
fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn fatal(msg: String) -> TaskError {
    TaskError::Fatal(msg)
}

/// `activeDeadlineSeconds` for a timeout: whole seconds rounded up, at least 1.
pub fn deadline_seconds(timeout: Duration) -> i64 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX).max(1)
}

/// The Job of one attempt (see [`super::JobBackend::job_for`]).
pub fn build(config: &JobsConfig, l: &Launch) -> Result<Job, TaskError> {
    let Some(template) = config.templates.get(&l.kind) else {
        let kinds: Vec<&str> = config.templates.keys().map(String::as_str).collect();
        return Err(fatal(if kinds.is_empty() {
            format!(
                "no Job template for task kind {:?}: this dispatcher has none configured \
                 (--job-template KIND=IMAGE)",
                l.kind
            )
        } else {
            format!(
                "no Job template for task kind {:?}: this dispatcher runs kinds {} \
                 (--job-template KIND=IMAGE)",
                l.kind,
                kinds.join(", ")
            )
        }));
    };
    let args = task_args(&l.payload)?;
    let payload = payload_text(&l.payload)?;
    if l.gpus == 0 {
        return Err(fatal("a GPU task must ask for at least 1 GPU".into()));
    }
    if !is_label_value(&l.pool) || l.pool.is_empty() {
        return Err(fatal(format!(
            "pool {:?} is not a valid label value",
            l.pool
        )));
    }
    if let Some(product) = l.gpu_product.as_deref() {
        if !is_label_value(product) || product.is_empty() {
            return Err(fatal(format!(
                "gpu_product {product:?} cannot match a node label ({GPU_PRODUCT_LABEL} values \
                 are at most 63 of A-Z a-z 0-9 - _ . such as NVIDIA-A100-SXM4-80GB)"
            )));
        }
    }
    let name = job_name(&l.pool, &l.task_id, l.attempt);

    let mut labels = config.extra_labels.clone();
    for (k, v) in [
        (MANAGED_BY_LABEL, MANAGER.to_string()),
        (PART_OF_LABEL, "taskbus".to_string()),
        (POOL_LABEL, l.pool.clone()),
        (ATTEMPT_LABEL, l.attempt.to_string()),
        (TASK_ID_LABEL, label_value(&l.task_id)),
    ] {
        labels.insert(k.to_string(), v);
    }
    let mut annotations = BTreeMap::new();
    for (k, v) in &l.labels {
        let key_name = format!("label-{k}");
        if is_key_name(&key_name) && v.len() <= MAX_TASK_LABEL_VALUE {
            annotations.insert(format!("{TASK_LABEL_ANNOTATION_PREFIX}{k}"), v.clone());
        }
    }
    annotations.insert(TASK_ID_ANNOTATION.to_string(), l.task_id.clone());
    annotations.insert(KIND_ANNOTATION.to_string(), l.kind.clone());

    let mut env: Vec<EnvVar> = task_env(l)
        .into_iter()
        .map(|(name, value)| EnvVar {
            name,
            value: Some(value),
            ..Default::default()
        })
        .collect();
    env.push(EnvVar {
        name: "TASKBUS_PAYLOAD".into(),
        value: Some(payload),
        ..Default::default()
    });

    let mut requests = BTreeMap::new();
    if let Some(cpu) = &config.cpu_request {
        requests.insert("cpu".to_string(), Quantity(cpu.clone()));
    }
    if let Some(memory) = &config.memory_request {
        requests.insert("memory".to_string(), Quantity(memory.clone()));
    }
    let container = Container {
        name: CONTAINER.into(),
        image: Some(template.image.clone()),
        command: (!template.command.is_empty()).then(|| template.command.clone()),
        args: (!args.is_empty()).then_some(args),
        env: Some(env),
        resources: Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                GPU_RESOURCE.to_string(),
                Quantity(l.gpus.to_string()),
            )])),
            requests: (!requests.is_empty()).then_some(requests),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        // A failed container's last log lines become its termination message, which the
        // backend puts in the attempt's error (it may list pods, not read their logs).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let affinity = l.gpu_memory_mib.filter(|&m| m > 0).map(|mib| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: GPU_MEMORY_LABEL.into(),
                        operator: "Gt".into(),
                        values: Some(vec![(mib - 1).to_string()]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: config.shm_size.clone().map(Quantity),
            }),
            ..Default::default()
        }]),
        node_selector: l
            .gpu_product
            .as_ref()
            .map(|p| BTreeMap::from([(GPU_PRODUCT_LABEL.to_string(), p.clone())])),
        affinity,
        tolerations: Some(vec![Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]),
        service_account_name: config.service_account.clone(),
        automount_service_account_token: config.service_account.is_none().then_some(false),
        image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
            config
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        enable_service_links: Some(false),
        ..Default::default()
    };

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds: Some(deadline_seconds(l.timeout)),
            ttl_seconds_after_finished: Some(
                i32::try_from(config.ttl_after_finished.as_secs()).unwrap_or(i32::MAX),
            ),
            // A pod evicted by a node drain or preemption does not fail the attempt: the Job
            // starts another pod (still within activeDeadlineSeconds). Every other pod failure
            // fails the Job at once and the coordinator decides about a retry.
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![PodFailurePolicyRule {
                    action: "Ignore".into(),
                    on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                        type_: "DisruptionTarget".into(),
                        status: "True".into(),
                    }]),
                    ..Default::default()
                }],
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    })
}
