//! Offline checks of deploy/agents/ against the taskbus-agent binary (its `--help` decides which
//! flags, variables and values the manifest may use), against the pools the coordinator's
//! manifest creates, and against the scalers that resize it (deploy/keda/, the scaler's direct
//! mode). Nothing here talks to a cluster.

#[path = "../../../tests/manifest_checks.rs"]
mod manifest_checks;

use manifest_checks::*;
use serde_yaml::Value;

const BIN: &str = env!("CARGO_BIN_EXE_taskbus-agent");

/// Seconds the pod must have after `--grace-seconds` to cancel, hand back and flush.
const MIN_MARGIN_S: u64 = 5;

/// The pools the coordinator's manifest creates (`--pools` or `TASKBUS_POOLS`).
fn coordinator_pools() -> Vec<String> {
    let all = component("coordinator");
    let c = get(
        of_kind(&all, "Deployment")[0],
        "spec.template.spec.containers.0",
    );
    let arg = args_of(c).into_iter().find(|(f, _)| f == "--pools");
    let pools = arg
        .map(|(_, v)| v)
        .or_else(|| env_of(c).get("TASKBUS_POOLS").cloned())
        .expect("the coordinator's manifest names its pools");
    pools.split(',').map(str::to_string).collect()
}

/// An agent Deployment as the scalers and the pool expect it: named `taskbus-agent-<pool>`,
/// pods labelled with the pool, no fixed replica count, a kill deadline above the drain period,
/// as many tasks at once as the pool's default target per replica.
fn agent_problems(dep: &Value, help: &Help, pools: &[String]) -> Vec<String> {
    let mut p = Vec::new();
    let name = text(dep, "metadata.name");
    let c = get(dep, "spec.template.spec.containers.0");
    let pool = effective(c, help, "--pool").unwrap_or_default();
    if name != format!("taskbus-agent-{pool}") {
        p.push(format!(
            "Deployment {name} serves pool {pool:?}: name it taskbus-agent-{pool}"
        ));
    }
    if get(dep, "spec.template.metadata.labels")["taskbus.dev/pool"].as_str() != Some(&pool) {
        p.push(format!(
            "Deployment {name}: pods lack the label taskbus.dev/pool: {pool}"
        ));
    }
    if !pools.contains(&pool) {
        p.push(format!(
            "Deployment {name}: pool {pool:?} is not created by the coordinator ({pools:?})"
        ));
    }
    if !get(dep, "spec.replicas").is_null() {
        p.push(format!(
            "Deployment {name}: spec.replicas fights the autoscaler"
        ));
    }
    let grace: Option<u64> = effective(c, help, "--grace-seconds").and_then(|g| g.parse().ok());
    let kill = get(dep, "spec.template.spec.terminationGracePeriodSeconds").as_u64();
    match (grace, kill) {
        (Some(g), Some(k)) if k >= g + MIN_MARGIN_S => {}
        _ => p.push(format!(
            "Deployment {name}: terminationGracePeriodSeconds {kill:?} must exceed --grace-seconds {grace:?} by {MIN_MARGIN_S} s or more"
        )),
    }
    let per_replica = taskbus_proto::PoolSettings::default().target_per_replica;
    let concurrency = effective(c, help, "--concurrency").and_then(|n| n.parse::<u32>().ok());
    if concurrency != Some(per_replica) {
        p.push(format!(
            "Deployment {name}: --concurrency {concurrency:?}, the scaler assumes the pool's target_per_replica ({per_replica})"
        ));
    }
    p
}

/// The pool a ScaledObject, ScaledJob or HPA of deploy/keda/ scales for.
fn pool_of(d: &Value) -> &str {
    match text(d, "kind") {
        "HorizontalPodAutoscaler" => text(
            d,
            "spec.metrics.0.external.metric.selector.matchLabels.pool",
        ),
        _ => text(get(d, "spec.triggers.0"), "metadata.pool"),
    }
}

/// What `kubectl apply -k deploy/keda/` applies (`applied`) serves only pools the coordinator
/// creates: the objects for other pools are examples, which KEDA would find no target for and
/// the scaler no pool, so keda/kustomization.yaml leaves them out.
fn example_problems(applied: &[(String, Value)], pools: &[String]) -> Vec<String> {
    applied
        .iter()
        .filter(|(_, d)| {
            matches!(
                text(d, "kind"),
                "ScaledObject" | "ScaledJob" | "HorizontalPodAutoscaler"
            ) && !pools.iter().any(|p| p == pool_of(d))
        })
        .map(|(file, d)| {
            format!(
                "{file}: {} {} is applied by deploy/keda/ but serves pool {:?}, which the coordinator does not create ({pools:?})",
                text(d, "kind"),
                text(d, "metadata.name"),
                pool_of(d)
            )
        })
        .collect()
}

/// Every ScaledObject (and HPA) for a pool the coordinator creates scales one of `agents` in
/// the namespace KEDA's objects go to, and every agent Deployment is scaled by one.
fn scaling_problems(
    agents: &[(String, Value)],
    keda: &[(String, Value)],
    keda_namespace: &str,
    pools: &[String],
) -> Vec<String> {
    let mut p = Vec::new();
    let ours: Vec<(&str, &str)> = of_kind(agents, "Deployment")
        .iter()
        .map(|d| (text(d, "metadata.name"), text(d, "metadata.namespace")))
        .collect();
    let mut targeted = Vec::new();
    for (file, d) in keda {
        let (target, namespace) = match text(d, "kind") {
            "ScaledObject" => {
                let kind = text(d, "spec.scaleTargetRef.kind");
                if !kind.is_empty() && kind != "Deployment" {
                    continue;
                }
                // The kustomization puts it in keda_namespace unless the object names another.
                let ns = Some(text(d, "metadata.namespace")).filter(|n| !n.is_empty());
                (
                    text(d, "spec.scaleTargetRef.name"),
                    ns.unwrap_or(keda_namespace),
                )
            }
            "HorizontalPodAutoscaler" => (
                text(d, "spec.scaleTargetRef.name"),
                text(d, "metadata.namespace"),
            ),
            _ => continue,
        };
        let pool = pool_of(d);
        if !pools.iter().any(|q| q == pool) {
            continue; // an example for a pool this tree does not set up (e.g. `cpu`)
        }
        if ours.contains(&(target, namespace)) {
            targeted.push(target);
        } else {
            p.push(format!(
                "{file}: {} {} scales Deployment {target} in {namespace}, which deploy/agents/ does not have ({ours:?})",
                text(d, "kind"),
                text(d, "metadata.name")
            ));
        }
    }
    for (name, _) in &ours {
        if !targeted.contains(name) {
            p.push(format!(
                "Deployment {name}: no ScaledObject in deploy/keda/ scales it"
            ));
        }
    }
    p
}

fn keda_namespace() -> String {
    let k = parse(
        "kustomization.yaml",
        &std::fs::read_to_string(deploy_dir().join("keda/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    s(&k[0], "namespace").to_string()
}

#[test]
fn kustomization_lists_exactly_its_files() {
    assert_none(kustomization_problems(&deploy_dir().join("agents"), &[]));
    for (file, d) in component("agents") {
        assert!(!text(&d, "apiVersion").is_empty(), "{file}: apiVersion");
    }
}

#[test]
fn manifests_agree_with_the_binary_the_pools_and_the_scalers() {
    let help = Help::of(BIN);
    let all = component("agents");
    let ns = keda_namespace();
    let deps = of_kind(&all, "Deployment");
    assert!(!deps.is_empty(), "an agent Deployment");
    for dep in &deps {
        let one: Vec<(String, Value)> = all
            .iter()
            .filter(|(_, d)| text(d, "kind") != "Deployment" || *d == **dep)
            .cloned()
            .collect();
        assert_none(workload_problems(&one, "taskbus-agent", &help, &ns));
        assert_none(agent_problems(dep, &help, &coordinator_pools()));
    }
    let mut keda = component("keda");
    assert_none(scaling_problems(&all, &keda, &ns, &coordinator_pools()));
    // What `kubectl apply -k deploy/keda/` applies scales the agents deploy/ creates, and only
    // them: scaledobject-cpu.yaml and scaledjob-gpu.yaml are examples it leaves out.
    let applied = resources(&deploy_dir().join("keda"));
    assert_none(example_problems(&applied, &coordinator_pools()));
    assert_none(scaling_problems(&all, &applied, &ns, &coordinator_pools()));
    // The pool `default` has its ScaledObject and its Deployment.
    keda.retain(|(f, _)| f == "scaledobject-default.yaml");
    assert_eq!(
        s(&keda[0].1, "spec.scaleTargetRef.name"),
        "taskbus-agent-default"
    );
    assert!(deps
        .iter()
        .any(|d| text(d, "metadata.name") == "taskbus-agent-default"));

    // Direct mode looks for the same names in the same namespace.
    let direct = component("scaler/direct");
    let patch = &direct
        .iter()
        .find(|(f, _)| f == "direct-mode.yaml")
        .unwrap()
        .1;
    let env = env_of(get(patch, "spec.template.spec.containers.0"));
    assert_eq!(env["TASKBUS_NAMESPACE"], ns);
    for dep in &deps {
        let pool = &get(dep, "spec.template.metadata.labels")["taskbus.dev/pool"];
        assert_eq!(
            format!(
                "{}{}",
                env["TASKBUS_DEPLOYMENT_PREFIX"],
                pool.as_str().unwrap()
            ),
            text(dep, "metadata.name")
        );
    }
}

#[test]
fn network_policy_lets_agents_reach_dns_and_nats_only_and_prometheus_in() {
    // deploy/agents/networkpolicy.yaml opens no egress for handlers on purpose (its comment):
    // the echo handler needs none, and a pool's own policy grants what its handlers call.
    let all = resources(&deploy_dir());
    let net = Network::of(&all);
    let ns = keda_namespace();
    let coordinator = Peer::pod(
        "taskbus",
        &[("app.kubernetes.io/name", "taskbus-coordinator")],
    );
    let deps: Vec<&Value> = of_kind(&all, "Deployment")
        .into_iter()
        .filter(|d| text(d, "metadata.namespace") == ns)
        .collect();
    assert!(!deps.is_empty(), "deploy/ applies agents in {ns}");
    for dep in deps {
        let name = text(dep, "metadata.name");
        assert!(
            !net.egress_allows(dep, &Peer::Outside, 443, "TCP"),
            "{name}: HTTPS out of the cluster"
        );
        assert!(
            !net.egress_allows(dep, &coordinator, 9464, "TCP"),
            "{name}: the coordinator's pods"
        );
        // In: Prometheus scrapes the metrics port, nobody else gets in.
        assert!(
            net.ingress_allows(dep, &prometheus(), "http"),
            "{name}: Prometheus reaches /metrics"
        );
        assert!(
            !net.ingress_allows(dep, &coordinator, "http"),
            "{name}: only Prometheus reaches /metrics"
        );
        // A Deployment copied for another pool falls under the same policies.
        let mut copy = dep.clone();
        copy["metadata"]["name"] = "taskbus-agent-gpu".into();
        copy["spec"]["template"]["metadata"]["labels"]["taskbus.dev/pool"] = "gpu".into();
        assert_none(network_problems(&all, &copy));
    }
}

#[test]
fn checks_report_a_broken_agent() {
    let help = Help::of(BIN);
    let mut all = component("agents");
    let dep = &mut all
        .iter_mut()
        .find(|(_, d)| text(d, "kind") == "Deployment")
        .unwrap()
        .1;
    dep["metadata"]["name"] = "agents".into();
    dep["spec"]["replicas"] = 3.into();
    dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 27.into();
    let c = &mut dep["spec"]["template"]["spec"]["containers"][0];
    c["ports"] = parse("", "[{name: http, containerPort: 9464}]").unwrap()[0].clone();
    for a in c["args"].as_sequence_mut().unwrap() {
        match a.as_str().unwrap() {
            "--handler=echo" => *a = "--handler=ech".into(),
            "--concurrency=10" => *a = "--concurrency=4".into(),
            "--pool=default" => *a = "--pool=gpu".into(),
            _ => {}
        }
    }
    let dep = of_kind(&all, "Deployment")[0];
    let mut problems = deployment_problems(dep, "taskbus-agent", &help);
    problems.extend(agent_problems(dep, &help, &coordinator_pools()));
    problems.extend(scaling_problems(
        &all,
        &component("keda"),
        &keda_namespace(),
        &coordinator_pools(),
    ));
    // Every file of deploy/keda/ applied, the examples included.
    problems.extend(example_problems(&component("keda"), &coordinator_pools()));
    assert_reported(
        &problems,
        &[
            "--handler \"ech\" is not one of",
            "container port `http` is Some(9464), the binary's default --http-listen port is Some(9467)",
            "name it taskbus-agent-gpu",
            "pods lack the label taskbus.dev/pool: gpu",
            "pool \"gpu\" is not created by the coordinator",
            "spec.replicas fights the autoscaler",
            "terminationGracePeriodSeconds Some(27) must exceed --grace-seconds Some(25)",
            "--concurrency Some(4)",
            "scales Deployment taskbus-agent-default in taskbus-agents, which deploy/agents/ does not have",
            "Deployment agents: no ScaledObject",
            "scaledobject-cpu.yaml: ScaledObject taskbus-agent-cpu is applied by deploy/keda/ but serves pool \"cpu\"",
            "scaledjob-gpu.yaml: ScaledJob taskbus-agent-gpu is applied by deploy/keda/ but serves pool \"gpu\"",
        ],
    );
}
