//! Offline checks of deploy/gpu-dispatcher/ against the taskbus-gpu-dispatcher binary (its
//! `--help` decides which flags, variables and values the manifest may use) and against the
//! Kubernetes backend (its Role grants exactly `jobs::RBAC_RULES`, in the namespace the Jobs go
//! to), and of deploy/gpu-dispatcher/local/ (the local backend as a DaemonSet on GPU nodes)
//! against the binary and what the local backend needs from its pod. Rendered with `kubectl
//! kustomize` and schema-validated with the PyPI package `kubernetes-validate` (strict) where
//! those are installed, together with a Job the backend builds;
//! services/gpu-dispatcher/validate-manifests.sh installs the validator. Nothing here talks to a
//! cluster.

#[path = "../../../tests/manifest_checks.rs"]
mod manifest_checks;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use manifest_checks::*;
use serde_yaml::Value;
use taskbus_gpu_dispatcher::jobs::{self, JobBackend, JobTemplate, JobsConfig, RBAC_RULES};

const BIN: &str = env!("CARGO_BIN_EXE_taskbus-gpu-dispatcher");
const NAME: &str = "taskbus-gpu-dispatcher";
/// The local backend's DaemonSet (and its ServiceAccount and NetworkPolicy).
const LOCAL: &str = "taskbus-gpu-dispatcher-local";

fn dir() -> PathBuf {
    deploy_dir().join("gpu-dispatcher")
}

fn local_dir() -> PathBuf {
    dir().join("local")
}

/// The dispatcher's Deployment among `all`.
fn deployment(all: &[(String, Value)]) -> &Value {
    of_kind(all, "Deployment")
        .into_iter()
        .find(|d| text(d, "metadata.name") == NAME)
        .expect("the dispatcher's Deployment")
}

/// The value of `--flag` in the dispatcher's container args (`--flag=v` or `--flag v`).
fn arg(dep: &Value, flag: &str) -> Option<String> {
    args_of(get(dep, "spec.template.spec.containers.0"))
        .into_iter()
        .find(|(f, _)| f == flag)
        .map(|(_, v)| v)
}

/// What is wrong with the dispatcher's RBAC among `all`: one Role, in the namespace its
/// `--namespace` sends the Jobs to, granting exactly [`RBAC_RULES`] (no verb missing, none
/// extra, no wildcard), bound to the Deployment's ServiceAccount in the Deployment's namespace,
/// which mounts its API token; and no cluster-wide role.
fn rbac_problems(all: &[(String, Value)]) -> Vec<String> {
    let mut p = Vec::new();
    let dep = deployment(all);
    let jobs_ns = arg(dep, "--namespace").unwrap_or_default();
    let dep_ns = text(dep, "metadata.namespace");
    let sa = text(dep, "spec.template.spec.serviceAccountName");
    for kind in ["ClusterRole", "ClusterRoleBinding"] {
        if !of_kind(all, kind).is_empty() {
            p.push(format!(
                "a {kind}: the backend needs access to one namespace only"
            ));
        }
    }
    let roles = of_kind(all, "Role");
    let [role] = roles.as_slice() else {
        p.push(format!("{} Roles, one expected", roles.len()));
        return p;
    };
    if text(role, "metadata.namespace") != jobs_ns {
        p.push(format!(
            "Role {}: in namespace {:?}, the Jobs go to {jobs_ns:?} (--namespace)",
            text(role, "metadata.name"),
            text(role, "metadata.namespace")
        ));
    }
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in seq(role, "rules") {
        let strings = |k: &str| -> Vec<String> {
            seq(rule, k)
                .iter()
                .map(|v| v.as_str().unwrap_or("?").to_string())
                .collect()
        };
        if !get(rule, "resourceNames").is_null() || !get(rule, "nonResourceURLs").is_null() {
            p.push("a Role rule with resourceNames or nonResourceURLs".into());
        }
        for g in strings("apiGroups") {
            for r in strings("resources") {
                granted
                    .entry((g.clone(), r))
                    .or_default()
                    .extend(strings("verbs"));
            }
        }
    }
    let wanted: BTreeMap<(String, String), BTreeSet<String>> = RBAC_RULES
        .iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    if granted != wanted {
        p.push(format!(
            "the Role grants {granted:?}, the backend uses exactly {wanted:?} (jobs::RBAC_RULES)"
        ));
    }
    let bound = of_kind(all, "RoleBinding").into_iter().any(|b| {
        text(b, "metadata.namespace") == text(role, "metadata.namespace")
            && text(b, "roleRef.kind") == "Role"
            && text(b, "roleRef.name") == text(role, "metadata.name")
            && seq(b, "subjects").iter().any(|s| {
                text(s, "kind") == "ServiceAccount"
                    && text(s, "name") == sa
                    && text(s, "namespace") == dep_ns
            })
    });
    if !bound {
        p.push(format!(
            "no RoleBinding gives the Role to ServiceAccount {dep_ns}/{sa}"
        ));
    }
    for a in of_kind(all, "ServiceAccount") {
        if text(a, "metadata.name") == sa
            && get(a, "automountServiceAccountToken").as_bool() == Some(false)
        {
            p.push(format!(
                "ServiceAccount {sa} mounts no token, and the dispatcher calls the API"
            ));
        }
    }
    if get(dep, "spec.template.spec.automountServiceAccountToken").as_bool() == Some(false) {
        p.push("the pod mounts no API token, and the dispatcher calls the API".into());
    }
    p
}

/// A pool name in `--pool` (`NAME` or `NAME=QUOTA`), and the pods labelled with it.
fn pool_problems(workload: &Value, help: &Help) -> Vec<String> {
    let mut p = Vec::new();
    let c = get(workload, "spec.template.spec.containers.0");
    let pool = effective(c, help, "--pool").unwrap_or_default();
    let pool = pool.split('=').next().unwrap_or_default().to_string();
    if !taskbus_proto::ids::is_valid_pool(&pool) {
        p.push(format!("--pool {pool:?} is not a pool name"));
    }
    if get(workload, "spec.template.metadata.labels")["taskbus.dev/pool"].as_str() != Some(&pool) {
        p.push(format!("pods lack the label taskbus.dev/pool: {pool}"));
    }
    p
}

/// The kubelet's kill comes 5 s or more after `--grace-seconds`, so that the dispatcher can
/// hand back what it could not finish and flush its NATS connection.
fn grace_problems(workload: &Value, help: &Help) -> Vec<String> {
    let c = get(workload, "spec.template.spec.containers.0");
    let grace: Option<u64> = effective(c, help, "--grace-seconds").and_then(|g| g.parse().ok());
    let kill = get(workload, "spec.template.spec.terminationGracePeriodSeconds")
        .as_u64()
        .or(Some(30));
    if matches!((grace, kill), (Some(g), Some(k)) if k >= g + 5) {
        return vec![];
    }
    vec![format!(
        "terminationGracePeriodSeconds {kill:?} must exceed --grace-seconds {grace:?} by 5 s or more"
    )]
}

/// The container's `command`: absent (the image's entrypoint) unless `init` is required, or
/// `[<init>, "--", "taskbus-gpu-dispatcher"]`, an init as PID 1 (tini, dumb-init; an absolute
/// path) that reaps the orphaned children of the tasks and starts the dispatcher.
fn command_problems(c: &Value, init: bool) -> Vec<String> {
    let command: Vec<&str> = seq(c, "command")
        .iter()
        .map(|v| v.as_str().unwrap_or("?"))
        .collect();
    let is_bin = |b: &str| b == NAME || b.ends_with(&format!("/{NAME}"));
    let ok = match command.as_slice() {
        [] => !init,
        [bin] => !init && is_bin(bin),
        [first, "--", bin] => first.starts_with('/') && !is_bin(first) && is_bin(bin),
        _ => false,
    };
    if ok {
        return vec![];
    }
    vec![format!(
        "command {command:?}: expected [\"/usr/bin/tini\", \"--\", \"{NAME}\"] (an init as PID 1 \
         that reaps the orphans of killed tasks){}",
        if init { "" } else { ", or none" }
    )]
}

/// The dispatcher's own checks: the Kubernetes backend, a pool name, Job templates that parse.
fn dispatcher_problems(dep: &Value, help: &Help) -> Vec<String> {
    let mut p = Vec::new();
    let c = get(dep, "spec.template.spec.containers.0");
    if effective(c, help, "--backend").as_deref() != Some("kubernetes") {
        p.push("--backend is not kubernetes".into());
    }
    p.extend(pool_problems(dep, help));
    let gpus = effective(c, help, "--gpus").and_then(|g| g.parse::<u32>().ok());
    if gpus.is_none_or(|g| g == 0) {
        p.push(format!(
            "--gpus {gpus:?}: the Kubernetes backend needs the most GPUs its Jobs may hold"
        ));
    }
    p.extend(grace_problems(dep, help));
    p.extend(command_problems(c, false));
    let templates = arg_values(c, "--job-template");
    if templates.is_empty() {
        p.push("no --job-template".into());
    }
    for t in templates {
        if let Err(e) = jobs::parse_template(&t) {
            p.push(format!("--job-template {t:?}: {e}"));
        }
    }
    p
}

#[test]
fn kustomization_lists_exactly_its_files() {
    // local/ is the local backend's kustomization, an alternative applied on its own.
    assert_none(kustomization_problems(&dir(), &["local"]));
    for (file, d) in docs(&dir()) {
        assert!(!text(&d, "apiVersion").is_empty(), "{file}: apiVersion");
        if text(&d, "kind") != "Kustomization" {
            assert!(!text(&d, "metadata.name").is_empty(), "{file}: name");
            assert!(
                !text(&d, "metadata.namespace").is_empty(),
                "{file}: namespace"
            );
        }
    }
    // Not applied by `kubectl apply -k deploy/` (pool `gpu` is not created there), and said so.
    let top = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    assert!(
        top.contains("gpu-dispatcher/"),
        "deploy/kustomization.yaml explains the omission"
    );
    // The coordinator's manifest test checks the top level with the same list of omissions.
    assert_none(kustomization_problems(
        &deploy_dir(),
        &["keda", "gpu-dispatcher", "monitoring"],
    ));
    let all = resources(&deploy_dir());
    assert!(
        !all.iter().any(|(_, d)| text(d, "metadata.name") == NAME),
        "deploy/ does not apply the dispatcher of a pool it does not create"
    );
}

#[test]
fn manifests_agree_with_the_binary() {
    let help = Help::of(BIN);
    let all = docs(&dir());
    let dep = deployment(&all);
    let ns = text(dep, "metadata.namespace").to_string();
    // The RBAC lives where the Jobs go; the rest with the Deployment.
    let own: Vec<(String, Value)> = all
        .iter()
        .filter(|(_, d)| !matches!(text(d, "kind"), "Role" | "RoleBinding"))
        .cloned()
        .collect();
    assert_none(workload_problems(&own, NAME, &help, &ns));
    assert_none(dispatcher_problems(dep, &help));
}

#[test]
fn rbac_grants_exactly_what_the_backend_uses() {
    let all = docs(&dir());
    assert_none(rbac_problems(&all));
    // The Jobs' namespace is one deploy/ creates.
    let dep = deployment(&all);
    assert_eq!(arg(dep, "--namespace").as_deref(), Some("taskbus-agents"));
}

#[test]
fn network_policy_lets_it_reach_dns_nats_and_the_api_server_only() {
    let mut all = resources(&deploy_dir());
    all.extend(resources(&dir()));
    assert_none(namespace_problems(&all));
    assert_none(stray_policy_problems(&all));
    let dep = deployment(&all);
    assert_none(network_problems(&all, dep));
    let net = Network::of(&all);
    for port in [443, 6443] {
        assert!(
            net.egress_allows(dep, &Peer::Outside, port, "TCP"),
            "the Kubernetes API on {port}"
        );
    }
    assert!(
        !net.egress_allows(dep, &Peer::Outside, 5432, "TCP"),
        "no database"
    );
    let coordinator = Peer::pod(
        "taskbus",
        &[("app.kubernetes.io/name", "taskbus-coordinator")],
    );
    assert!(net.ingress_allows(dep, &prometheus(), "http"));
    assert!(
        !net.ingress_allows(dep, &coordinator, "http"),
        "only Prometheus reaches /metrics"
    );
}

#[test]
fn checks_report_broken_rbac_and_flags() {
    let mut all = docs(&dir());
    for (_, d) in all.iter_mut() {
        match text(d, "kind") {
            "Role" => {
                d["metadata"]["namespace"] = "taskbus".into();
                let verbs = d["rules"][0]["verbs"].as_sequence_mut().unwrap();
                verbs.retain(|v| v.as_str() != Some("watch"));
                verbs.push("patch".into());
            }
            "RoleBinding" => d["subjects"][0]["namespace"] = "taskbus-agents".into(),
            "ServiceAccount" => d["automountServiceAccountToken"] = false.into(),
            "Deployment" => {
                d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 26.into();
                let c = &mut d["spec"]["template"]["spec"]["containers"][0];
                for a in c["args"].as_sequence_mut().unwrap() {
                    match a.as_str().unwrap() {
                        "--backend=kubernetes" => *a = "--backend=local".into(),
                        "--gpus=8" => *a = "--gpus=0".into(),
                        s if s.starts_with("--job-template=") => *a = "--job-template=train".into(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let mut problems = rbac_problems(&all);
    let help = Help::parse(
        "Usage: x [OPTIONS]\n\nOptions:\n      --backend <B>\n      --pool <P>\n      --gpus <N>\n      --grace-seconds <S>\n      --job-template <T>\n",
    );
    problems.extend(dispatcher_problems(deployment(&all), &help));
    assert_reported(
        &problems,
        &[
            "in namespace \"taskbus\", the Jobs go to \"taskbus-agents\"",
            "the backend uses exactly",
            "no RoleBinding gives the Role",
            "mounts no token",
            "--backend is not kubernetes",
            "--job-template \"train\"",
            "--gpus Some(0)",
            "terminationGracePeriodSeconds Some(26) must exceed --grace-seconds Some(25)",
        ],
    );
}

/// `program` when it runs (`--version`/`--help` succeeds), else `None`.
fn tool(program: &Path, probe: &[&str]) -> Option<PathBuf> {
    Command::new(program)
        .args(probe)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| program.to_path_buf())
}

/// kubectl and kubernetes-validate, or why not. `TASKBUS_REQUIRE_KUBE_VALIDATE=1` turns their
/// absence into a failure.
fn validators() -> Option<(PathBuf, PathBuf)> {
    let kubectl = tool(Path::new("kubectl"), &["version", "--client"]);
    let venv = std::env::var_os("TASKBUS_KV_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/taskbus-kv-venv"))
        });
    let validate = venv.and_then(|v| tool(&v.join("bin/kubernetes-validate"), &["--version"]));
    match (kubectl, validate) {
        (Some(k), Some(v)) => Some((k, v)),
        missing => {
            let msg = format!(
                "kubectl or kubernetes-validate missing ({missing:?}): run \
                 services/gpu-dispatcher/validate-manifests.sh to install the validator"
            );
            assert!(
                std::env::var("TASKBUS_REQUIRE_KUBE_VALIDATE").as_deref() != Ok("1"),
                "{msg}"
            );
            eprintln!("skipping schema validation: {msg}");
            None
        }
    }
}

/// What `kubectl kustomize dir` renders, after checking that it holds the objects of the files
/// in `dir` (the same kinds, namespaces and names).
fn render(kubectl: &Path, dir: &Path) -> String {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let ids = |docs: Vec<Value>| -> BTreeSet<String> {
        docs.iter()
            .filter(|d| text(d, "kind") != "Kustomization")
            .map(|d| {
                format!(
                    "{} {}/{}",
                    kind_of(d),
                    text(d, "metadata.namespace"),
                    text(d, "metadata.name")
                )
            })
            .collect()
    };
    let files: Vec<Value> = docs(dir).into_iter().map(|(_, d)| d).collect();
    assert_eq!(ids(parse("rendered", &rendered).unwrap()), ids(files));
    rendered
}

/// Runs kubernetes-validate on `files`, strictly (unknown fields fail), against Kubernetes 1.33.
fn schema_validate(validate: &Path, files: &[PathBuf]) {
    let out = Command::new(validate)
        .args(["--strict", "--quiet", "-k", "1.33.0"])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `kubectl kustomize deploy/gpu-dispatcher` renders is what the files hold, and it and a
/// Job built by the backend (every option on) pass the Kubernetes 1.33 schemas, strictly
/// (unknown fields fail).
#[tokio::test]
async fn rendered_manifests_and_a_built_job_are_schema_valid() {
    let Some((kubectl, validate)) = validators() else {
        return;
    };
    let rendered = render(&kubectl, &dir());

    let mut config = JobsConfig::new("taskbus-agents");
    config.templates.insert(
        "train".into(),
        JobTemplate {
            image: "ghcr.io/example/trainer:latest".into(),
            command: vec!["python".into(), "train.py".into()],
        },
    );
    config.shm_size = Some("16Gi".into());
    config.cpu_request = Some("4".into());
    config.memory_request = Some("32Gi".into());
    config.service_account = Some("trainer".into());
    config.image_pull_secrets = vec!["regcred".into()];
    config.extra_labels.insert("team".into(), "vision".into());
    assert_none(config.problems());
    let (svc, _handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let backend = JobBackend::new(kube::Client::new(svc, "taskbus-agents"), config);
    let launch = taskbus_gpu_dispatcher::launch::Launch {
        task_id: "A_".repeat(64),
        pool: "gpu".into(),
        attempt: 3,
        kind: "train".into(),
        payload: serde_json::json!({"args": ["--epochs", "3"], "data": "s3://bucket/key"}),
        labels: [("owner".to_string(), "ana".to_string())].into(),
        gpus: 2,
        gpu_memory_mib: Some(81920),
        gpu_product: Some("NVIDIA-A100-SXM4-80GB".into()),
        devices: vec![],
        timeout: std::time::Duration::from_secs(3600),
        cancel: Default::default(),
        traceparent: None,
    };
    let job = serde_json::to_string(&backend.job_for(&launch).unwrap()).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let rendered_path = tmp.path().join("gpu-dispatcher.yaml");
    let job_path = tmp.path().join("job.json");
    std::fs::write(&rendered_path, rendered).unwrap();
    std::fs::write(&job_path, job).unwrap();
    schema_validate(&validate, &[rendered_path, job_path]);
}

// The local backend as a DaemonSet: deploy/gpu-dispatcher/local/.

/// The object of `kind` named `name` among `all`.
fn named<'a>(all: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    of_kind(all, kind)
        .into_iter()
        .find(|d| text(d, "metadata.name") == name)
        .unwrap_or_else(|| panic!("{kind} {name}"))
}

/// The shared checks (tests/manifest_checks.rs) know Deployments. A DaemonSet keeps its
/// selector, pod template and labels where a Deployment does and has no `replicas` (read as 1),
/// so they check it as one: `all` with each DaemonSet's kind read as Deployment.
fn as_deployments(all: &[(String, Value)]) -> Vec<(String, Value)> {
    all.iter()
        .cloned()
        .map(|(file, mut d)| {
            if text(&d, "kind") == "DaemonSet" {
                d["kind"] = "Deployment".into();
            }
            (file, d)
        })
        .collect()
}

/// Whether `flag` is given to the container, by argument or by its variable.
fn given(c: &Value, help: &Help, flag: &str) -> bool {
    args_of(c).iter().any(|(f, _)| f == flag)
        || help
            .flags
            .get(flag)
            .and_then(|f| f.env.as_ref())
            .is_some_and(|e| env_of(c).contains_key(e))
}

/// A whole number of GPUs: `8` or `"8"`.
fn count(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The volume mounted at `path` in the container, from the pod's `volumes`.
fn volume_at<'a>(pod: &'a Value, c: &Value, path: &str) -> Option<&'a Value> {
    let mount = seq(c, "volumeMounts")
        .iter()
        .find(|m| text(m, "mountPath") == path)?;
    seq(pod, "volumes")
        .iter()
        .find(|v| text(v, "name") == text(mount, "name"))
}

/// Flags of the Kubernetes backend only, meaningless to the local one.
const KUBERNETES_FLAGS: [&str; 6] = [
    "--job-template",
    "--namespace",
    "--job-ttl-seconds",
    "--shm-size",
    "--service-account",
    "--image-pull-secret",
];

/// What the local backend needs from its DaemonSet among `all`, beyond the shared checks:
/// - the local backend, the GPUs from NVML (no `--gpus`, `--gpu-product`, `--gpu-memory-mib`),
///   no Kubernetes-backend flag, `--exec` values that parse, a pool and its pod label;
/// - an init as PID 1 in front of the dispatcher, and the kill 5 s or more after the grace;
/// - `nvidia.com/gpu` in the limits, the node's GPU count: GPU Feature Discovery's
///   `nvidia.com/gpu.present: "true"` and `nvidia.com/gpu.count` (equal to the limit) in the
///   nodeSelector, the `nvidia.com/gpu` NoSchedule toleration, and NVIDIA_DRIVER_CAPABILITIES
///   with utility (NVML) and compute (CUDA);
/// - its three probes on the port named `http`;
/// - no API token (neither the pod nor its ServiceAccount mounts one);
/// - a writable `/tmp` (emptyDir) and `/dev/shm` in memory (emptyDir, medium Memory);
/// - a rolling update of one node at a time, with no surge (a new pod cannot get GPUs the old
///   one holds).
fn local_problems(all: &[(String, Value)], help: &Help) -> Vec<String> {
    let mut p = Vec::new();
    let ds = named(all, "DaemonSet", LOCAL);
    let pod = get(ds, "spec.template.spec");
    let c = get(pod, "containers.0");
    if kind_of(ds) != "apps/v1/DaemonSet" {
        p.push(format!("{LOCAL} is a {}", kind_of(ds)));
    }

    // Flags.
    let backend = effective(c, help, "--backend");
    if backend.as_deref() != Some("local") {
        p.push(format!("--backend {backend:?}: this is the local backend"));
    }
    for flag in ["--gpus", "--gpu-product", "--gpu-memory-mib"] {
        if given(c, help, flag) {
            p.push(format!(
                "{flag} declares GPUs: the DaemonSet lists the node's GPUs with NVML"
            ));
        }
    }
    for flag in KUBERNETES_FLAGS {
        if given(c, help, flag) {
            p.push(format!("{flag} is a flag of the Kubernetes backend"));
        }
    }
    let execs = arg_values(c, "--exec");
    if execs.is_empty() {
        p.push("no --exec: the dispatcher would run no task kind".into());
    }
    let mut kinds = BTreeSet::new();
    for e in &execs {
        match taskbus_gpu_dispatcher::local::parse_exec(e) {
            Ok((kind, _)) if !kinds.insert(kind.clone()) => {
                p.push(format!("--exec: kind {kind:?} twice"))
            }
            Ok(_) => {}
            Err(err) => p.push(format!("--exec {e:?}: {err}")),
        }
    }
    p.extend(pool_problems(ds, help));
    p.extend(grace_problems(ds, help));
    p.extend(command_problems(c, true));

    // GPUs and GPU nodes.
    let gpus = count(&get(c, "resources.limits")["nvidia.com/gpu"]).filter(|&g| g > 0);
    match gpus {
        None => p.push(
            "no nvidia.com/gpu in the container's limits: the dispatcher would see no GPU".into(),
        ),
        Some(g) => {
            let requested = &get(c, "resources.requests")["nvidia.com/gpu"];
            if !requested.is_null() && count(requested) != Some(g) {
                p.push(format!(
                    "nvidia.com/gpu request {requested:?} differs from the limit {g}"
                ));
            }
        }
    }
    let selector = get(pod, "nodeSelector");
    if selector["nvidia.com/gpu.present"].as_str() != Some("true") {
        p.push("nodeSelector lacks nvidia.com/gpu.present: \"true\" (GPU nodes only)".into());
    }
    let per_node = selector["nvidia.com/gpu.count"].as_str();
    if per_node.and_then(|n| n.parse().ok()) != gpus {
        p.push(format!(
            "nodeSelector nvidia.com/gpu.count {per_node:?} is not the {gpus:?} GPUs the pod \
             asks for: on nodes with fewer it stays Pending, with more the rest sit idle"
        ));
    }
    let tolerates = seq(pod, "tolerations").iter().any(|t| {
        text(t, "key") == "nvidia.com/gpu"
            && text(t, "operator") == "Exists"
            && matches!(text(t, "effect"), "" | "NoSchedule")
    });
    if !tolerates {
        p.push("no toleration of the nvidia.com/gpu taint (Exists, NoSchedule)".into());
    }
    let caps = env_of(c)
        .get("NVIDIA_DRIVER_CAPABILITIES")
        .cloned()
        .unwrap_or_default();
    let caps: Vec<&str> = caps.split(',').map(str::trim).collect();
    let has = |cap: &str| caps.contains(&cap) || caps.contains(&"all");
    if !(has("utility") && has("compute")) {
        p.push(format!(
            "NVIDIA_DRIVER_CAPABILITIES {caps:?} lacks utility (NVML) or compute (CUDA)"
        ));
    }

    // Probes.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        if text(c, &format!("{probe}.httpGet.port")) != "http" {
            p.push(format!("{probe} is not an HTTP GET on the port named http"));
        }
    }

    // No API token.
    if get(pod, "automountServiceAccountToken").as_bool() != Some(false) {
        p.push("the pod mounts an API token, and the local backend calls no API".into());
    }
    let sa = text(pod, "serviceAccountName");
    let quiet = of_kind(all, "ServiceAccount").into_iter().any(|a| {
        text(a, "metadata.name") == sa
            && get(a, "automountServiceAccountToken").as_bool() == Some(false)
    });
    if !quiet {
        p.push(format!(
            "ServiceAccount {sa:?} is not here with automountServiceAccountToken: false"
        ));
    }

    // Writable scratch space and shared memory.
    if volume_at(pod, c, "/tmp").is_none_or(|v| get(v, "emptyDir").is_null()) {
        p.push("no emptyDir at /tmp: the root filesystem is read-only".into());
    }
    if volume_at(pod, c, "/dev/shm").is_none_or(|v| text(v, "emptyDir.medium") != "Memory") {
        p.push("no in-memory emptyDir (medium: Memory) at /dev/shm".into());
    }

    // Rolling update.
    let rolling = get(ds, "spec.updateStrategy.rollingUpdate");
    let surge = get(rolling, "maxSurge");
    if text(ds, "spec.updateStrategy.type") != "RollingUpdate"
        || count(get(rolling, "maxUnavailable")) != Some(1)
        || (!surge.is_null() && count(surge) != Some(0))
    {
        p.push("updateStrategy must be RollingUpdate with maxUnavailable 1 and no maxSurge".into());
    }
    p
}

#[test]
fn local_kustomization_lists_exactly_its_files() {
    assert_none(kustomization_problems(&local_dir(), &[]));
    for (file, d) in docs(&local_dir()) {
        assert!(!text(&d, "apiVersion").is_empty(), "{file}: apiVersion");
        if text(&d, "kind") != "Kustomization" {
            assert_eq!(text(&d, "metadata.name"), LOCAL, "{file}: name");
            assert_eq!(
                text(&d, "metadata.namespace"),
                "taskbus-agents",
                "{file}: namespace"
            );
        }
    }
    // Applied on its own: neither deploy/ nor deploy/gpu-dispatcher/ brings it in.
    for parent in [deploy_dir(), dir()] {
        assert!(
            !resources(&parent)
                .iter()
                .any(|(_, d)| text(d, "metadata.name") == LOCAL),
            "{} applies the local dispatcher",
            parent.display()
        );
    }
}

#[test]
fn local_manifests_agree_with_the_binary() {
    let help = Help::of(BIN);
    let all = docs(&local_dir());
    assert_none(workload_problems(
        &as_deployments(&all),
        NAME,
        &help,
        "taskbus-agents",
    ));
    assert_none(local_problems(&all, &help));
}

#[test]
fn local_network_policy_lets_it_reach_dns_and_nats_only() {
    let mut all = resources(&deploy_dir());
    all.extend(resources(&local_dir()));
    let all = as_deployments(&all);
    assert_none(namespace_problems(&all));
    assert_none(stray_policy_problems(&all));
    let ds = named(&all, "Deployment", LOCAL);
    assert_none(network_problems(&all, ds));
    let net = Network::of(&all);
    for port in [443, 6443, 5432] {
        assert!(
            !net.egress_allows(ds, &Peer::Outside, port, "TCP"),
            "no egress outside the cluster on {port}"
        );
    }
    let coordinator = Peer::pod(
        "taskbus",
        &[("app.kubernetes.io/name", "taskbus-coordinator")],
    );
    let agent = Peer::pod(
        "taskbus-agents",
        &[("app.kubernetes.io/name", "taskbus-agent")],
    );
    assert!(net.ingress_allows(ds, &prometheus(), "http"));
    for other in [coordinator, agent] {
        assert!(
            !net.ingress_allows(ds, &other, "http"),
            "only Prometheus reaches /metrics, not {other}"
        );
    }
}

#[test]
fn checks_report_a_broken_local_daemonset() {
    let help = Help::of(BIN);
    let mut all = docs(&local_dir());
    for (_, d) in all.iter_mut() {
        match text(d, "kind") {
            "ServiceAccount" => d["automountServiceAccountToken"] = true.into(),
            "NetworkPolicy" => {
                // Drop the NATS rule.
                d["spec"]["egress"].as_sequence_mut().unwrap().truncate(1);
            }
            "DaemonSet" => {
                d["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 1.into();
                let pod = &mut d["spec"]["template"]["spec"];
                pod["terminationGracePeriodSeconds"] = 26.into();
                pod["automountServiceAccountToken"] = true.into();
                pod["tolerations"] = Value::Sequence(vec![]);
                pod["nodeSelector"]["nvidia.com/gpu.count"] = "4".into();
                pod["volumes"][1]["emptyDir"] = Value::Mapping(Default::default());
                let c = &mut pod["containers"][0];
                c["command"] = Value::Sequence(vec![NAME.into()]);
                c["readinessProbe"]["httpGet"]["port"] = 9467.into();
                c["env"].as_sequence_mut().unwrap().truncate(2);
                let args = c["args"].as_sequence_mut().unwrap();
                for a in args.iter_mut() {
                    if a.as_str().is_some_and(|s| s.starts_with("--exec=")) {
                        *a = "--exec=train".into();
                    }
                }
                args.push("--backend=kubernetes".into());
                args.push("--gpus=8".into());
                args.push("--job-template=train=ghcr.io/example/trainer:latest".into());
            }
            _ => {}
        }
    }
    let mut problems = local_problems(&all, &help);
    let mut with_deploy = resources(&deploy_dir());
    with_deploy.extend(all.iter().cloned());
    let with_deploy = as_deployments(&with_deploy);
    problems.extend(network_problems(
        &with_deploy,
        named(&with_deploy, "Deployment", LOCAL),
    ));
    assert_reported(
        &problems,
        &[
            "--backend Some(\"kubernetes\")",
            "--gpus declares GPUs",
            "--job-template is a flag of the Kubernetes backend",
            "--exec \"train\": \"train\" is not KIND=PROGRAM",
            "terminationGracePeriodSeconds Some(26) must exceed --grace-seconds Some(25)",
            "command [\"taskbus-gpu-dispatcher\"]",
            "nvidia.com/gpu.count Some(\"4\") is not the Some(8) GPUs",
            "no toleration of the nvidia.com/gpu taint",
            "NVIDIA_DRIVER_CAPABILITIES",
            "readinessProbe is not an HTTP GET on the port named http",
            "the pod mounts an API token",
            "ServiceAccount \"taskbus-gpu-dispatcher-local\" is not here",
            "no in-memory emptyDir (medium: Memory) at /dev/shm",
            "no maxSurge",
            "egress to the NATS",
        ],
    );
    // And a container with no GPU, no GPU nodes and no init at all.
    for (_, d) in all.iter_mut() {
        if text(d, "kind") == "DaemonSet" {
            let pod = &mut d["spec"]["template"]["spec"];
            pod["nodeSelector"] = Value::Null;
            pod["volumes"] = Value::Null;
            let c = &mut pod["containers"][0];
            c["resources"]["limits"]["nvidia.com/gpu"] = 0.into();
            c["command"] = Value::Null;
        }
    }
    assert_reported(
        &local_problems(&all, &help),
        &[
            "no nvidia.com/gpu in the container's limits",
            "nodeSelector lacks nvidia.com/gpu.present",
            "command []",
            "no emptyDir at /tmp",
        ],
    );
}

/// What `kubectl kustomize deploy/gpu-dispatcher/local` renders is what the files hold, and it
/// passes the Kubernetes 1.33 schemas, strictly.
#[test]
fn rendered_local_manifests_are_schema_valid() {
    let Some((kubectl, validate)) = validators() else {
        return;
    };
    let rendered = render(&kubectl, &local_dir());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpu-dispatcher-local.yaml");
    std::fs::write(&path, rendered).unwrap();
    schema_validate(&validate, &[path]);
}
