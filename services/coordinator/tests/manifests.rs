//! Offline checks of deploy/coordinator/ (and of the top-level deploy/kustomization.yaml)
//! against the taskbus-coordinator binary: its `--help` decides which flags, variables, values
//! and HTTP port the manifests may use. Nothing here talks to a cluster.

#[path = "../../../tests/manifest_checks.rs"]
mod manifest_checks;

use manifest_checks::*;
use serde_yaml::Value;

const BIN: &str = env!("CARGO_BIN_EXE_taskbus-coordinator");

fn dir() -> std::path::PathBuf {
    deploy_dir().join("coordinator")
}

#[test]
fn kustomization_lists_exactly_its_files() {
    assert_none(kustomization_problems(&dir(), &[]));
    for (file, d) in docs(&dir()) {
        assert!(!text(&d, "apiVersion").is_empty(), "{file}: apiVersion");
        if text(&d, "kind") != "Kustomization" {
            assert!(!text(&d, "metadata.name").is_empty(), "{file}: name");
        }
    }
}

#[test]
fn manifests_agree_with_the_binary() {
    let help = Help::of(BIN);
    let all = docs(&dir());
    assert_none(workload_problems(
        &all,
        "taskbus-coordinator",
        &help,
        "taskbus",
    ));
    let dep = one_of_kind(&all, "Deployment");
    assert_none(availability_problems(
        dep,
        one_of_kind(&all, "PodDisruptionBudget"),
    ));
    assert_none(database_secret_problems(dep));
    assert!(
        !of_kind(&all, "Service").is_empty(),
        "a Service for the metrics port"
    );
    // The pools it creates are pool names (the agents' test reads this list too).
    let c = get(dep, "spec.template.spec.containers.0");
    let pools = effective(c, &help, "--pools").expect("--pools");
    for pool in pools.split(',') {
        assert!(taskbus_proto::ids::is_valid_pool(pool), "pool {pool:?}");
    }
}

#[test]
fn top_level_kustomization_applies_everything_once() {
    // keda/ and monitoring/ need CRDs first (KEDA's, prometheus-operator's) and are applied on
    // their own, and gpu-dispatcher/ serves a pool deploy/ does not create (see the
    // kustomization's comment).
    assert_none(kustomization_problems(
        &deploy_dir(),
        &["keda", "gpu-dispatcher", "monitoring"],
    ));
    let all = resources(&deploy_dir());
    assert_none(namespace_problems(&all));
    for name in [
        "taskbus-scaler",
        "taskbus-coordinator",
        "taskbus-ledger",
        "taskbus-agent-default",
    ] {
        assert!(
            all.iter()
                .any(|(_, d)| text(d, "kind") == "Deployment" && text(d, "metadata.name") == name),
            "deploy/ applies {name}"
        );
    }
}

#[test]
fn network_policies_cover_every_deployment() {
    let all = resources(&deploy_dir());
    assert_none(stray_policy_problems(&all));
    let deps = of_kind(&all, "Deployment");
    assert_eq!(deps.len(), 4, "the four Deployments of deploy/");
    for dep in deps {
        assert_none(network_problems(&all, dep));
    }
}

/// The NetworkPolicy `name` of `namespace` among `all`.
fn policy_mut<'a>(all: &'a mut [(String, Value)], namespace: &str, name: &str) -> &'a mut Value {
    let found = all.iter_mut().find(|(_, d)| {
        text(d, "kind") == "NetworkPolicy"
            && text(d, "metadata.namespace") == namespace
            && text(d, "metadata.name") == name
    });
    &mut found
        .unwrap_or_else(|| panic!("NetworkPolicy {namespace}/{name}"))
        .1
}

#[test]
fn network_checks_report_broken_policies() {
    let mut all = resources(&deploy_dir());
    // The agents' default deny narrowed to one pool that has no Deployment, and their own
    // policy gone.
    policy_mut(&mut all, "taskbus-agents", "taskbus-default-deny-ingress")["spec"]["podSelector"] =
        parse("", "{matchLabels: {taskbus.dev/pool: gpu}}").unwrap()[0].clone();
    all.retain(|(_, d)| {
        !(text(d, "kind") == "NetworkPolicy" && text(d, "metadata.name") == "taskbus-agent")
    });
    // The coordinator: DNS over UDP only, ingress to a port it does not have.
    let coordinator = policy_mut(&mut all, "taskbus", "taskbus-coordinator");
    coordinator["spec"]["egress"][0]["ports"]
        .as_sequence_mut()
        .unwrap()
        .pop();
    coordinator["spec"]["ingress"][0]["ports"][0]["port"] = "metrics".into();
    // The ledger: another NATS release, no PostgreSQL.
    let ledger = policy_mut(&mut all, "taskbus", "taskbus-ledger");
    ledger["spec"]["egress"][1]["to"][0]["podSelector"]["matchLabels"]
        ["app.kubernetes.io/instance"] = "nats-other".into();
    ledger["spec"]["egress"].as_sequence_mut().unwrap().pop();
    // The scaler: egress left open.
    policy_mut(&mut all, "taskbus", "taskbus-scaler")["spec"]["policyTypes"] =
        parse("", "[Ingress]").unwrap()[0].clone();
    // A policy that locks out NATS.
    all.push((
        "extra.yaml".into(),
        parse(
            "",
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, \
             metadata: {name: nats-lockdown, namespace: taskbus}, \
             spec: {podSelector: {matchLabels: {app.kubernetes.io/name: nats}}, policyTypes: [Ingress]}}",
        )
        .unwrap()[0]
            .clone(),
    ));
    let mut problems = stray_policy_problems(&all);
    for dep in of_kind(&all, "Deployment") {
        problems.extend(network_problems(&all, dep));
    }
    assert_reported(
        &problems,
        &[
            "NetworkPolicy taskbus-default-deny-ingress: selects no Deployment's pods",
            "NetworkPolicy nats-lockdown: selects the NATS server pods",
            "Deployment taskbus-agent-default: no default-deny ingress NetworkPolicy of namespace \"taskbus-agents\"",
            "Deployment taskbus-agent-default: no NetworkPolicy of its own",
            "Deployment taskbus-coordinator: egress to the cluster DNS on TCP 53 is not allowed",
            "NetworkPolicy taskbus-coordinator: ingress port metrics is not a container port",
            "Deployment taskbus-coordinator: Prometheus may not scrape",
            "Deployment taskbus-ledger: egress to the NATS pods",
            "Deployment taskbus-ledger: egress to PostgreSQL",
            "Deployment taskbus-scaler: no NetworkPolicy limits its egress",
        ],
    );
}

const BROKEN: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
  namespace: taskbus
  labels: {app.kubernetes.io/name: broken, app.kubernetes.io/part-of: taskbus}
spec:
  replicas: 1
  selector:
    matchLabels: {app.kubernetes.io/name: other}
  template:
    metadata:
      labels: {app.kubernetes.io/name: broken, app.kubernetes.io/part-of: taskbus}
    spec:
      serviceAccountName: nobody
      securityContext: {runAsNonRoot: true, runAsUser: 0, seccompProfile: {type: RuntimeDefault}}
      topologySpreadConstraints:
        - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway,
           labelSelector: {matchLabels: {app.kubernetes.io/name: other}}}
      containers:
        - name: coordinator
          image: ghcr.io/taskbus/taskbus-coordinator:latest
          args:
            - --nats-url=$(NATS_URL)
            - --no-such-flag=1
            - --log-format=yaml
            - --http-listen=0.0.0.0:8080
          env:
            - {name: TASKBUS_LOG_FORMAT, value: json}
            - {name: TASKBUS_DATABASE_URL, value: "postgres://user:secret@db/taskbus"}
            - {name: TASKBUS_NO_SUCH_VARIABLE, value: "1"}
          ports:
            - {name: http, containerPort: 8080}
          readinessProbe:
            httpGet: {path: /readyz, port: metrics}
          livenessProbe:
            httpGet: {path: /metrics, port: http}
          resources: {requests: {cpu: 100m}, limits: {memory: 64Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: false
            capabilities: {drop: [ALL]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: taskbus}
spec:
  selector: {app.kubernetes.io/name: someone-else}
  ports: [{name: metrics, port: 9464, targetPort: metrics}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: broken, namespace: default}
spec:
  minAvailable: 1
  selector: {matchLabels: {app.kubernetes.io/name: broken}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: taskbus}
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: someone-else}}
  ingress:
    - from: [{namespaceSelector: {}}]
      ports: [{port: metrics}]
    - from: [{namespaceSelector: {}}]
"#;

#[test]
fn checks_report_broken_manifests() {
    let help = Help::of(BIN);
    let all: Vec<(String, Value)> = parse("broken.yaml", BROKEN)
        .unwrap()
        .into_iter()
        .map(|d| ("broken.yaml".to_string(), d))
        .collect();
    let mut problems = workload_problems(&all, "taskbus-coordinator", &help, "taskbus");
    problems.extend(availability_problems(&all[0].1, &all[2].1));
    problems.extend(database_secret_problems(&all[0].1));
    assert_reported(
        &problems,
        &[
            "uses $(NATS_URL), not in the container's env",
            "--no-such-flag is not an option",
            "--log-format \"yaml\" is not one of",
            "TASKBUS_NO_SUCH_VARIABLE is not a variable",
            "the binary's default --http-listen port",
            "readinessProbe port",
            "livenessProbe is not an HTTP GET of /healthz",
            "does not select its own pods",
            "runAsUser",
            "readOnlyRootFilesystem",
            "Service broken: selector",
            "targetPort",
            "serviceAccountName \"nobody\"",
            "1 replica(s)",
            "maxUnavailable 0",
            "PodDisruptionBudget of broken: minAvailable",
            "is not in namespace taskbus",
            "secretKeyRef taskbus-postgres/url",
            "a topologySpreadConstraint's labelSelector does not select exactly its pods",
            "NetworkPolicy broken: podSelector does not select the pods of Deployment broken",
            "NetworkPolicy broken: no policyTypes",
            "NetworkPolicy broken: ingress port metrics is not a container port",
            "NetworkPolicy broken: an ingress rule without ports",
        ],
    );

    // The real Deployment without its database variable: the required option is missing.
    let mut real = docs(&dir());
    let dep = real
        .iter_mut()
        .find(|(_, d)| text(d, "kind") == "Deployment")
        .unwrap();
    let env = dep.1["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence_mut()
        .unwrap();
    env.retain(|e| text(e, "name") != "TASKBUS_DATABASE_URL");
    let problems = deployment_problems(&dep.1, "taskbus-coordinator", &help);
    assert_reported(&problems, &["--database-url is required"]);

    // Namespaces: one declared twice, one used but not declared, an object twice.
    let set = parse(
        "ns.yaml",
        "{apiVersion: v1, kind: Namespace, metadata: {name: a}}\n---\n\
         {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n---\n\
         {apiVersion: v1, kind: ServiceAccount, metadata: {name: x, namespace: b}}\n---\n\
         {apiVersion: v1, kind: ServiceAccount, metadata: {name: x, namespace: b}}\n",
    )
    .unwrap();
    let set: Vec<_> = set
        .into_iter()
        .map(|d| ("ns.yaml".to_string(), d))
        .collect();
    assert_reported(
        &namespace_problems(&set),
        &[
            "Namespace a declared twice",
            "namespace \"b\"",
            "v1/ServiceAccount x twice",
        ],
    );

    // A kustomization that lists a missing file and leaves one out.
    let tmp = std::env::temp_dir().join(format!("taskbus-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(
        tmp.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [gone.yaml]\n",
    )
    .unwrap();
    std::fs::write(tmp.join("extra.yaml"), "kind: ConfigMap\n").unwrap();
    let problems = kustomization_problems(&tmp, &[]);
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_reported(
        &problems,
        &["lists missing gone.yaml", "does not list extra.yaml"],
    );
}
