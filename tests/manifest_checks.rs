//! Offline checks of the Kubernetes manifests in `deploy/` against the binaries they run.
//!
//! Not a target of the `taskbus-tests` package: each service's `tests/manifests.rs` includes this
//! file with `#[path = "../../../tests/manifest_checks.rs"] mod manifest_checks;`, so that every
//! test can run its own package's binary (`env!("CARGO_BIN_EXE_…")`) and read its `--help`.
//! The `*_problems` functions return what is wrong, one sentence each, and never panic on a
//! malformed document, so a test can feed them broken manifests and see them complain.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

/// `deploy/`, found from the package directory when the test runs (cargo and nextest set
/// `CARGO_MANIFEST_DIR`; a compile-time `env!` would point at whichever worktree last built the
/// shared target directory).
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR")
            .expect("run the tests through cargo or cargo-nextest, which set CARGO_MANIFEST_DIR"),
    )
    .join("../../deploy")
}

/// The non-empty documents of one YAML text.
pub fn parse(name: &str, text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(d).map_err(|e| format!("{name}: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Every document of every `.yaml` file directly in `dir`, with its file name, in name order.
/// Panics on a file that does not parse.
pub fn docs(dir: &Path) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        for v in parse(&f.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}")) {
            out.push((name.clone(), v));
        }
    }
    out
}

/// The documents of `deploy/<name>/`.
pub fn component(name: &str) -> Vec<(String, Value)> {
    docs(&deploy_dir().join(name))
}

/// Every object of `kind` among `all`.
pub fn of_kind<'a>(all: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|(_, d)| text(d, "kind") == kind)
        .map(|(_, d)| d)
        .collect()
}

/// The first object of `kind` among `all`; panics when there is none.
pub fn one_of_kind<'a>(all: &'a [(String, Value)], kind: &str) -> &'a Value {
    of_kind(all, kind)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("a {kind}"))
}

/// The value at a dotted path (`spec.template.spec.containers.0`); `Null` where absent.
pub fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |cur, key| match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        })
}

/// The string at `path`; panics when it is not one.
pub fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v:?}"))
}

/// The string at `path`, or "" (for checks that must not panic).
pub fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path).as_str().unwrap_or("")
}

pub fn seq<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    get(v, path).as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// `apiVersion/kind`.
pub fn kind_of(v: &Value) -> String {
    format!("{}/{}", text(v, "apiVersion"), text(v, "kind"))
}

/// Fails with every problem, one per line.
pub fn assert_none(problems: Vec<String>) {
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Asserts that `problems` has one containing each of `expected`.
pub fn assert_reported(problems: &[String], expected: &[&str]) {
    for e in expected {
        assert!(
            problems.iter().any(|p| p.contains(e)),
            "no problem mentions {e:?}; got:\n{}",
            problems.join("\n")
        );
    }
}

/// What is wrong with `dir/kustomization.yaml`: a resource or patch it lists that does not
/// exist, or a YAML file or kustomization directory in `dir` that it does not list. `not_listed`
/// names the entries that must stay out (documented alternatives, patches).
pub fn kustomization_problems(dir: &Path, not_listed: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let k = match std::fs::read_to_string(dir.join("kustomization.yaml")) {
        Ok(t) => match parse("kustomization.yaml", &t) {
            Ok(mut d) if d.len() == 1 => d.remove(0),
            Ok(_) => return vec![format!("{}: one document expected", dir.display())],
            Err(e) => return vec![e],
        },
        Err(e) => return vec![format!("{}: no kustomization.yaml: {e}", dir.display())],
    };
    if text(&k, "kind") != "Kustomization" {
        problems.push(format!("{}: kind is not Kustomization", dir.display()));
    }
    let listed: Vec<&str> = seq(&k, "resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if listed.is_empty() {
        problems.push(format!("{}: lists no resources", dir.display()));
    }
    for r in &listed {
        let p = dir.join(r);
        if !p.is_file() && !p.join("kustomization.yaml").is_file() {
            problems.push(format!("{} lists missing {r}", dir.display()));
        }
    }
    for p in seq(&k, "patches") {
        if !dir.join(text(p, "path")).is_file() {
            problems.push(format!("{}: patch {p:?} is not a file", dir.display()));
        }
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let candidate = (name.ends_with(".yaml") && name != "kustomization.yaml")
            || path.join("kustomization.yaml").is_file();
        if candidate && listed.contains(&name.as_str()) == not_listed.contains(&name.as_str()) {
            problems.push(if listed.contains(&name.as_str()) {
                format!("{} lists {name}, which must stay out", dir.display())
            } else {
                format!("{} does not list {name}", dir.display())
            });
        }
    }
    problems
}

/// One option of a binary's `--help`.
#[derive(Debug, Default, Clone)]
pub struct Flag {
    pub env: Option<String>,
    pub default: Option<String>,
    /// "Possible values" of an enum option.
    pub values: Vec<String>,
}

/// What a binary's long `--help` says about its options.
#[derive(Debug, Default)]
pub struct Help {
    /// `--name` → option.
    pub flags: BTreeMap<String, Flag>,
    /// Options the `Usage:` line requires.
    pub required: Vec<String>,
}

impl Help {
    /// Runs `bin --help` with no `TASKBUS_*` variables in its environment (clap shows a set
    /// variable's value in the help, and a set variable would satisfy a required option).
    pub fn of(bin: &str) -> Help {
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--help");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKBUS_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("run {bin}: {e}"));
        assert!(out.status.success(), "{bin} --help: {:?}", out.status);
        let help = Help::parse(&String::from_utf8(out.stdout).unwrap());
        assert!(
            help.flags.contains_key("--help") && help.flags.len() > 2,
            "{bin} --help lists its options: {help:?}"
        );
        help
    }

    /// Parses clap's long help: option headers are indented by at most 6 spaces (descriptions
    /// by 10), `[env: X=]` and `[default: Y]` belong to the option above them, and so do
    /// `- value: …` lines (possible values).
    pub fn parse(help: &str) -> Help {
        let mut out = Help::default();
        let mut current: Option<String> = None;
        for line in help.lines() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if trimmed.is_empty() {
                continue;
            }
            if let Some(usage) = line.strip_prefix("Usage:") {
                out.required = usage
                    .split_whitespace()
                    .filter(|t| t.starts_with("--"))
                    .map(str::to_string)
                    .collect();
                continue;
            }
            let header = indent <= 6
                && (trimmed.starts_with("--")
                    || (trimmed.starts_with('-') && trimmed.get(2..5) == Some(", -")));
            if header {
                let name = trimmed
                    .split([' ', ','])
                    .find(|t| t.starts_with("--"))
                    .unwrap_or_default()
                    .to_string();
                out.flags.insert(name.clone(), Flag::default());
                current = Some(name);
                continue;
            }
            if indent <= 6 {
                current = None;
                continue;
            }
            let Some(flag) = current.as_ref().and_then(|c| out.flags.get_mut(c)) else {
                continue;
            };
            if let Some(rest) = trimmed.strip_prefix("[env: ") {
                flag.env = Some(rest.split(['=', ']']).next().unwrap_or_default().into());
            } else if let Some(rest) = trimmed.strip_prefix("[default: ") {
                flag.default = Some(rest.trim_end_matches(']').into());
            } else if let Some(rest) = trimmed.strip_prefix("- ") {
                if let Some((value, _)) = rest.split_once(':') {
                    flag.values.push(value.trim().into());
                }
            }
        }
        out
    }

    /// The option whose environment variable is `env`.
    pub fn flag_of_env(&self, env: &str) -> Option<(&str, &Flag)> {
        self.flags
            .iter()
            .find(|(_, f)| f.env.as_deref() == Some(env))
            .map(|(n, f)| (n.as_str(), f))
    }
}

/// The port of a `host:port` listen address.
pub fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// A container's `env` as name → literal value ("" for `valueFrom`).
pub fn env_of(c: &Value) -> BTreeMap<String, String> {
    seq(c, "env")
        .iter()
        .map(|e| (text(e, "name").to_string(), text(e, "value").to_string()))
        .collect()
}

/// `--flag=value` / `--flag value` arguments as flag → value ("" for a switch).
pub fn args_of(c: &Value) -> Vec<(String, String)> {
    let args: Vec<&str> = seq(c, "args")
        .iter()
        .map(|a| a.as_str().unwrap_or(""))
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if let Some((f, v)) = args[i].split_once('=').filter(|(f, _)| f.starts_with("--")) {
            out.push((f.to_string(), v.to_string()));
        } else if args[i].starts_with("--") {
            let value = args.get(i + 1).filter(|v| !v.starts_with("--"));
            out.push((args[i].to_string(), value.unwrap_or(&"").to_string()));
            i += usize::from(value.is_some());
        }
        i += 1;
    }
    out
}

/// Every value a repeatable flag is given in a container's arguments, in order.
pub fn arg_values(c: &Value, flag: &str) -> Vec<String> {
    args_of(c)
        .into_iter()
        .filter(|(f, _)| f == flag)
        .map(|(_, v)| v)
        .collect()
}

/// The value an option gets in a container: its argument, else its variable, else its default.
pub fn effective(c: &Value, help: &Help, flag: &str) -> Option<String> {
    if let Some((_, v)) = args_of(c).into_iter().find(|(f, _)| f == flag) {
        return Some(v);
    }
    let f = help.flags.get(flag)?;
    if let Some(v) = f.env.as_ref().and_then(|e| env_of(c).get(e).cloned()) {
        return Some(v);
    }
    f.default.clone()
}

/// `$(NAME)` references in a string.
fn references(s: &str) -> Vec<&str> {
    s.split("$(")
        .skip(1)
        .filter_map(|r| r.split_once(')').map(|(name, _)| name))
        .collect()
}

fn is_subset(small: &Value, big: &Value) -> bool {
    match (small.as_mapping(), big.as_mapping()) {
        (Some(small), Some(big)) => {
            !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
        }
        _ => false,
    }
}

/// Replicas on different nodes where the scheduler can: a Deployment of more than one replica
/// has a topologySpreadConstraint over `kubernetes.io/hostname` with maxSkew 1 and
/// `ScheduleAnyway` (a one-node cluster still runs them all), and every constraint counts
/// exactly this Deployment's pods: its labelSelector selects them and holds the Deployment's
/// own selector, so the pods of other Deployments do not count towards the skew.
pub fn spread_problems(dep: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let name = text(dep, "metadata.name");
    let constraints = seq(dep, "spec.template.spec.topologySpreadConstraints");
    for t in constraints {
        let sel = get(t, "labelSelector");
        if get(sel, "matchLabels").is_null()
            || !selector_matches(sel, get(dep, "spec.template.metadata.labels"))
            || !is_subset(
                get(dep, "spec.selector.matchLabels"),
                get(sel, "matchLabels"),
            )
        {
            p.push(format!(
                "Deployment {name}: a topologySpreadConstraint's labelSelector does not select exactly its pods"
            ));
        }
    }
    let replicas = get(dep, "spec.replicas").as_u64().unwrap_or(1);
    let spread = constraints.iter().any(|t| {
        text(t, "topologyKey") == "kubernetes.io/hostname"
            && get(t, "maxSkew").as_u64() == Some(1)
            && text(t, "whenUnsatisfiable") == "ScheduleAnyway"
    });
    if replicas > 1 && !spread {
        p.push(format!(
            "Deployment {name}: {replicas} replicas and no topologySpreadConstraint over kubernetes.io/hostname (maxSkew 1, ScheduleAnyway)"
        ));
    }
    p
}

/// Checks of a Deployment running `bin` (its only container) against the binary's `--help`:
/// image, flags and their values, `$(VAR)` references, required options, environment
/// variables, the HTTP port and probes, labels and selector, the non-root security context.
pub fn deployment_problems(dep: &Value, bin: &str, help: &Help) -> Vec<String> {
    let mut p = Vec::new();
    let name = text(dep, "metadata.name");
    let at = |what: String| format!("Deployment {name}: {what}");
    if kind_of(dep) != "apps/v1/Deployment" {
        p.push(at(format!("is a {}", kind_of(dep))));
    }
    let pod = get(dep, "spec.template.spec");
    let containers = seq(pod, "containers");
    if containers.len() != 1 {
        p.push(at(format!("{} containers, one expected", containers.len())));
    }
    let Some(c) = containers.first() else {
        return p;
    };
    let image = format!("ghcr.io/taskbus/{bin}:latest");
    if text(c, "image") != image {
        p.push(at(format!(
            "image {:?}, expected {image}",
            text(c, "image")
        )));
    }
    let env = env_of(c);
    let args = args_of(c);

    // Options and their values.
    let check_value = |p: &mut Vec<String>, flag: &str, value: &str, what: &str| {
        let known = help.flags.get(flag).map(|f| &f.values);
        if let Some(values) = known.filter(|v| !v.is_empty()) {
            if !value.contains("$(") && !values.iter().any(|v| v == value) {
                p.push(at(format!("{what} {value:?} is not one of {values:?}")));
            }
        }
    };
    for a in seq(c, "args").iter().map(|a| a.as_str().unwrap_or("")) {
        for r in references(a) {
            if !env.contains_key(r) {
                p.push(at(format!(
                    "argument {a:?} uses $({r}), not in the container's env"
                )));
            }
        }
    }
    for (flag, value) in &args {
        if help.flags.contains_key(flag) {
            check_value(&mut p, flag, value, flag);
        } else {
            p.push(at(format!("{flag} is not an option of {bin} (--help)")));
        }
    }
    for (var, value) in &env {
        match help.flag_of_env(var) {
            Some((flag, _)) => check_value(&mut p, flag, value, var),
            None if var.starts_with("TASKBUS_") => {
                p.push(at(format!("{var} is not a variable {bin} reads (--help)")))
            }
            None => {}
        }
    }
    for flag in &help.required {
        let by_arg = args.iter().any(|(f, _)| f == flag);
        let by_env = help
            .flags
            .get(flag)
            .and_then(|f| f.env.as_ref())
            .is_some_and(|e| env.contains_key(e));
        if !by_arg && !by_env {
            p.push(at(format!(
                "{flag} is required and neither an argument nor its variable gives it"
            )));
        }
    }
    if env.get("TASKBUS_LOG_FORMAT").map(String::as_str) != Some("json") {
        p.push(at("TASKBUS_LOG_FORMAT is not json".into()));
    }

    // Ports and probes.
    let ports: BTreeMap<&str, u64> = seq(c, "ports")
        .iter()
        .map(|q| {
            (
                text(q, "name"),
                get(q, "containerPort").as_u64().unwrap_or(0),
            )
        })
        .collect();
    let probes = ["startupProbe", "readinessProbe", "livenessProbe"];
    for probe in probes {
        let port = get(c, &format!("{probe}.httpGet.port"));
        let named = port.as_str().is_some_and(|n| ports.contains_key(n));
        let numbered = port
            .as_u64()
            .is_some_and(|n| ports.values().any(|&q| q == n));
        if !port.is_null() && !named && !numbered {
            p.push(at(format!(
                "{probe} port {port:?} is not a declared container port"
            )));
        }
    }
    match help.flags.get("--http-listen") {
        Some(flag) => {
            let default = flag.default.as_deref().and_then(port_of);
            let used = effective(c, help, "--http-listen")
                .as_deref()
                .and_then(port_of);
            let declared = ports.get("http").copied();
            if declared.is_none() || declared != default.map(u64::from) {
                p.push(at(format!(
                    "container port `http` is {declared:?}, the binary's default --http-listen port is {default:?}"
                )));
            }
            if used.map(u64::from) != declared {
                p.push(at(format!(
                    "listens on {used:?}, container port `http` is {declared:?}"
                )));
            }
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                if text(c, &format!("{probe}.httpGet.path")) != path {
                    p.push(at(format!("{probe} is not an HTTP GET of {path}")));
                }
            }
        }
        None => {
            if !ports.is_empty() || probes.iter().any(|q| !get(c, q).is_null()) {
                p.push(at(format!(
                    "{bin} serves no HTTP, yet ports or probes are declared"
                )));
            }
        }
    }

    // Labels and selector.
    let labels = get(dep, "spec.template.metadata.labels");
    if !is_subset(get(dep, "spec.selector.matchLabels"), labels) {
        p.push(at(
            "spec.selector.matchLabels does not select its own pods".into()
        ));
    }
    for (where_, v) in [("metadata", get(dep, "metadata.labels")), ("pod", labels)] {
        // Label keys hold dots, so index them directly rather than through `get`.
        if v["app.kubernetes.io/part-of"].as_str() != Some("taskbus")
            || v["app.kubernetes.io/name"].as_str().is_none()
        {
            p.push(at(format!(
                "{where_} labels lack app.kubernetes.io/name or part-of: taskbus"
            )));
        }
    }
    p.extend(spread_problems(dep));

    // Security context (the restricted Pod Security Standard, runAsUser like the scaler's).
    let want: [(&Value, &str, Value); 6] = [
        (pod, "securityContext.runAsNonRoot", true.into()),
        (pod, "securityContext.runAsUser", 65532.into()),
        (
            pod,
            "securityContext.seccompProfile.type",
            "RuntimeDefault".into(),
        ),
        (c, "securityContext.allowPrivilegeEscalation", false.into()),
        (c, "securityContext.readOnlyRootFilesystem", true.into()),
        (c, "securityContext.capabilities.drop.0", "ALL".into()),
    ];
    for (v, path, expected) in want {
        if get(v, path) != &expected {
            p.push(at(format!("{path} is not {expected:?}")));
        }
    }
    if get(c, "resources.requests").is_null() || get(c, "resources.limits.memory").is_null() {
        p.push(at("needs resource requests and a memory limit".into()));
    }
    p
}

/// A Service in front of `dep`: same namespace, selects its pods, every targetPort a container
/// port (by name or number).
pub fn service_problems(svc: &Value, dep: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let name = text(svc, "metadata.name");
    if text(svc, "metadata.namespace") != text(dep, "metadata.namespace") {
        p.push(format!("Service {name}: not in the Deployment's namespace"));
    }
    if !is_subset(
        get(svc, "spec.selector"),
        get(dep, "spec.template.metadata.labels"),
    ) {
        p.push(format!(
            "Service {name}: selector does not match the Deployment's pod labels"
        ));
    }
    let c = get(dep, "spec.template.spec.containers.0");
    let ports = seq(c, "ports");
    if seq(svc, "spec.ports").is_empty() {
        p.push(format!("Service {name}: no ports"));
    }
    for sp in seq(svc, "spec.ports") {
        let target = get(sp, "targetPort");
        let ok = ports.iter().any(|cp| match target.as_str() {
            Some(t) => text(cp, "name") == t,
            None => get(cp, "containerPort") == target,
        });
        if !ok {
            p.push(format!(
                "Service {name}: targetPort {target:?} is not a container port"
            ));
        }
    }
    p
}

/// A service meant to stay up: at least 2 replicas, a rolling update that never goes below the
/// wanted count, a PodDisruptionBudget with minAvailable 1 over its pods that still lets a drain
/// evict one.
pub fn availability_problems(dep: &Value, pdb: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let name = text(dep, "metadata.name");
    let replicas = get(dep, "spec.replicas").as_u64().unwrap_or(1);
    if replicas < 2 {
        p.push(format!(
            "Deployment {name}: {replicas} replica(s), 2 or more expected"
        ));
    }
    if text(dep, "spec.strategy.type") != "RollingUpdate"
        || get(dep, "spec.strategy.rollingUpdate.maxUnavailable").as_u64() != Some(0)
    {
        p.push(format!(
            "Deployment {name}: rolling update must have maxUnavailable 0"
        ));
    }
    if kind_of(pdb) != "policy/v1/PodDisruptionBudget" {
        p.push(format!(
            "{}: not a policy/v1 PodDisruptionBudget",
            text(pdb, "metadata.name")
        ));
    }
    let min = get(pdb, "spec.minAvailable").as_u64();
    if min != Some(1) || min >= Some(replicas) {
        p.push(format!(
            "PodDisruptionBudget of {name}: minAvailable {min:?}, 1 (below {replicas} replicas) expected"
        ));
    }
    if !is_subset(
        get(pdb, "spec.selector.matchLabels"),
        get(dep, "spec.template.metadata.labels"),
    ) {
        p.push(format!(
            "PodDisruptionBudget of {name}: selector does not match the pods"
        ));
    }
    if text(pdb, "metadata.namespace") != text(dep, "metadata.namespace") {
        p.push(format!(
            "PodDisruptionBudget of {name}: not in the Deployment's namespace"
        ));
    }
    p
}

/// The database URL comes from the Secret `taskbus-postgres`, key `url`, and never as a literal.
pub fn database_secret_problems(dep: &Value) -> Vec<String> {
    let c = get(dep, "spec.template.spec.containers.0");
    let var = seq(c, "env")
        .iter()
        .find(|e| text(e, "name") == "TASKBUS_DATABASE_URL");
    let from = var.map(|e| get(e, "valueFrom.secretKeyRef"));
    let mut p = Vec::new();
    if from.map(|r| (text(r, "name"), text(r, "key"))) != Some(("taskbus-postgres", "url")) {
        p.push(format!(
            "Deployment {}: TASKBUS_DATABASE_URL must come from secretKeyRef taskbus-postgres/url",
            text(dep, "metadata.name")
        ));
    }
    if args_of(c)
        .iter()
        .any(|(f, v)| f == "--database-url" && v != "$(TASKBUS_DATABASE_URL)")
    {
        p.push("a literal --database-url argument".into());
    }
    p
}

/// The objects of one service directory checked together: exactly one Deployment, checked
/// against the binary; each Service and NetworkPolicy against it; its ServiceAccount present;
/// every object in `namespace`.
pub fn workload_problems(
    all: &[(String, Value)],
    bin: &str,
    help: &Help,
    namespace: &str,
) -> Vec<String> {
    let of = |kind: &str| of_kind(all, kind);
    let deps = of("Deployment");
    let [dep] = deps.as_slice() else {
        return vec![format!("{} Deployments, one expected", deps.len())];
    };
    let mut p = deployment_problems(dep, bin, help);
    for svc in of("Service") {
        p.extend(service_problems(svc, dep));
    }
    for np in of("NetworkPolicy") {
        p.extend(policy_problems(np, dep));
    }
    let sa = text(dep, "spec.template.spec.serviceAccountName");
    if !of("ServiceAccount")
        .iter()
        .any(|a| text(a, "metadata.name") == sa && !sa.is_empty())
    {
        p.push(format!(
            "serviceAccountName {sa:?} is not a ServiceAccount here"
        ));
    }
    for (file, d) in all {
        if text(d, "kind") != "Kustomization" && text(d, "metadata.namespace") != namespace {
            p.push(format!(
                "{file}: {} is not in namespace {namespace}",
                kind_of(d)
            ));
        }
    }
    p
}

/// Every document a kustomization directory brings in through `resources` (files and
/// directories, recursively; patches and kustomize transformations are not applied).
pub fn resources(dir: &Path) -> Vec<(String, Value)> {
    let k = parse(
        "",
        &std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for r in seq(&k[0], "resources").iter().filter_map(Value::as_str) {
        let p = dir.join(r);
        if p.is_dir() {
            out.extend(resources(&p));
        } else {
            let t = std::fs::read_to_string(&p).unwrap();
            let name = p.display().to_string();
            out.extend(
                parse(&name, &t)
                    .unwrap()
                    .into_iter()
                    .map(|v| (name.clone(), v)),
            );
        }
    }
    out
}

/// What is wrong with a set of objects applied together: a Namespace declared twice, a
/// namespaced object whose namespace is not among them, or two objects with one identity.
pub fn namespace_problems(all: &[(String, Value)]) -> Vec<String> {
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "APIService",
    ];
    let mut declared = BTreeSet::new();
    let mut p = Vec::new();
    for (file, d) in all {
        if text(d, "kind") == "Namespace" && !declared.insert(text(d, "metadata.name")) {
            p.push(format!(
                "{file}: Namespace {} declared twice",
                text(d, "metadata.name")
            ));
        }
    }
    let mut ids = BTreeSet::new();
    for (file, d) in all {
        let ns = text(d, "metadata.namespace");
        if !cluster_scoped.contains(&text(d, "kind")) && !declared.contains(ns) {
            p.push(format!(
                "{file}: namespace {ns:?} of {} is not declared",
                kind_of(d)
            ));
        }
        if !ids.insert((kind_of(d), ns, text(d, "metadata.name"))) {
            p.push(format!(
                "{file}: {} {} twice",
                kind_of(d),
                text(d, "metadata.name")
            ));
        }
    }
    p
}

/// Whether a label selector (`matchLabels` and `matchExpressions`) selects `labels`; an empty or
/// absent selector selects everything, as a NetworkPolicy's podSelector does.
pub fn selector_matches(sel: &Value, labels: &Value) -> bool {
    let label = |k: &Value| labels.as_mapping().and_then(|m| m.get(k));
    let by_labels = get(sel, "matchLabels")
        .as_mapping()
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == Some(v)));
    let by_expressions = seq(sel, "matchExpressions").iter().all(|e| {
        let value = label(&e["key"]);
        let listed = value.is_some_and(|v| seq(e, "values").contains(v));
        match text(e, "operator") {
            "In" => listed,
            "NotIn" => !listed,
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// One end of a connection, as a NetworkPolicy sees it.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A pod of `namespace` with these labels.
    Pod { namespace: String, labels: Value },
    /// An address no pod or namespace selector matches: a managed database, the API server.
    Outside,
}

impl Peer {
    pub fn pod(namespace: &str, labels: &[(&str, &str)]) -> Peer {
        let labels = labels.iter().map(|&(k, v)| (k.into(), v.into())).collect();
        Peer::Pod {
            namespace: namespace.into(),
            labels: Value::Mapping(labels),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Outside => f.write_str("addresses outside the cluster"),
            Peer::Pod { namespace, labels } => {
                let labels = serde_yaml::to_string(labels).unwrap_or_default();
                let labels: Vec<&str> = labels.lines().collect();
                write!(f, "pods {{{}}} of namespace {namespace}", labels.join(", "))
            }
        }
    }
}

/// The labels the official NATS Helm chart (nats-io/k8s) puts on its server pods and selects
/// them by in its Service: the chart's name, the release (`nats`, docs/DEPLOY.md) and the
/// component.
pub const NATS_POD_LABELS: [(&str, &str); 3] = [
    ("app.kubernetes.io/name", "nats"),
    ("app.kubernetes.io/instance", "nats"),
    ("app.kubernetes.io/component", "nats"),
];

/// Prometheus as the policies expect it: a pod in namespace `monitoring`.
pub fn prometheus() -> Peer {
    Peer::pod("monitoring", &[("app.kubernetes.io/name", "prometheus")])
}

/// The cluster DNS: CoreDNS's pods in kube-system.
pub fn cluster_dns() -> Peer {
    Peer::pod("kube-system", &[("k8s-app", "kube-dns")])
}

/// PostgreSQL's port, which the database URL (kept in a Secret) cannot tell the tests.
pub const POSTGRES_PORT: u64 = 5432;

/// The NATS server pods a Deployment connects to and the port, from its `TASKBUS_NATS_URL`
/// (`nats://<service>.<namespace>.svc:<port>`; a bare service name is in the Deployment's
/// namespace, no port means 4222).
pub fn nats_of(dep: &Value) -> Option<(Peer, u64)> {
    let env = env_of(get(dep, "spec.template.spec.containers.0"));
    let url = env.get("TASKBUS_NATS_URL")?;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let host_port = rest.split(['/', ',']).next()?.rsplit('@').next()?;
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (host_port, 4222),
    };
    let namespace = host
        .split('.')
        .nth(1)
        .unwrap_or(text(dep, "metadata.namespace"));
    Some((Peer::pod(namespace, &NATS_POD_LABELS), port))
}

/// Whether `np` is isolating its pods in `direction` ("ingress" or "egress"): named in
/// policyTypes or, without policyTypes, by the API's defaults (ingress always, egress when it
/// has egress rules).
fn isolates(np: &Value, direction: &str) -> bool {
    match get(np, "spec.policyTypes").as_sequence() {
        Some(types) => types.iter().any(|t| {
            t.as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case(direction))
        }),
        None => direction == "ingress" || !seq(np, "spec.egress").is_empty(),
    }
}

/// A namespace's default deny for ingress: isolates ingress, allows none, and selects every
/// taskbus pod of its namespace (an empty podSelector, or app.kubernetes.io/part-of: taskbus).
pub fn is_default_deny(np: &Value) -> bool {
    let sel = get(np, "spec.podSelector");
    let broad = get(sel, "matchExpressions").is_null()
        && get(sel, "matchLabels").as_mapping().is_none_or(|m| {
            m.iter().all(|(k, v)| {
                k.as_str() == Some("app.kubernetes.io/part-of") && v.as_str() == Some("taskbus")
            })
        });
    text(np, "kind") == "NetworkPolicy"
        && isolates(np, "ingress")
        && seq(np, "spec.ingress").is_empty()
        && broad
}

/// Whether a NetworkPolicy's podSelector takes in a pod of `namespace` with `labels`.
fn policy_selects(np: &Value, namespace: &str, labels: &Value) -> bool {
    text(np, "metadata.namespace") == namespace
        && selector_matches(get(np, "spec.podSelector"), labels)
}

fn selects_pods_of(np: &Value, dep: &Value) -> bool {
    policy_selects(
        np,
        text(dep, "metadata.namespace"),
        get(dep, "spec.template.metadata.labels"),
    )
}

/// Whether one entry of a rule's `ports` covers a port (`name` is the pod's name for it, known
/// for the pods a policy selects, not for destinations).
fn port_matches(q: &Value, name: Option<&str>, number: u64, protocol: &str) -> bool {
    let port = get(q, "port");
    let end = get(q, "endPort").as_u64();
    let same_protocol = get(q, "protocol").as_str().unwrap_or("TCP") == protocol;
    same_protocol
        && match (port.as_u64(), port.as_str()) {
            (Some(p), _) => p == number || end.is_some_and(|e| (p..=e).contains(&number)),
            (None, Some(n)) => Some(n) == name,
            _ => port.is_null(),
        }
}

/// Every ingress port of `np` is a port `dep`'s containers declare (by name or number), and
/// every ingress rule lists its ports (a rule without would open all of them).
fn ingress_port_problems(np: &Value, dep: &Value) -> Vec<String> {
    let name = text(np, "metadata.name");
    let declared: Vec<&Value> = seq(dep, "spec.template.spec.containers")
        .iter()
        .flat_map(|c| seq(c, "ports"))
        .collect();
    let mut p = Vec::new();
    for rule in seq(np, "spec.ingress") {
        if seq(rule, "ports").is_empty() {
            p.push(format!(
                "NetworkPolicy {name}: an ingress rule without ports opens every port"
            ));
        }
        for q in seq(rule, "ports") {
            let exposed = declared.iter().any(|d| {
                let number = get(d, "containerPort").as_u64().unwrap_or(0);
                let protocol = get(d, "protocol").as_str().unwrap_or("TCP");
                port_matches(q, d["name"].as_str(), number, protocol)
            });
            if !exposed {
                let port = serde_yaml::to_string(get(q, "port")).unwrap_or_default();
                p.push(format!(
                    "NetworkPolicy {name}: ingress port {} is not a container port of Deployment {}",
                    port.trim(),
                    text(dep, "metadata.name")
                ));
            }
        }
    }
    p
}

/// A NetworkPolicy next to its Deployment: same namespace, a podSelector that selects the
/// Deployment's pods, policyTypes spelt out, ingress only to ports the pods declare.
pub fn policy_problems(np: &Value, dep: &Value) -> Vec<String> {
    let name = text(np, "metadata.name");
    let mut p = Vec::new();
    if kind_of(np) != "networking.k8s.io/v1/NetworkPolicy" {
        p.push(format!("{name}: not a networking.k8s.io/v1 NetworkPolicy"));
    }
    if !selects_pods_of(np, dep) {
        p.push(format!(
            "NetworkPolicy {name}: podSelector does not select the pods of Deployment {} in its namespace",
            text(dep, "metadata.name")
        ));
    }
    if get(np, "spec.policyTypes").is_null() {
        p.push(format!("NetworkPolicy {name}: no policyTypes"));
    }
    p.extend(ingress_port_problems(np, dep));
    p
}

/// The NetworkPolicies among objects applied together, to ask what they let a Deployment's pods
/// do. NetworkPolicy's rules: a pod is isolated in a direction once a policy that selects it
/// isolates that direction, and may then do what any rule of those policies allows.
pub struct Network<'a> {
    policies: Vec<&'a Value>,
    namespaces: Vec<&'a Value>,
}

impl<'a> Network<'a> {
    pub fn of(all: &'a [(String, Value)]) -> Network<'a> {
        Network {
            policies: of_kind(all, "NetworkPolicy"),
            namespaces: of_kind(all, "Namespace"),
        }
    }

    /// The policies that select `dep`'s pods.
    pub fn selecting(&self, dep: &Value) -> Vec<&'a Value> {
        let mut out = self.policies.clone();
        out.retain(|np| selects_pods_of(np, dep));
        out
    }

    /// A namespace's labels: the one Kubernetes sets on every namespace and those declared here.
    fn namespace_labels(&self, namespace: &str) -> Value {
        let mut labels = serde_yaml::Mapping::new();
        if let Some(ns) = self
            .namespaces
            .iter()
            .find(|n| text(n, "metadata.name") == namespace)
        {
            labels.extend(
                get(ns, "metadata.labels")
                    .as_mapping()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
        Value::Mapping(labels)
    }

    /// Whether one entry of a rule's `from`/`to`, in a policy of `namespace`, takes in `peer`. An
    /// ipBlock counts only for addresses outside the cluster, and only when it is all of them.
    fn peer_matches(&self, q: &Value, namespace: &str, peer: &Peer) -> bool {
        if !get(q, "ipBlock").is_null() {
            let cidr = text(q, "ipBlock.cidr");
            return matches!(peer, Peer::Outside)
                && (cidr == "0.0.0.0/0" || cidr == "::/0")
                && seq(q, "ipBlock.except").is_empty();
        }
        let Peer::Pod {
            namespace: peer_namespace,
            labels,
        } = peer
        else {
            return false;
        };
        let in_namespace = match get(q, "namespaceSelector") {
            Value::Null => peer_namespace == namespace,
            sel => selector_matches(sel, &self.namespace_labels(peer_namespace)),
        };
        in_namespace && selector_matches(get(q, "podSelector"), labels)
    }

    /// Whether the policies let a connection through in `direction` between `dep`'s pods and
    /// `peer`, on a port that `port_ok` accepts.
    fn allows(
        &self,
        dep: &Value,
        direction: &str,
        peer: &Peer,
        port_ok: impl Fn(&Value) -> bool,
    ) -> bool {
        let mut isolating = self.selecting(dep);
        isolating.retain(|np| isolates(np, direction));
        let peers = if direction == "ingress" { "from" } else { "to" };
        isolating.is_empty()
            || isolating.iter().any(|np| {
                let namespace = text(np, "metadata.namespace");
                seq(np, &format!("spec.{direction}")).iter().any(|rule| {
                    let to_peer = seq(rule, peers);
                    let ports = seq(rule, "ports");
                    (to_peer.is_empty()
                        || to_peer
                            .iter()
                            .any(|q| self.peer_matches(q, namespace, peer)))
                        && (ports.is_empty() || ports.iter().any(&port_ok))
                })
            })
    }

    /// Whether `dep`'s pods may open a connection to `to` on `port` (`protocol`: TCP or UDP).
    pub fn egress_allows(&self, dep: &Value, to: &Peer, port: u64, protocol: &str) -> bool {
        self.allows(dep, "egress", to, |q| port_matches(q, None, port, protocol))
    }

    /// Whether `from` may connect to `dep`'s pods on their container port named `port`.
    pub fn ingress_allows(&self, dep: &Value, from: &Peer, port: &str) -> bool {
        let c = get(dep, "spec.template.spec.containers.0");
        let Some(declared) = seq(c, "ports").iter().find(|q| text(q, "name") == port) else {
            return false;
        };
        let number = get(declared, "containerPort").as_u64().unwrap_or(0);
        self.allows(dep, "ingress", from, |q| {
            port_matches(q, Some(port), number, "TCP")
        })
    }

    /// Whether egress from `dep`'s pods is limited by any policy.
    pub fn egress_limited(&self, dep: &Value) -> bool {
        self.selecting(dep).iter().any(|np| isolates(np, "egress"))
    }
}

/// What the NetworkPolicies among `all` (objects applied together) do wrong for `dep`: its
/// namespace's default deny for ingress must select its pods and a policy of its own too; ingress
/// only to ports the pods declare, the `http` port (metrics) open to Prometheus; egress limited,
/// yet open to the cluster DNS (UDP and TCP 53), to the NATS pods its TASKBUS_NATS_URL names, and
/// to PostgreSQL (any address, port 5432) when it reads TASKBUS_DATABASE_URL.
pub fn network_problems(all: &[(String, Value)], dep: &Value) -> Vec<String> {
    let net = Network::of(all);
    let name = text(dep, "metadata.name");
    let at = |what: &str| format!("Deployment {name}: {what}");
    let selecting = net.selecting(dep);
    let mut p = Vec::new();
    if !selecting.iter().any(|np| is_default_deny(np)) {
        p.push(at(&format!(
            "no default-deny ingress NetworkPolicy of namespace {:?} selects its pods",
            text(dep, "metadata.namespace")
        )));
    }
    if selecting.iter().all(|np| is_default_deny(np)) {
        p.push(at("no NetworkPolicy of its own selects its pods"));
    }
    for np in &selecting {
        p.extend(ingress_port_problems(np, dep));
    }
    let c = get(dep, "spec.template.spec.containers.0");
    if seq(c, "ports").iter().any(|q| text(q, "name") == "http")
        && !net.ingress_allows(dep, &prometheus(), "http")
    {
        p.push(at("Prometheus may not scrape the `http` port"));
    }
    if !net.egress_limited(dep) {
        p.push(at("no NetworkPolicy limits its egress"));
    }
    for protocol in ["UDP", "TCP"] {
        if !net.egress_allows(dep, &cluster_dns(), 53, protocol) {
            p.push(at(&format!(
                "egress to the cluster DNS on {protocol} 53 is not allowed"
            )));
        }
    }
    match nats_of(dep) {
        Some((nats, port)) if !net.egress_allows(dep, &nats, port, "TCP") => p.push(at(&format!(
            "egress to the NATS {nats} on {port} is not allowed"
        ))),
        Some(_) => {}
        None => p.push(at("no TASKBUS_NATS_URL to find NATS by")),
    }
    if env_of(c).contains_key("TASKBUS_DATABASE_URL")
        && !net.egress_allows(dep, &Peer::Outside, POSTGRES_PORT, "TCP")
    {
        p.push(at(&format!(
            "egress to PostgreSQL ({POSTGRES_PORT}, any address) is not allowed"
        )));
    }
    p
}

/// The NetworkPolicies among `all` as a whole: each selects the pods of a Deployment among them
/// (a policy that selects none is a label that went out of date), and none selects the NATS
/// servers, which share namespace `taskbus` and must take connections from every component.
pub fn stray_policy_problems(all: &[(String, Value)]) -> Vec<String> {
    let deps = of_kind(all, "Deployment");
    let nats: Vec<Peer> = deps
        .iter()
        .filter_map(|d| nats_of(d))
        .map(|(n, _)| n)
        .collect();
    let mut p = Vec::new();
    for np in of_kind(all, "NetworkPolicy") {
        let name = text(np, "metadata.name");
        if !deps.iter().any(|d| selects_pods_of(np, d)) {
            p.push(format!(
                "NetworkPolicy {name}: selects no Deployment's pods"
            ));
        }
        let selects_nats = nats.iter().any(|n| match n {
            Peer::Pod { namespace, labels } => policy_selects(np, namespace, labels),
            Peer::Outside => false,
        });
        if selects_nats {
            p.push(format!(
                "NetworkPolicy {name}: selects the NATS server pods"
            ));
        }
    }
    p
}
