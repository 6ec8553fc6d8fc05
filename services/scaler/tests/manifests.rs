//! Offline checks of deploy/keda/ and deploy/scaler/: every document parses, has the fields its
//! kind needs, and agrees with the scaler itself (trigger metadata accepted by the gRPC service,
//! metric names served by the external metrics API, ports matching between Deployment, Service,
//! APIService and KEDA's scalerAddress).

#[path = "../../../tests/manifest_checks.rs"]
mod manifest_checks;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use manifest_checks::{
    assert_none, assert_reported, availability_problems, deployment_problems, docs, get, kind_of,
    kustomization_problems, network_problems, of_kind, one_of_kind, prometheus, resources, s,
    spread_problems, stray_policy_problems, Help, Network, Peer,
};
use serde_yaml::Value;
use taskbus_scaler::extapi;

const BIN: &str = env!("CARGO_BIN_EXE_taskbus-scaler");

fn root() -> PathBuf {
    manifest_checks::deploy_dir()
}

/// Each file is listed in its directory's kustomization (except the ones documented as
/// alternatives), and every listed file exists.
fn check_kustomization(dir: &Path, not_listed: &[&str]) {
    assert_none(kustomization_problems(dir, not_listed));
}

#[test]
fn every_document_has_identity() {
    for dir in [
        "keda",
        "scaler",
        "scaler/base",
        "scaler/external-metrics",
        "scaler/direct",
    ] {
        let all = docs(&root().join(dir));
        assert!(!all.is_empty(), "{dir} has manifests");
        assert!(
            root().join(dir).join("kustomization.yaml").is_file(),
            "{dir} is a kustomization"
        );
        for (file, d) in &all {
            if s(d, "kind") == "Kustomization" {
                continue;
            }
            assert!(!s(d, "apiVersion").is_empty(), "{file}");
            let name = s(d, "metadata.name");
            assert!(!name.is_empty() && name.len() <= 253, "{file}: {name}");
        }
    }
    // The examples for pools deploy/ does not set up stay out (the agents' test checks why).
    check_kustomization(
        &root().join("keda"),
        &[
            "hpa-external.yaml",
            "scaledobject-cpu.yaml",
            "scaledjob-gpu.yaml",
        ],
    );
    check_kustomization(&root().join("scaler"), &["direct", "external-metrics"]);
    check_kustomization(&root().join("scaler/base"), &[]);
    check_kustomization(&root().join("scaler/external-metrics"), &["https.yaml"]);
    check_kustomization(&root().join("scaler/direct"), &["direct-mode.yaml"]);

    // The direct-mode patch turns it on through the binary's variables.
    let direct = &docs(&root().join("scaler/direct"))
        .into_iter()
        .find(|(f, _)| f == "direct-mode.yaml")
        .unwrap()
        .1;
    let env: HashMap<&str, &str> = get(direct, "spec.template.spec.containers.0.env")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (s(e, "name"), s(e, "value")))
        .collect();
    assert_eq!(env["TASKBUS_DIRECT"], "true");
    assert!(taskbus_proto::ids::is_valid_pool(env["TASKBUS_NAMESPACE"]));

    // The HTTPS patch targets the scaler's Deployment and container, with the variables the
    // binary reads.
    let base = docs(&root().join("scaler/base"));
    let dep = &base
        .iter()
        .find(|(_, d)| s(d, "kind") == "Deployment")
        .unwrap()
        .1;
    let patch = &docs(&root().join("scaler/external-metrics"))
        .into_iter()
        .find(|(f, _)| f == "https.yaml")
        .unwrap()
        .1;
    assert_eq!(s(patch, "metadata.name"), s(dep, "metadata.name"));
    assert_eq!(s(patch, "metadata.namespace"), s(dep, "metadata.namespace"));
    let pc = get(patch, "spec.template.spec.containers.0");
    assert_eq!(
        s(pc, "name"),
        s(get(dep, "spec.template.spec.containers.0"), "name")
    );
    let env: Vec<&str> = get(pc, "env")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| s(e, "name"))
        .collect();
    assert_eq!(env, ["TASKBUS_HTTP_TLS_CERT", "TASKBUS_HTTP_TLS_KEY"]);
    let mount = s(get(pc, "volumeMounts.0"), "name");
    assert!(get(patch, "spec.template.spec.volumes")
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| s(v, "name") == mount));
}

struct ScalerPorts {
    grpc: u16,
    service_ports: HashMap<String, (u16, String)>,
    service_name: String,
    container_ports: HashMap<String, u16>,
}

fn scaler_ports() -> ScalerPorts {
    let all = docs(&root().join("scaler/base"));
    let dep = &all
        .iter()
        .find(|(_, d)| kind_of(d) == "apps/v1/Deployment")
        .expect("a scaler Deployment")
        .1;
    let svc = &all
        .iter()
        .find(|(_, d)| kind_of(d) == "v1/Service")
        .expect("a scaler Service")
        .1;
    let c = get(dep, "spec.template.spec.containers.0");
    let args: Vec<&str> = get(c, "args")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let port_of = |flag: &str| -> u16 {
        let a = args
            .iter()
            .find(|a| a.starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} in args"));
        a.rsplit(':').next().unwrap().parse().unwrap()
    };
    let container_ports: HashMap<String, u16> = get(c, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                s(p, "name").to_string(),
                get(p, "containerPort").as_u64().unwrap() as u16,
            )
        })
        .collect();
    assert_eq!(container_ports["grpc"], port_of("--grpc-listen="));
    assert_eq!(container_ports["http"], port_of("--http-listen="));
    // Selector matches the pod labels.
    let sel = get(dep, "spec.selector.matchLabels").as_mapping().unwrap();
    let labels = get(dep, "spec.template.metadata.labels")
        .as_mapping()
        .unwrap();
    for (k, v) in sel {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Deployment selector matches its pods"
        );
        assert_eq!(
            get(svc, "spec.selector").as_mapping().unwrap().get(k),
            Some(v),
            "Service selects the pods"
        );
    }
    let service_ports = get(svc, "spec.ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            let target = s(p, "targetPort").to_string();
            assert!(
                container_ports.contains_key(&target),
                "Service targetPort {target} names a container port"
            );
            (
                s(p, "name").to_string(),
                (get(p, "port").as_u64().unwrap() as u16, target),
            )
        })
        .collect();
    ScalerPorts {
        grpc: port_of("--grpc-listen="),
        service_ports,
        service_name: s(svc, "metadata.name").to_string(),
        container_ports,
    }
}

#[test]
fn keda_triggers_are_accepted_by_the_scaler() {
    let ports = scaler_ports();
    let mut seen = BTreeMap::new();
    for (file, d) in docs(&root().join("keda")) {
        let kind = kind_of(&d);
        let triggers = match kind.as_str() {
            "keda.sh/v1alpha1/ScaledObject" => {
                let target = s(&d, "spec.scaleTargetRef.name");
                let (min, max) = (
                    get(&d, "spec.minReplicaCount").as_u64().unwrap(),
                    get(&d, "spec.maxReplicaCount").as_u64().unwrap(),
                );
                assert!(min <= max, "{file}");
                get(&d, "spec.triggers")
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|t| (t.clone(), Some(target.to_string())))
                    .collect::<Vec<_>>()
            }
            "keda.sh/v1alpha1/ScaledJob" => {
                let job = get(&d, "spec.jobTargetRef");
                assert_eq!(
                    get(job, "backoffLimit").as_u64(),
                    Some(0),
                    "{file}: retries belong to the coordinator"
                );
                let pod = get(job, "template.spec");
                assert_eq!(s(pod, "restartPolicy"), "Never", "{file}");
                let c = get(pod, "containers.0");
                assert!(
                    !c["resources"]["limits"]["nvidia.com/gpu"].is_null(),
                    "{file}: GPU limit"
                );
                assert!(
                    get(pod, "tolerations")
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|t| s(t, "key") == "nvidia.com/gpu"),
                    "{file}"
                );
                get(&d, "spec.triggers")
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|t| (t.clone(), None))
                    .collect()
            }
            "autoscaling/v2/HorizontalPodAutoscaler" => {
                assert!(
                    get(&d, "spec.minReplicas").as_u64().unwrap() >= 1,
                    "{file}: an HPA cannot go below 1"
                );
                for m in get(&d, "spec.metrics").as_sequence().unwrap() {
                    assert_eq!(s(m, "type"), "External", "{file}");
                    let name = s(m, "external.metric.name");
                    assert!(
                        extapi::METRICS.contains(&name),
                        "{file}: {name} is served by the scaler"
                    );
                    let sel = get(m, "external.metric.selector.matchLabels")
                        .as_mapping()
                        .unwrap();
                    assert_eq!(sel.len(), 1, "{file}: metrics carry only the pool label");
                    let pool = sel.get("pool").and_then(|p| p.as_str()).unwrap();
                    assert_eq!(
                        extapi::parse_selector(&format!("pool={pool}")),
                        Ok(Some(vec![pool.to_string()]))
                    );
                    assert_eq!(s(m, "external.target.type"), "AverageValue", "{file}");
                }
                continue;
            }
            "kustomize.config.k8s.io/v1beta1/Kustomization" => continue,
            other => panic!("{file}: unexpected kind {other}"),
        };
        assert!(!triggers.is_empty(), "{file}");
        for (t, target) in triggers {
            let ty = s(&t, "type");
            assert!(
                ty == "external-push" || ty == "external",
                "{file}: trigger type {ty}"
            );
            let meta: HashMap<String, String> = get(&t, "metadata")
                .as_mapping()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let (pool, _) = taskbus_scaler::grpc::parse_metadata(&meta).unwrap_or_else(|e| {
                panic!("{file}: the scaler refuses this trigger: {}", e.message())
            });
            let addr = &meta["scalerAddress"];
            let (host, port) = addr.rsplit_once(':').unwrap();
            assert!(
                host.starts_with(&format!("{}.", ports.service_name)),
                "{file}: {addr} names the scaler Service"
            );
            let port: u16 = port.parse().unwrap();
            let (svc_port, target_name) = &ports.service_ports["grpc"];
            assert_eq!(
                port, *svc_port,
                "{file}: scalerAddress port is the Service's grpc port"
            );
            assert_eq!(ports.container_ports[target_name], ports.grpc);
            if let Some(target) = target {
                assert_eq!(
                    target,
                    format!("taskbus-agent-{pool}"),
                    "{file}: Deployment of pool {pool}"
                );
            }
            seen.insert(pool, file.clone());
        }
    }
    assert!(seen.len() >= 3, "an example per pool: {seen:?}");
}

#[test]
fn apiservice_and_rbac_point_at_the_scaler() {
    let ports = scaler_ports();
    let mut all = docs(&root().join("scaler/base"));
    all.extend(docs(&root().join("scaler/external-metrics")));
    all.extend(docs(&root().join("scaler/direct")));
    let api = &all
        .iter()
        .find(|(_, d)| s(d, "kind") == "APIService")
        .expect("an APIService")
        .1;
    assert_eq!(
        s(api, "metadata.name"),
        format!("{}.{}", extapi::VERSION, extapi::GROUP)
    );
    assert_eq!(s(api, "spec.group"), extapi::GROUP);
    assert_eq!(s(api, "spec.version"), extapi::VERSION);
    assert_eq!(s(api, "spec.service.name"), ports.service_name);
    let port = get(api, "spec.service.port").as_u64().unwrap() as u16;
    let (_, (p, target)) = ports
        .service_ports
        .iter()
        .find(|(_, (p, _))| *p == port)
        .expect("APIService port is a Service port");
    assert_eq!(*p, 443);
    assert_eq!(target, "http", "served by the HTTP(S) listener");

    let rules: Vec<&Value> = all
        .iter()
        .filter(|(_, d)| matches!(s(d, "kind"), "Role" | "ClusterRole"))
        .flat_map(|(_, d)| get(d, "rules").as_sequence().unwrap().iter())
        .collect();
    let grants = |res: &str, verb: &str| {
        rules.iter().any(|r| {
            let has = |k: &str, x: &str| {
                get(r, k)
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|v| v.as_str() == Some(x) || v.as_str() == Some("*"))
            };
            has("resources", res) && has("verbs", verb)
        })
    };
    assert!(
        grants("deployments/scale", "get") && grants("deployments/scale", "patch"),
        "direct mode RBAC"
    );
    assert!(grants("*", "get"), "HPA may read external metrics");
    // Namespaced objects say where they go (the kustomization sets no namespace, since the RBAC
    // spans taskbus, taskbus-agents and kube-system); service-account subjects name theirs.
    let k: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("scaler/base/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    assert!(
        get(&k, "namespace").is_null(),
        "a kustomize namespace would move the RBAC objects"
    );
    for (file, d) in &all {
        let cluster_scoped = matches!(
            s(d, "kind"),
            "ClusterRole" | "ClusterRoleBinding" | "APIService" | "Kustomization"
        );
        if !cluster_scoped {
            assert!(
                get(d, "metadata.namespace").as_str().is_some(),
                "{file}: {} has no namespace",
                s(d, "metadata.name")
            );
        }
        if let Some(subjects) = get(d, "subjects").as_sequence() {
            for sub in subjects {
                if s(sub, "kind") == "ServiceAccount" {
                    assert!(!s(sub, "namespace").is_empty(), "{file}");
                }
            }
        }
    }
    let scaler_ns = all
        .iter()
        .find(|(_, d)| s(d, "kind") == "Deployment")
        .map(|(_, d)| s(d, "metadata.namespace").to_string())
        .unwrap();
    assert_eq!(
        s(api, "spec.service.namespace"),
        scaler_ns,
        "APIService points at the scaler's namespace"
    );

    // Every binding names an existing role kind and a subject.
    for (file, d) in &all {
        if matches!(s(d, "kind"), "RoleBinding" | "ClusterRoleBinding") {
            assert!(
                matches!(s(d, "roleRef.kind"), "Role" | "ClusterRole"),
                "{file}"
            );
            assert!(
                !get(d, "subjects").as_sequence().unwrap().is_empty(),
                "{file}"
            );
        }
    }
}

/// Everything `kubectl apply -k deploy/` applies, with the scaler of `variant` (`scaler`,
/// `scaler/direct` or `scaler/external-metrics`) in place of deploy/scaler/.
fn deployed_with(variant: &str) -> Vec<(String, Value)> {
    let scaler = root().join("scaler");
    let mut all = resources(&root());
    all.retain(|(file, _)| !Path::new(file).starts_with(&scaler));
    all.extend(resources(&root().join(variant)));
    all
}

#[test]
fn network_policies_and_spread_of_each_variant() {
    let keda = Peer::pod("keda", &[("app", "keda-operator")]);
    for variant in ["scaler", "scaler/direct", "scaler/external-metrics"] {
        let all = deployed_with(variant);
        assert_none(stray_policy_problems(&all));
        let scalers: Vec<&Value> = of_kind(&all, "Deployment")
            .into_iter()
            .filter(|d| s(d, "metadata.name") == "taskbus-scaler")
            .collect();
        let [dep] = scalers[..] else {
            panic!("{variant}: one scaler Deployment, not {}", scalers.len());
        };
        assert_none(network_problems(&all, dep));
        assert_none(spread_problems(dep));
        let net = Network::of(&all);
        assert!(
            net.ingress_allows(dep, &keda, "grpc"),
            "{variant}: the KEDA operator reaches the gRPC port"
        );
        assert!(
            !net.ingress_allows(dep, &prometheus(), "grpc"),
            "{variant}: only KEDA reaches the gRPC port"
        );
        // The API server is no pod: it may reach the HTTP(S) listener from anywhere where that
        // serves the external metrics API, and the scaler may reach it only in direct mode.
        assert_eq!(
            net.ingress_allows(dep, &Peer::Outside, "http"),
            variant == "scaler/external-metrics",
            "{variant}: the HTTP port open to the API server"
        );
        for port in [443, 6443] {
            assert_eq!(
                net.egress_allows(dep, &Peer::Outside, port, "TCP"),
                variant == "scaler/direct",
                "{variant}: egress to the Kubernetes API on {port}"
            );
        }
    }
    // Two replicas need the spread constraint.
    let all = docs(&root().join("scaler/base"));
    let mut dep = of_kind(&all, "Deployment")[0].clone();
    dep["spec"]["template"]["spec"]["topologySpreadConstraints"] = Value::Null;
    assert_reported(
        &spread_problems(&dep),
        &["2 replicas and no topologySpreadConstraint over kubernetes.io/hostname"],
    );
}

/// The scaler's Deployment passes the checks every taskbus Deployment does (flags, variables and
/// values its `--help` knows, image, probes, security context), and a node drain leaves one of
/// its two replicas running.
#[test]
fn deployment_agrees_with_the_binary_and_keeps_a_replica_through_drains() {
    let all = docs(&root().join("scaler/base"));
    let dep = one_of_kind(&all, "Deployment");
    assert_none(deployment_problems(dep, "taskbus-scaler", &Help::of(BIN)));
    assert_none(availability_problems(
        dep,
        one_of_kind(&all, "PodDisruptionBudget"),
    ));
    let mut broken = one_of_kind(&all, "PodDisruptionBudget").clone();
    broken["spec"]["minAvailable"] = Value::from(2);
    assert!(
        !availability_problems(dep, &broken).is_empty(),
        "a PDB that blocks every drain is reported"
    );
}
