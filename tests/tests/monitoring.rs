//! The monitoring bundle in `deploy/monitoring/` against real parts:
//!
//! - the alerts (`prometheusrule.yaml`) pass `promtool check rules` and their unit tests
//!   (`tests/alerts.yaml`, `promtool test rules`), every alert has a test in which it fires and
//!   one in which it stays quiet, and breaking any one alert's expression fails those tests;
//! - the monitors select the Services and pods `deploy/` runs, on ports they have;
//! - a real Prometheus scrapes a running stack (coordinator, payment ledger, scaler, an agent
//!   and a GPU dispatcher, on a real nats-server and PostgreSQL) under the job names the alerts
//!   use, loads the alerts and evaluates them without errors, and every query of the Grafana
//!   dashboard returns data (except the panels marked as usually empty); every metric the alerts
//!   and the dashboard name is one the services export, with the labels they export.
//!
//! Needs `promtool` and `prometheus` on PATH: Debian's `prometheus` package, which
//! scripts/test.sh installs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;
use taskbus_agent::{Agent, AgentConfig, CancellationToken, TaskContext, TaskError};
use taskbus_gpu_dispatcher::allocator::PoolQuota;
use taskbus_gpu_dispatcher::dispatcher::{self, Backend, DispatcherConfig, GpuSource};
use taskbus_gpu_dispatcher::inventory;
use taskbus_gpu_dispatcher::local::{parse_exec, LocalConfig};
use taskbus_proto::PoolSettings;
use taskbus_runtime::devservers::free_port;
use taskbus_tests::stack::Stack;
use taskbus_tests::{deposit, eventually, http_get};

// The YAML helpers of the services' manifest tests (its `deploy_dir()` is theirs, not used here).
#[path = "../manifest_checks.rs"]
mod manifest_checks;
use manifest_checks::{parse, s as string, selector_matches, seq};

const HINT: &str = "install Debian's `prometheus` package (scripts/test.sh does)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn monitoring() -> PathBuf {
    repo().join("deploy/monitoring")
}

fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| panic!("{name} not found on PATH: {HINT}"))
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"))
}

/// The PrometheusRule's `spec`: a plain rules file.
fn rules_spec() -> Yaml {
    let docs = yaml_docs(&monitoring().join("prometheusrule.yaml"));
    assert_eq!(docs.len(), 1);
    assert_eq!(string(&docs[0], "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(string(&docs[0], "kind"), "PrometheusRule");
    docs[0]["spec"].clone()
}

/// Every alerting rule: `(group index, rule index, rule)`.
fn alerts(spec: &Yaml) -> Vec<(usize, usize, Yaml)> {
    let mut out = Vec::new();
    for (g, group) in spec["groups"].as_sequence().unwrap().iter().enumerate() {
        for (r, rule) in group["rules"].as_sequence().unwrap().iter().enumerate() {
            if rule["alert"].is_string() {
                out.push((g, r, rule.clone()));
            }
        }
    }
    out
}

/// Writes `rules.yml` (from `spec`) and a copy of the alert unit tests into `dir`, and runs
/// `promtool test rules` there.
fn promtool_test(dir: &Path, spec: &Yaml) -> std::process::Output {
    std::fs::write(dir.join("rules.yml"), serde_yaml::to_string(spec).unwrap()).unwrap();
    std::fs::copy(
        monitoring().join("tests/alerts.yaml"),
        dir.join("alerts.yaml"),
    )
    .unwrap();
    std::process::Command::new(tool("promtool"))
        .args(["test", "rules", "alerts.yaml"])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_tested_both_ways() {
    let spec = rules_spec();
    let dir = tempfile::tempdir().unwrap();
    let out = promtool_test(dir.path(), &spec);
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}",
        output_text(&out)
    );
    let check = std::process::Command::new(tool("promtool"))
        .args(["check", "rules", "rules.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", output_text(&check));

    // Which alerts the unit tests see firing, and which they see quiet.
    let tests = &yaml_docs(&monitoring().join("tests/alerts.yaml"))[0];
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for t in tests["tests"].as_sequence().unwrap() {
        for a in t["alert_rule_test"].as_sequence().unwrap() {
            let name = string(a, "alertname").to_string();
            match a["exp_alerts"].as_sequence() {
                Some(v) if !v.is_empty() => fires.insert(name),
                _ => quiet.insert(name),
            };
        }
    }

    let docs = std::fs::read_to_string(repo().join("docs/MONITORING.md")).unwrap();
    let all = alerts(&spec);
    assert!(all.len() >= 10, "{} alerts", all.len());
    let mut names = BTreeSet::new();
    for (_, _, rule) in &all {
        let name = string(rule, "alert");
        assert!(names.insert(name), "alert {name} defined twice");
        assert!(fires.contains(name), "no unit test shows {name} firing");
        assert!(
            quiet.contains(name),
            "no unit test shows {name} staying quiet"
        );
        let severity = string(rule, "labels.severity");
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity}"
        );
        for a in ["summary", "description"] {
            assert!(
                !string(&rule["annotations"], a).trim().is_empty(),
                "{name}: no {a}"
            );
        }
        assert_eq!(
            string(rule, "annotations.runbook"),
            format!("docs/MONITORING.md#{}", name.to_lowercase()),
            "{name}: runbook"
        );
        assert!(
            docs.lines().any(|l| l.trim() == format!("### {name}")),
            "docs/MONITORING.md has no runbook section `### {name}`"
        );
    }
    for name in fires.union(&quiet) {
        assert!(
            names.contains(name.as_str()),
            "the unit tests name {name}, which no rule defines"
        );
    }

    // The unit tests can fail: with any one alert's expression never true, they do.
    for (g, r, rule) in &all {
        let mut broken = spec.clone();
        broken["groups"][*g]["rules"][*r]["expr"] = Yaml::from("absent(vector(1))");
        let dir = tempfile::tempdir().unwrap();
        let out = promtool_test(dir.path(), &broken);
        assert!(
            !out.status.success(),
            "the unit tests still pass with {} broken",
            string(rule, "alert")
        );
    }
}

/// The namespace, pod labels and container port names of the Deployment or DaemonSet in `path`.
fn pod_template(path: &str) -> (String, Yaml, BTreeSet<String>) {
    let docs = yaml_docs(&repo().join("deploy").join(path));
    let d = docs
        .iter()
        .find(|d| ["Deployment", "DaemonSet"].contains(&string(d, "kind")))
        .unwrap();
    let ports = seq(d, "spec.template.spec.containers")
        .iter()
        .flat_map(|c| seq(c, "ports"))
        .map(|p| string(p, "name").to_string())
        .collect();
    (
        string(d, "metadata.namespace").to_string(),
        d["spec"]["template"]["metadata"]["labels"].clone(),
        ports,
    )
}

#[test]
fn monitors_select_what_deploy_runs_under_the_job_names_the_alerts_use() {
    let monitors = yaml_docs(&monitoring().join("monitors.yaml"));
    let mut jobs = BTreeSet::new();

    // The ServiceMonitor: the taskbus Services with a `metrics` port; the job is each one's name.
    let sm = monitors
        .iter()
        .find(|d| string(d, "kind") == "ServiceMonitor")
        .unwrap();
    let ns = string(sm, "metadata.namespace");
    let port = string(&sm["spec"]["endpoints"][0], "port");
    for file in [
        "coordinator/service.yaml",
        "ledger/service.yaml",
        "scaler/base/service.yaml",
    ] {
        let svc = &yaml_docs(&repo().join("deploy").join(file))[0];
        assert_eq!(string(svc, "metadata.namespace"), ns, "{file}");
        assert!(
            selector_matches(&sm["spec"]["selector"], &svc["metadata"]["labels"]),
            "{file} not selected"
        );
        assert!(
            seq(svc, "spec.ports")
                .iter()
                .any(|p| string(p, "name") == port),
            "{file} has no port {port}"
        );
        jobs.insert(string(svc, "metadata.name").to_string());
    }

    // The PodMonitors: each selects its pods in its namespace, on a port they declare; the job is
    // the pods' app.kubernetes.io/name.
    for (monitor, templates) in [
        (
            "taskbus-agents",
            vec![
                "agents/deployment-default.yaml",
                "gpu-dispatcher/local/daemonset.yaml",
            ],
        ),
        (
            "taskbus-gpu-dispatcher",
            vec!["gpu-dispatcher/deployment.yaml"],
        ),
    ] {
        let pm = monitors
            .iter()
            .find(|d| string(d, "kind") == "PodMonitor" && string(d, "metadata.name") == monitor)
            .unwrap_or_else(|| panic!("no PodMonitor {monitor}"));
        assert_eq!(string(pm, "spec.jobLabel"), "app.kubernetes.io/name");
        let port = string(&pm["spec"]["podMetricsEndpoints"][0], "port");
        let sel = &pm["spec"]["selector"];
        for t in templates {
            let (tns, labels, ports) = pod_template(t);
            assert_eq!(tns, string(pm, "metadata.namespace"), "{t}");
            assert!(
                selector_matches(sel, &labels),
                "{monitor} does not select the pods of {t}"
            );
            assert!(ports.contains(port), "{t} has no port {port}");
            jobs.insert(
                labels["app.kubernetes.io/name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }

    // Every job an alert names is one of these, and the regex ones match at least one.
    for (_, _, rule) in alerts(&rules_spec()) {
        let expr = string(&rule, "expr");
        for (label, op, value) in matchers(expr) {
            if label != "job" {
                continue;
            }
            match op.as_str() {
                "=" => assert!(
                    jobs.contains(&value),
                    "{expr}: no scrape job {value} ({jobs:?})"
                ),
                "=~" => {
                    let prefix = value.trim_end_matches(".*");
                    assert!(
                        jobs.iter().any(|j| j.starts_with(prefix)),
                        "{expr}: {value}"
                    );
                }
                other => panic!("{expr}: unexpected job matcher {other}"),
            }
        }
    }

    // The kustomization names files that exist.
    let k = &yaml_docs(&monitoring().join("kustomization.yaml"))[0];
    for r in k["resources"].as_sequence().unwrap() {
        assert!(monitoring().join(r.as_str().unwrap()).is_file(), "{r:?}");
    }
    let gen = &k["configMapGenerator"][0];
    assert_eq!(string(gen, "options.labels.grafana_dashboard"), "1");
    for f in gen["files"].as_sequence().unwrap() {
        assert!(monitoring().join(f.as_str().unwrap()).is_file(), "{f:?}");
    }
}

// ----- a little PromQL reading: enough for the expressions of this bundle -----

/// Every `(label, operator, value)` matcher inside `{…}` in `expr`, whatever the metric (`up`
/// included).
fn matchers(expr: &str) -> Vec<(String, String, String)> {
    expr.split('{')
        .skip(1)
        .flat_map(|rest| parse_matchers(&rest[..rest.find('}').unwrap()]))
        .collect()
}

fn parse_matchers(inner: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap();
        let name = rest[..name_end].to_string();
        rest = rest[name_end..].trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .unwrap_or_else(|| panic!("no operator after {name} in {inner:?}"));
        rest = rest[op.len()..].trim_start();
        assert!(rest.starts_with('"'), "unquoted value in {inner:?}");
        let close = rest[1..].find('"').unwrap() + 1;
        out.push((name, op.to_string(), rest[1..close].to_string()));
        rest = rest[close + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

/// Every `taskbus_*` selector in `expr`: its metric name and its matchers.
#[allow(clippy::type_complexity)]
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String, String)>)> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = expr.as_bytes();
    while let Some(at) = expr[i..].find("taskbus_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        i = end;
        if !boundary {
            continue;
        }
        let mut m = Vec::new();
        if expr[end..].starts_with('{') {
            let close = end + expr[end..].find('}').unwrap();
            m = parse_matchers(&expr[end + 1..close]);
            i = close + 1;
        }
        out.push((expr[start..end].to_string(), m));
    }
    out
}

/// The label names of every `by (…)` / `without (…)` clause in `expr`.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in ["by", "without"] {
        let mut rest = expr;
        while let Some(i) = rest.find(kw) {
            let before = rest[..i].chars().last();
            rest = &rest[i + kw.len()..];
            let t = rest.trim_start();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') || !t.starts_with('(')
            {
                continue;
            }
            let close = t.find(')').unwrap();
            out.extend(
                t[1..close]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    out
}

#[test]
fn the_promql_reader_finds_selectors_and_labels() {
    let e = r#"sum by (pool, le) (rate(taskbus_agent_x_bucket{pool=~"$pool", outcome!="a,b"}[5m])) / ignoring() taskbus_y and absent(up{job="taskbus-ledger"} == 1)"#;
    let sel = selectors(e);
    assert_eq!(sel.len(), 2);
    assert_eq!(sel[0].0, "taskbus_agent_x_bucket");
    assert_eq!(
        sel[0].1,
        vec![
            ("pool".into(), "=~".into(), "$pool".into()),
            ("outcome".into(), "!=".into(), "a,b".into())
        ]
    );
    assert_eq!(sel[1], ("taskbus_y".into(), vec![]));
    assert_eq!(grouping_labels(e), vec!["pool", "le"]);
    assert!(matchers(e).contains(&("job".into(), "=".into(), "taskbus-ledger".into())));
}

// ----- the live check -----

/// A Prometheus server on a random port, killed when dropped.
struct Prometheus {
    addr: SocketAddr,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scraping each `(job, address)` every second, with `rules` loaded.
    async fn start(jobs: &[(&str, SocketAddr)], rules: &Yaml) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("rules.yml"),
            serde_yaml::to_string(rules).unwrap(),
        )
        .unwrap();
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": jobs.iter().map(|(job, addr)| json!({
                "job_name": job,
                "static_configs": [{"targets": [addr.to_string()]}],
            })).collect::<Vec<_>>(),
        });
        // JSON is YAML.
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config.to_string()).unwrap();
        Self::with_config(dir, &file).await
    }

    /// With the configuration file `config`, its data in `dir`.
    async fn with_config(dir: tempfile::TempDir, config: &Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap();
        let child = tokio::process::Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus: {e} ({HINT})"));
        let p = Self {
            addr,
            _child: child,
            _dir: dir,
        };
        eventually("Prometheus to answer", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(addr).await.ok()?;
            (http_get(addr, "/-/ready").await.0 == 200).then_some(())
        })
        .await;
        p
    }

    /// `GET /api/v1/<path>` → its `data`; panics on an error status.
    async fn api(&self, path: &str) -> Json {
        let (code, body) = http_get(self.addr, &format!("/api/v1/{path}")).await;
        let v: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(
            code == 200 && v["status"] == "success",
            "{path}: {code} {body}"
        );
        v["data"].clone()
    }

    async fn query(&self, expr: &str) -> Vec<Json> {
        let data = self.api(&format!("query?query={}", encode(expr))).await;
        data["result"].as_array().unwrap().clone()
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn listen() -> SocketAddr {
    format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap()
}

/// The sample names each exposition page declares (`# TYPE` lines): counters as `_total`,
/// histograms as `_bucket`, `_sum` and `_count`.
fn declared(page: &str, into: &mut BTreeSet<String>) {
    for l in page.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind.trim() {
            "counter" => {
                into.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    into.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                into.insert(name.to_string());
            }
        }
    }
}

/// Sample names and label names of every family the coordinator, the ledger and the scaler
/// register, each family touched once, so that the families a healthy run never fills (errors,
/// retention, schedules, direct mode, gRPC) are known too: a family with no series is not on a
/// service's page.
fn registered_families() -> BTreeMap<String, BTreeSet<String>> {
    use taskbus_coordinator::metrics as cm;
    use taskbus_ledger::metrics as lm;
    use taskbus_scaler::metrics as sm;

    let mut pages = String::new();
    let c = cm::Metrics::default();
    c.admitted.inc();
    c.duplicates.inc();
    c.rejected
        .get_or_create(&cm::ReasonLabel { reason: "x".into() })
        .inc();
    c.outcomes
        .get_or_create(&cm::OutcomeLabel {
            outcome: "x".into(),
        })
        .inc();
    c.batch_size.observe(1.0);
    c.error("x");
    c.pruned
        .get_or_create(&cm::StatusLabel { status: "x".into() })
        .inc();
    let tick = cm::ScheduleLabel {
        schedule: "x".into(),
    };
    c.schedule_fired.get_or_create(&tick).inc();
    c.schedule_skipped.get_or_create(&tick).inc();
    c.schedule_invalid.inc();
    prometheus_client::encoding::text::encode(&mut pages, &c.registry()).unwrap();

    let l = lm::Metrics::default();
    lm::Metrics::count(&l.holds, "x", 1);
    lm::Metrics::count(&l.settlements, "x", 1);
    lm::Metrics::count(&l.bad_events, "x", 1);
    l.error("x");
    l.settle_batch.observe(1.0);
    prometheus_client::encoding::text::encode(&mut pages, &l.registry()).unwrap();

    let m = sm::Metrics::default();
    let pool = sm::PoolLabel { pool: "x".into() };
    for g in [
        &m.backlog,
        &m.in_flight,
        &m.oldest_age,
        &m.delayed,
        &m.agents,
        &m.arrival_rate,
        &m.completion_rate,
        &m.service_time,
        &m.desired,
        &m.published,
        &m.frozen,
        &m.last_refresh,
    ] {
        g.get_or_create(&pool).set(1.0);
    }
    m.refresh_errors.get_or_create(&pool).inc();
    m.rpcs
        .get_or_create(&sm::RpcLabel {
            rpc: "x".into(),
            code: "x".into(),
        })
        .inc();
    m.scale_actions
        .get_or_create(&sm::ScaleLabel {
            pool: "x".into(),
            outcome: "x".into(),
        })
        .inc();
    prometheus_client::encoding::text::encode(&mut pages, &m.registry()).unwrap();

    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in pages
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let close = line.find('}').unwrap();
            labels.extend(
                parse_matchers(&line[name_end + 1..close])
                    .into_iter()
                    .map(|(l, _, _)| l),
            );
        }
    }
    out
}

/// The dashboard's queries: `(panel title, panel description, expr)` of every target.
fn dashboard_queries(d: &Json) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                p["description"].as_str().unwrap_or("").to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn may_be_empty(description: &str) -> bool {
    description.starts_with("Usually empty.") || description.starts_with("Direct mode only.")
}

#[test]
fn the_dashboard_is_well_formed() {
    let d: Json = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboards/taskbus.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(d["uid"], "taskbus-overview");
    assert!(d.get("id").is_none(), "an exported dashboard has no id");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "pool"]);
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{title}: id used twice"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{title}: wider than the dashboard");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            !p["description"].as_str().unwrap_or("").is_empty(),
            "{title}: no description"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap();
            for var in expr.match_indices('$').map(|(i, _)| &expr[i..]) {
                assert!(
                    var.starts_with("$pool") || var.starts_with("$__rate_interval"),
                    "{title}: unknown variable in {expr}"
                );
            }
        }
    }
}

/// The dashboard's `expr` as Prometheus runs it with every pool selected.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$pool", ".*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_the_stack_and_every_dashboard_query_has_data() {
    let s = Stack::new(30_000).await;
    s.set_pool(
        "gpu",
        PoolSettings {
            ack_wait_ms: 5_000,
            ..Default::default()
        },
    )
    .await;
    let shutdown = CancellationToken::new();

    let mut cc = s.coordinator_config();
    cc.http_listen = Some(listen());
    let coordinator = taskbus_coordinator::start(cc, shutdown.clone())
        .await
        .unwrap();

    let mut lc = taskbus_ledger::Config::new(s.nats.url(), s.db.url.clone());
    lc.http_listen = Some(listen());
    lc.db_max_connections = 4;
    // A budget far above what the run spends: exported, and TaskbusSpendOverBudget stays quiet.
    lc.spend_budgets = vec!["USD=1000000".parse().unwrap()];
    let ledger = taskbus_ledger::start(lc, shutdown.clone()).await.unwrap();
    deposit(&s.client, "acme", "100.00", "fund-acme").await;

    let mut sc = taskbus_scaler::Config::new(s.nats.url());
    sc.grpc_listen = listen();
    sc.http_listen = listen();
    let scaler = taskbus_scaler::start(sc, shutdown.clone()).await.unwrap();

    let agent_http = listen();
    let mut ac = AgentConfig::new(s.nats.url(), "default");
    ac.agent_id = "watched".into();
    ac.http_listen = Some(agent_http);
    ac.concurrency = 8;
    let agent = Agent::new(ac, |t: TaskContext| async move {
        match t.kind.as_str() {
            "fail" => Err(TaskError::Fatal("this kind always fails".into())),
            _ => Ok(t.payload),
        }
    });
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));

    let gpu_http = listen();
    let local = LocalConfig {
        programs: [parse_exec("probe=/bin/true").unwrap()]
            .into_iter()
            .collect(),
        ..LocalConfig::default()
    };
    let mut dc = DispatcherConfig::new(
        s.nats.url(),
        vec![PoolQuota {
            pool: "gpu".into(),
            quota: None,
        }],
        Backend::Local(local),
    );
    dc.gpus = GpuSource::Declared(inventory::declared(2, None, None));
    dc.http_listen = Some(gpu_http);
    let gpu_task = tokio::spawn(dispatcher::run(dc, shutdown.clone()));

    let targets = [
        ("taskbus-coordinator", coordinator.http_addr.unwrap()),
        ("taskbus-ledger", ledger.http_addr.unwrap()),
        ("taskbus-scaler", scaler.http_addr),
        ("taskbus-agent", agent_http),
        ("taskbus-gpu-dispatcher", gpu_http),
    ];
    let rules = rules_spec();
    let prom = Prometheus::start(&targets, &rules).await;

    // Work of every kind the dashboard shows: plain and priced successes, a task that dies,
    // rejections (bad JSON, no funds), GPU tasks, and events the coordinator and the ledger
    // cannot use (counted as errors / bad events).
    for i in 0..20 {
        s.submit("default", json!({"kind": "echo", "payload": {"i": i}}))
            .await;
        s.submit(
            "default",
            json!({"kind": "echo", "price": "0.01", "payer": "acme"}),
        )
        .await;
    }
    s.submit("default", json!({"kind": "fail", "max_attempts": 1}))
        .await;
    s.submit(
        "default",
        json!({"kind": "echo", "price": "5", "payer": "nobody"}),
    )
    .await;
    s.submit_raw("default", "not json").await;
    for _ in 0..4 {
        s.submit("gpu", json!({"kind": "probe", "resources": {"gpus": 1}}))
            .await;
    }
    for subject in [
        "taskbus.events.default.bogus-1.failed",
        "taskbus.events.default.bogus-2.closed",
    ] {
        s.js.publish(subject, "not an event".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A steady trickle, so that rates are not zero whenever a query runs.
    let trickle = {
        let js = s.js.clone();
        let subject = s.subjects.submit("default");
        tokio::spawn(async move {
            loop {
                let body = json!({"kind": "echo", "price": "0.01", "payer": "acme"});
                let _ = js.publish(subject.clone(), body.to_string().into()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Every target up under its job name.
    eventually(
        "every job up in Prometheus",
        Duration::from_secs(30),
        || async {
            let up = prom.query("up == 1").await;
            let jobs: BTreeSet<&str> = up
                .iter()
                .filter_map(|r| r["metric"]["job"].as_str())
                .collect();
            (jobs.len() == targets.len()).then_some(())
        },
    )
    .await;

    // What the services declare, straight from their pages, and every family they register.
    let registered = registered_families();
    let mut exported: BTreeSet<String> = registered.keys().cloned().collect();
    for (_, addr) in &targets {
        let (code, page) = http_get(*addr, "/metrics").await;
        assert_eq!(code, 200);
        declared(&page, &mut exported);
    }

    // Every family any of them exports is in docs/MONITORING.md's reference.
    let docs = std::fs::read_to_string(repo().join("docs/MONITORING.md")).unwrap();
    for name in &exported {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|sfx| name.strip_suffix(sfx))
            .filter(|f| exported.contains(&format!("{f}_bucket")))
            .unwrap_or(name);
        assert!(
            docs.contains(&format!("| `{family}` |")),
            "docs/MONITORING.md does not describe {family}"
        );
    }

    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboards/taskbus.json")).unwrap(),
    )
    .unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());

    // Every dashboard query returns data (or runs cleanly, where the panel says it is usually
    // empty). Rates need two samples of a series, so give the stack a little time.
    for (title, description, expr) in &queries {
        let q = substitute(expr);
        if may_be_empty(description) {
            prom.query(&q).await;
            continue;
        }
        eventually(
            &format!("data for panel {title:?}: {expr}"),
            Duration::from_secs(30),
            || async { (!prom.query(&q).await.is_empty()).then_some(()) },
        )
        .await;
    }
    let pools = prom
        .api(&format!(
            "label/pool/values?match[]={}",
            encode("taskbus_scaler_backlog")
        ))
        .await;
    for p in ["default", "gpu"] {
        assert!(
            pools.as_array().unwrap().iter().any(|v| v == p),
            "pool variable: {pools}"
        );
    }

    // Names and labels: every metric named is exported; every label named is on its series (or,
    // for a family this run left empty, is one the service gives it); pool-labelled series on
    // the dashboard are filtered by the pool variable.
    let mut labels_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let alert_exprs: Vec<String> = alerts(&rules)
        .iter()
        .map(|(_, _, r)| string(r, "expr").to_string())
        .collect();
    for expr in alert_exprs.iter().chain(queries.iter().map(|q| &q.2)) {
        let mut expr_labels = BTreeSet::from(["le".to_string(), "job".into(), "instance".into()]);
        for (name, m) in selectors(expr) {
            assert!(
                exported.contains(&name),
                "{expr}: no service exports {name}; they export {exported:?}"
            );
            if !labels_of.contains_key(&name) {
                let series = prom.api(&format!("series?match[]={}", encode(&name))).await;
                let mut set: BTreeSet<String> = series
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|s| s.as_object().unwrap().keys().cloned())
                    .collect();
                // No series in this run: the labels the service gives the family.
                if set.is_empty() {
                    set = registered.get(&name).cloned().unwrap_or_default();
                }
                labels_of.insert(name.clone(), set);
            }
            let have = &labels_of[&name];
            if have.is_empty() {
                continue;
            }
            expr_labels.extend(have.iter().cloned());
            for (label, _, _) in &m {
                assert!(
                    have.contains(label),
                    "{expr}: {name} has no label {label} ({have:?})"
                );
            }
            if queries.iter().any(|q| &q.2 == expr) && have.contains("pool") {
                assert!(
                    m.contains(&("pool".into(), "=~".into(), "$pool".into())),
                    "{expr}: {name} is not filtered by the pool variable"
                );
            }
        }
        for label in grouping_labels(expr) {
            if selectors(expr)
                .iter()
                .all(|(n, _)| !labels_of[n].is_empty())
            {
                assert!(
                    expr_labels.contains(&label),
                    "{expr}: nothing has label {label}"
                );
            }
        }
    }

    // Prometheus loaded every alert and evaluates each without error.
    let groups = prom.api("rules").await;
    let rules_seen: Vec<&Json> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules_seen.len(), alert_exprs.len());
    eventually("every rule evaluated", Duration::from_secs(10), || async {
        let groups = prom.api("rules").await;
        let rules: Vec<Json> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        for r in &rules {
            assert_eq!(r["health"].as_str().unwrap_or("ok"), "ok", "{r}");
        }
        rules
            .iter()
            .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
            .then_some(())
    })
    .await;
    // The stack is healthy apart from what this test broke on purpose: the failed task's
    // dead letter and the events the ledger refused. Nothing else fires or is pending once the
    // rules have been evaluated against scrapes of every target. (A rule evaluated just before
    // a target's first scrape, or during a scrape that timed out on this loaded machine, leaves
    // a `*Down` alert pending until the next evaluation clears it, hence the wait.)
    let expected: BTreeSet<String> = ["TaskbusDeadLetters", "TaskbusLedgerBadEvents"]
        .into_iter()
        .map(String::from)
        .collect();
    let last_seen = std::sync::Mutex::new(BTreeSet::new());
    let quiet = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let firing: BTreeSet<String> = prom.api("alerts").await["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["labels"]["alertname"].as_str().unwrap().to_string())
                .collect();
            let ok = firing.is_subset(&expected);
            *last_seen.lock().unwrap() = firing;
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        quiet.is_ok(),
        "alerts on a healthy stack for 20 s: {:?}",
        last_seen.lock().unwrap()
    );

    trickle.abort();
    shutdown.cancel();
    let _ = agent_task.await;
    let _ = gpu_task.await;
    coordinator.wait().await;
    ledger.wait().await;
    scaler.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taskbus_dev_writes_a_prometheus_config_that_scrapes_every_service() {
    let s = Stack::new(30_000).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let _dev = s.taskbus_dev([
        "--agents",
        "2",
        "--demo-rate",
        "20",
        "--gpus",
        "1",
        "--duration",
        "120",
        "--prometheus-config",
        config.to_str().unwrap(),
    ]);
    eventually(
        "taskbus dev to write its Prometheus configuration",
        Duration::from_secs(60),
        || async { config.is_file().then_some(()) },
    )
    .await;
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("scrape_interval: 5s"), "{text}");
    // Scrape every second here, so the test need not wait for the 5 s interval.
    std::fs::write(
        &config,
        text.replace("scrape_interval: 5s", "scrape_interval: 1s"),
    )
    .unwrap();
    let prom = Prometheus::with_config(dir, &config).await;
    let up = eventually(
        "every service of taskbus dev up",
        Duration::from_secs(30),
        || async {
            let up = prom.query("up == 1").await;
            (up.len() == 6).then_some(up)
        },
    )
    .await;
    let mut jobs: Vec<&str> = up
        .iter()
        .map(|r| r["metric"]["job"].as_str().unwrap())
        .collect();
    jobs.sort();
    assert_eq!(
        jobs,
        [
            "taskbus-agent",
            "taskbus-agent",
            "taskbus-coordinator",
            "taskbus-gpu-dispatcher",
            "taskbus-ledger",
            "taskbus-scaler"
        ]
    );
    // The demo load shows up as admitted tasks and as work of both agents.
    eventually(
        "demo tasks admitted and run",
        Duration::from_secs(30),
        || async {
            let admitted = prom.query("taskbus_coordinator_admitted_total > 0").await;
            let agents = prom
                .query(r#"taskbus_agent_tasks_total{job="taskbus-agent",outcome="succeeded"} > 0"#)
                .await;
            (!admitted.is_empty() && agents.len() == 2).then_some(())
        },
    )
    .await;
}

#[test]
fn taskbus_dev_refuses_a_prometheus_config_in_a_missing_directory() {
    let out = std::process::Command::new(taskbus_tests::workspace_bin("taskbus"))
        .args([
            "dev",
            "--prometheus-config",
            "/nonexistent-dir/prometheus.yml",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--prometheus-config: directory /nonexistent-dir does not exist"),
        "{err}"
    );
}
