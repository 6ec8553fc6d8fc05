//! Offline checks of deploy/ledger/ against the taskbus-ledger binary (its `--help` decides
//! which flags, variables, values and HTTP port the manifests may use), and against the
//! coordinator's manifest where the two must agree. Nothing here talks to a cluster.

#[path = "../../../tests/manifest_checks.rs"]
mod manifest_checks;

use manifest_checks::*;
use serde_yaml::Value;

const BIN: &str = env!("CARGO_BIN_EXE_taskbus-ledger");

/// Both services create and update the same streams (`--stream-replicas`), so the two
/// Deployments must set the same value, explicitly, or they would undo each other's update.
fn stream_replicas_problems(ledger: &Value, coordinator: &Value) -> Vec<String> {
    let replicas = |dep: &Value| {
        env_of(get(dep, "spec.template.spec.containers.0"))
            .get("TASKBUS_STREAM_REPLICAS")
            .cloned()
    };
    let (l, c) = (replicas(ledger), replicas(coordinator));
    if l.is_none() || l != c {
        vec![format!(
            "TASKBUS_STREAM_REPLICAS: ledger {l:?}, coordinator {c:?}; set both, to one value"
        )]
    } else {
        Vec::new()
    }
}

#[test]
fn kustomization_lists_exactly_its_files() {
    assert_none(kustomization_problems(&deploy_dir().join("ledger"), &[]));
    for (file, d) in component("ledger") {
        assert!(!text(&d, "apiVersion").is_empty(), "{file}: apiVersion");
    }
}

#[test]
fn manifests_agree_with_the_binary_and_the_coordinator() {
    let help = Help::of(BIN);
    let all = component("ledger");
    assert_none(workload_problems(&all, "taskbus-ledger", &help, "taskbus"));
    let dep = one_of_kind(&all, "Deployment");
    assert_none(availability_problems(
        dep,
        one_of_kind(&all, "PodDisruptionBudget"),
    ));
    assert_none(database_secret_problems(dep));
    let coordinator = component("coordinator");
    let coordinator = one_of_kind(&coordinator, "Deployment");
    assert_none(stream_replicas_problems(dep, coordinator));
    // One database for both schemas: the same Secret.
    let secret = |d: &Value| {
        seq(get(d, "spec.template.spec.containers.0"), "env")
            .iter()
            .find(|e| text(e, "name") == "TASKBUS_DATABASE_URL")
            .map(|e| get(e, "valueFrom").clone())
    };
    assert_eq!(secret(dep), secret(coordinator));
}

#[test]
fn checks_report_a_broken_ledger() {
    let help = Help::of(BIN);
    let mut all = component("ledger");
    let coordinator = component("coordinator");
    let dep = &mut all
        .iter_mut()
        .find(|(_, d)| text(d, "kind") == "Deployment")
        .unwrap()
        .1;
    let c = &mut dep["spec"]["template"]["spec"]["containers"][0];
    // The coordinator's port, a database URL in the clear, another stream replica count, a
    // flag of the coordinator's that the ledger does not have.
    c["ports"][0]["containerPort"] = 9464.into();
    c["args"]
        .as_sequence_mut()
        .unwrap()
        .push("--pools=default".into());
    for e in c["env"].as_sequence_mut().unwrap() {
        match text(e, "name") {
            "TASKBUS_DATABASE_URL" => {
                *e = parse("", "{name: TASKBUS_DATABASE_URL, value: postgres://x}").unwrap()[0]
                    .clone()
            }
            "TASKBUS_STREAM_REPLICAS" => e["value"] = "3".into(),
            _ => {}
        }
    }
    dep["spec"]["replicas"] = 1.into();
    // Spread counted over every taskbus pod, not the ledger's.
    dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"] =
        parse("", "{matchLabels: {app.kubernetes.io/part-of: taskbus}}").unwrap()[0].clone();
    // The policy names the port by number, 9466, which the container above no longer declares.
    let np = &mut all
        .iter_mut()
        .find(|(_, d)| text(d, "kind") == "NetworkPolicy")
        .unwrap()
        .1;
    np["spec"]["ingress"][0]["ports"][0]["port"] = 9466.into();
    let dep = one_of_kind(&all, "Deployment");
    let mut problems = deployment_problems(dep, "taskbus-ledger", &help);
    problems.extend(database_secret_problems(dep));
    problems.extend(stream_replicas_problems(
        dep,
        one_of_kind(&coordinator, "Deployment"),
    ));
    problems.extend(availability_problems(
        dep,
        one_of_kind(&all, "PodDisruptionBudget"),
    ));
    problems.extend(policy_problems(one_of_kind(&all, "NetworkPolicy"), dep));
    assert_reported(
        &problems,
        &[
            "container port `http` is Some(9464), the binary's default --http-listen port is Some(9466)",
            "--pools is not an option of taskbus-ledger",
            "secretKeyRef taskbus-postgres/url",
            "TASKBUS_STREAM_REPLICAS: ledger Some(\"3\")",
            "1 replica(s)",
            "labelSelector does not select exactly its pods",
            "NetworkPolicy taskbus-ledger: ingress port 9466 is not a container port",
        ],
    );
}
