//! Offline checks of deploy/gpu-dispatcher/ against the taskbus-gpu-dispatcher binary (its
//! `--help` decides which flags, variables and values the manifest may use) and against the
//! Kubernetes backend (its Role grants exactly `jobs::RBAC_RULES`, in the namespace the Jobs go
//! to). Rendered with `kubectl kustomize` and schema-validated with the PyPI package
//! `kubernetes-validate` (strict) where those are installed, together with a Job the backend
//! builds; services/gpu-dispatcher/validate-manifests.sh installs the validator. Nothing here
//! talks to a cluster.

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

fn dir() -> PathBuf {
    deploy_dir().join("gpu-dispatcher")
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

/// The dispatcher's own checks: the Kubernetes backend, a pool name, Job templates that parse.
fn dispatcher_problems(dep: &Value, help: &Help) -> Vec<String> {
    let mut p = Vec::new();
    let c = get(dep, "spec.template.spec.containers.0");
    if effective(c, help, "--backend").as_deref() != Some("kubernetes") {
        p.push("--backend is not kubernetes".into());
    }
    // `NAME` or `NAME=QUOTA`.
    let pool = effective(c, help, "--pool").unwrap_or_default();
    let pool = pool.split('=').next().unwrap_or_default().to_string();
    if !taskbus_proto::ids::is_valid_pool(&pool) {
        p.push(format!("--pool {pool:?} is not a pool name"));
    }
    if get(dep, "spec.template.metadata.labels")["taskbus.dev/pool"].as_str() != Some(&pool) {
        p.push(format!("pods lack the label taskbus.dev/pool: {pool}"));
    }
    let gpus = effective(c, help, "--gpus").and_then(|g| g.parse::<u32>().ok());
    if gpus.is_none_or(|g| g == 0) {
        p.push(format!(
            "--gpus {gpus:?}: the Kubernetes backend needs the most GPUs its Jobs may hold"
        ));
    }
    let grace: Option<u64> = effective(c, help, "--grace-seconds").and_then(|g| g.parse().ok());
    let kill = get(dep, "spec.template.spec.terminationGracePeriodSeconds")
        .as_u64()
        .or(Some(30));
    if !matches!((grace, kill), (Some(g), Some(k)) if k >= g + 5) {
        p.push(format!(
            "terminationGracePeriodSeconds {kill:?} must exceed --grace-seconds {grace:?} by 5 s or more"
        ));
    }
    let templates: Vec<String> = args_of(c)
        .into_iter()
        .filter(|(f, _)| f == "--job-template")
        .map(|(_, v)| v)
        .collect();
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
    assert_none(kustomization_problems(&dir(), &[]));
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
        &["keda", "gpu-dispatcher"],
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

/// What `kubectl kustomize deploy/gpu-dispatcher` renders is what the files hold, and it and a
/// Job built by the backend (every option on) pass the Kubernetes 1.33 schemas, strictly
/// (unknown fields fail).
#[tokio::test]
async fn rendered_manifests_and_a_built_job_are_schema_valid() {
    let Some((kubectl, validate)) = validators() else {
        return;
    };
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
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
    let files: Vec<Value> = docs(&dir()).into_iter().map(|(_, d)| d).collect();
    assert_eq!(ids(parse("rendered", &rendered).unwrap()), ids(files));

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
    };
    let job = serde_json::to_string(&backend.job_for(&launch).unwrap()).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let rendered_path = tmp.path().join("gpu-dispatcher.yaml");
    let job_path = tmp.path().join("job.json");
    std::fs::write(&rendered_path, rendered).unwrap();
    std::fs::write(&job_path, job).unwrap();
    let out = Command::new(&validate)
        .args(["--strict", "--quiet", "-k", "1.33.0"])
        .arg(&rendered_path)
        .arg(&job_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
