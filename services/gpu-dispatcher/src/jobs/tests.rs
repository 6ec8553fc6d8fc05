//! The backend against a fake Kubernetes API server (kube-rs's tower-test mock): it keeps Jobs
//! and pods in memory, answers create/get/list/watch/delete the way the API server does, and
//! records every request so each test can check what was sent (method, path, query, body).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use taskbus_agent::{CancellationToken, TaskError};
use tokio::task::JoinHandle;
use tower_test::mock;

use super::*;
use crate::launch::{Launch, MAX_ARGS};

const NS: &str = "gpu-jobs";
const JOBS: &str = "/apis/batch/v1/namespaces/gpu-jobs/jobs";
const PODS: &str = "/api/v1/namespaces/gpu-jobs/pods";

/// One request the fake API server received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    body: Value,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    /// The RBAC (resource, verb) this request needs.
    fn rbac(&self) -> (&'static str, &'static str) {
        let resource = if self.path.starts_with(PODS) {
            "pods"
        } else {
            "jobs"
        };
        let collection = self.path == JOBS || self.path == PODS;
        let verb = match (&self.method, collection) {
            (&Method::POST, true) => "create",
            (&Method::GET, true) if self.is_watch() => "watch",
            (&Method::GET, true) => "list",
            (&Method::GET, false) => "get",
            (&Method::DELETE, false) => "delete",
            (m, _) => panic!("unexpected {m} {}", self.path),
        };
        (resource, verb)
    }
}

/// What the fake does with the next watch request.
enum Step {
    /// Change the watched Job and send it as MODIFIED (the watch response then ends and the
    /// watcher watches again from the new resourceVersion).
    Modify(Box<dyn FnOnce(&mut Value) + Send>),
    /// Remove the Job and send DELETED.
    Delete,
    /// Remove the Job quietly and answer with a 410 Gone error event: the watcher lists
    /// again and does not find it.
    RemoveAndExpire,
}

#[derive(Default)]
struct Cluster {
    jobs: BTreeMap<String, Value>,
    pods: Vec<Value>,
    rv: u64,
    /// Answer to every create: (code, reason, message).
    create_error: Option<(u16, &'static str, String)>,
    /// Creates to fail at the connection level.
    create_disconnects: usize,
    /// Lists to answer with 500 before answering properly.
    list_errors: usize,
    /// Watch requests: each takes the next step; none left = hold the request open.
    watches: VecDeque<Step>,
    seen: Vec<Seen>,
    held: Vec<mock::SendResponse<Response<Body>>>,
}

type Shared = Arc<Mutex<Cluster>>;

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn query_of(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

/// Whether `labels` has every `k=v` of a label selector.
fn selected(selector: Option<&String>, labels: &Value) -> bool {
    selector.is_none_or(|s| {
        s.split(',')
            .filter(|t| !t.is_empty())
            .all(|t| match t.split_once('=') {
                Some((k, v)) => labels.get(k).and_then(Value::as_str) == Some(v),
                None => panic!("unsupported selector term {t}"),
            })
    })
}

/// The answer to one request; `None` holds it open (a watch with nothing to report).
fn answer(c: &mut Cluster, r: &Seen) -> Option<Response<Body>> {
    let name = r.path.strip_prefix(JOBS).and_then(|p| p.strip_prefix('/'));
    match (&r.method, r.path.as_str(), name) {
        (&Method::POST, JOBS, _) => {
            if let Some((code, reason, msg)) = &c.create_error {
                return Some(status(*code, reason, msg));
            }
            let mut job = r.body.clone();
            let name = job["metadata"]["name"].as_str().unwrap().to_string();
            if c.jobs.contains_key(&name) {
                return Some(status(
                    409,
                    "AlreadyExists",
                    &format!("jobs.batch \"{name}\" already exists"),
                ));
            }
            c.rv += 1;
            job["metadata"]["resourceVersion"] = c.rv.to_string().into();
            job["metadata"]["uid"] = format!("uid-{name}").into();
            job["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z".into();
            c.jobs.insert(name, job.clone());
            Some(respond(StatusCode::CREATED, &job))
        }
        (&Method::GET, JOBS, _) if r.is_watch() => {
            let name = r.query["fieldSelector"]
                .strip_prefix("metadata.name=")
                .unwrap()
                .to_string();
            let step = c.watches.pop_front()?;
            c.rv += 1;
            let rv = c.rv.to_string();
            let line = match step {
                Step::Modify(f) => {
                    let job = c.jobs.get_mut(&name)?;
                    f(job);
                    job["metadata"]["resourceVersion"] = rv.into();
                    json!({"type": "MODIFIED", "object": job})
                }
                Step::Delete => {
                    let mut job = c.jobs.remove(&name)?;
                    job["metadata"]["resourceVersion"] = rv.into();
                    json!({"type": "DELETED", "object": job})
                }
                Step::RemoveAndExpire => {
                    c.jobs.remove(&name);
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "metadata": {}, "status": "Failure", "reason": "Expired",
                        "message": "too old resource version", "code": 410}})
                }
            };
            let mut body = serde_json::to_vec(&line).unwrap();
            body.push(b'\n');
            Some(Response::new(Body::from(body)))
        }
        (&Method::GET, JOBS, _) => {
            if c.list_errors > 0 {
                c.list_errors -= 1;
                return Some(status(500, "InternalError", "etcd is having a day"));
            }
            let by_name = r
                .query
                .get("fieldSelector")
                .map(|f| f.strip_prefix("metadata.name=").unwrap().to_string());
            let items: Vec<&Value> = c
                .jobs
                .values()
                .filter(|j| {
                    by_name
                        .as_deref()
                        .is_none_or(|n| j["metadata"]["name"] == n)
                })
                .filter(|j| selected(r.query.get("labelSelector"), &j["metadata"]["labels"]))
                .collect();
            Some(respond(
                StatusCode::OK,
                &json!({"kind": "JobList", "apiVersion": "batch/v1",
                        "metadata": {"resourceVersion": c.rv.to_string()}, "items": items}),
            ))
        }
        (&Method::GET, _, Some(name)) => Some(match c.jobs.get(name) {
            Some(job) => respond(StatusCode::OK, job),
            None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
        }),
        (&Method::DELETE, _, Some(name)) => Some(match c.jobs.remove(name) {
            Some(_) => respond(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": {"name": name, "group": "batch",
                        "kind": "jobs"}}),
            ),
            None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
        }),
        (&Method::GET, PODS, _) => {
            let items: Vec<&Value> = c
                .pods
                .iter()
                .filter(|p| selected(r.query.get("labelSelector"), &p["metadata"]["labels"]))
                .collect();
            Some(respond(
                StatusCode::OK,
                &json!({"kind": "PodList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": "1"}, "items": items}),
            ))
        }
        _ => Some(status(
            400,
            "BadRequest",
            &format!("unexpected {} {}", r.method, r.path),
        )),
    }
}

/// A fake API server over `cluster`; returns the client and the server task.
fn fake_api(cluster: Shared) -> (kube::Client, JoinHandle<()>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let seen = Seen {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                query: query_of(parts.uri.query()),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let mut c = cluster.lock().unwrap();
            c.seen.push(seen.clone());
            if seen.method == Method::POST && c.create_disconnects > 0 {
                c.create_disconnects -= 1;
                send.send_error(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                ));
                continue;
            }
            match answer(&mut c, &seen) {
                Some(response) => send.send_response(response),
                None => c.held.push(send),
            }
        }
    });
    (kube::Client::new(svc, NS), task)
}

fn config() -> JobsConfig {
    let mut c = JobsConfig::new(NS);
    c.templates.insert(
        "train".into(),
        JobTemplate {
            image: "ghcr.io/example/trainer:1.2".into(),
            command: vec!["python".into(), "train.py".into()],
        },
    );
    c.templates.insert(
        "infer".into(),
        JobTemplate {
            image: "ghcr.io/example/infer:3".into(),
            command: vec![],
        },
    );
    c.shm_size = Some("16Gi".into());
    c.cpu_request = Some("4".into());
    c.memory_request = Some("32Gi".into());
    c.extra_labels.insert("team".into(), "vision".into());
    c
}

fn launch(kind: &str, payload: Value) -> Launch {
    Launch {
        task_id: "Task_01".into(),
        pool: "gpu".into(),
        attempt: 2,
        kind: kind.into(),
        payload,
        labels: BTreeMap::new(),
        gpus: 2,
        gpu_memory_mib: Some(40960),
        gpu_product: Some("NVIDIA-A100-SXM4-80GB".into()),
        devices: vec![],
        timeout: Duration::from_millis(90_500),
        cancel: CancellationToken::new(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    }
}

fn backend(cluster: &Shared) -> (JobBackend, JoinHandle<()>) {
    let (client, api) = fake_api(cluster.clone());
    (JobBackend::new(client, config()), api)
}

/// The Job of `l` under `config()` as JSON (what `JobBackend::job_for` returns; pure, so no
/// client or runtime needed).
fn job_json(l: &Launch) -> Value {
    serde_json::to_value(spec::build(&config(), l).unwrap()).unwrap()
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn with_condition(kind: &'static str, reason: &'static str, message: &'static str) -> Step {
    Step::Modify(Box::new(move |job: &mut Value| {
        job["status"] = json!({
            "startTime": "2025-01-01T00:00:00Z",
            "completionTime": if kind == "Complete" { json!("2025-01-01T00:01:40Z") } else { Value::Null },
            "conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}],
        });
    }))
}

/// `run` under a time limit, so that a test that goes wrong fails instead of hanging.
async fn run(b: &JobBackend, l: Launch) -> Result<Value, TaskError> {
    tokio::time::timeout(Duration::from_secs(20), b.run(l))
        .await
        .expect("run finished")
}

fn seen(cluster: &Shared) -> Vec<Seen> {
    cluster.lock().unwrap().seen.clone()
}

/// Every request the backend made is covered by the Role it documents.
fn assert_rbac(requests: &[Seen]) {
    for r in requests {
        let (resource, verb) = r.rbac();
        assert!(
            RBAC_RULES
                .iter()
                .any(|(_, res, verbs)| *res == resource && verbs.contains(&verb)),
            "{verb} {resource} is not in RBAC_RULES ({} {})",
            r.method,
            r.path
        );
    }
}

fn of(requests: &[Seen], method: Method) -> Vec<&Seen> {
    requests.iter().filter(|r| r.method == method).collect()
}

// ---------------------------------------------------------------------------------------------
// The Job spec.

#[test]
fn job_spec_carries_the_gpu_scheduling_and_task_fields() {
    let mut l = launch(
        "train",
        json!({"args": ["--lr", "0.1"], "data": "s3://b/k"}),
    );
    l.labels.insert("team".into(), "research".into());
    l.labels.insert("bad key!".into(), "skipped".into());
    let job = job_json(&l);
    let name = job_name("gpu", "Task_01", 2);
    assert_eq!(job["apiVersion"], "batch/v1");
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["metadata"]["name"], name.as_str());
    assert_eq!(job["metadata"]["namespace"], NS);
    let spec = &job["spec"];
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["completions"], 1);
    assert_eq!(spec["parallelism"], 1);
    assert_eq!(spec["activeDeadlineSeconds"], 91, "90.5 s rounded up");
    assert_eq!(spec["ttlSecondsAfterFinished"], 3600);
    assert_eq!(
        spec["podFailurePolicy"]["rules"][0],
        json!({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]})
    );

    // Labels and annotations, on the Job and on its pods.
    for meta in [&job["metadata"], &spec["template"]["metadata"]] {
        let labels = &meta["labels"];
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "taskbus-gpu-dispatcher"
        );
        assert_eq!(labels["app.kubernetes.io/part-of"], "taskbus");
        assert_eq!(labels["taskbus.dev/pool"], "gpu");
        assert_eq!(labels["taskbus.dev/attempt"], "2");
        assert_eq!(labels["taskbus.dev/task-id"], "Task_01");
        assert_eq!(labels["team"], "vision", "extra labels");
        assert_eq!(labels.as_object().unwrap().len(), 6);
        let ann = &meta["annotations"];
        assert_eq!(ann["taskbus.dev/task-id"], "Task_01");
        assert_eq!(ann["taskbus.dev/kind"], "train");
        assert_eq!(ann["taskbus.dev/label-team"], "research");
        assert_eq!(
            ann.as_object().unwrap().len(),
            3,
            "the invalid key is skipped"
        );
    }

    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(pod["serviceAccountName"].is_null());
    assert_eq!(pod["enableServiceLinks"], false);
    assert_eq!(
        pod["nodeSelector"],
        json!({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"})
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"],
        json!({"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40959"]}
        ]}]})
    );
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}])
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["name"], "task");
    assert_eq!(c["image"], "ghcr.io/example/trainer:1.2");
    assert_eq!(c["command"], json!(["python", "train.py"]));
    assert_eq!(c["args"], json!(["--lr", "0.1"]));
    assert_eq!(
        c["resources"],
        json!({"limits": {"nvidia.com/gpu": "2"}, "requests": {"cpu": "4", "memory": "32Gi"}})
    );
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "dshm", "mountPath": "/dev/shm"}])
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
    let env = env_of(c);
    assert_eq!(env["TASKBUS_TASK_ID"], "Task_01");
    assert_eq!(env["TASKBUS_POOL"], "gpu");
    assert_eq!(env["TASKBUS_ATTEMPT"], "2");
    assert_eq!(env["TASKBUS_KIND"], "train");
    let payload: Value = serde_json::from_str(&env["TASKBUS_PAYLOAD"]).unwrap();
    assert_eq!(payload, l.payload);
    assert_eq!(
        env["TRACEPARENT"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(env.len(), 6);
    assert!(!env.contains_key("NVIDIA_VISIBLE_DEVICES"));
    assert!(!env.contains_key("CUDA_VISIBLE_DEVICES"));
    // The Job round-trips through k8s-openapi's type (what the API server would get).
    let typed: Job = serde_json::from_value(job.clone()).unwrap();
    assert_eq!(serde_json::to_value(typed).unwrap(), job);
}

#[test]
fn job_spec_leaves_out_what_the_task_and_config_do_not_ask_for() {
    let mut l = launch("infer", json!({"prompt": "hi"}));
    l.gpu_product = None;
    l.gpu_memory_mib = None;
    l.gpus = 1;
    l.timeout = Duration::from_millis(10);
    let mut cfg = config();
    cfg.shm_size = None;
    cfg.cpu_request = None;
    cfg.memory_request = None;
    cfg.service_account = Some("gpu-runner".into());
    cfg.image_pull_secrets = vec!["regcred".into(), "other".into()];
    cfg.ttl_after_finished = Duration::from_secs(600);
    let job = serde_json::to_value(spec::build(&cfg, &l).unwrap()).unwrap();
    let pod = &job["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert!(c.get("command").is_none(), "the image's entrypoint: {c}");
    assert!(c.get("args").is_none(), "no task args: the image's CMD");
    assert_eq!(c["resources"], json!({"limits": {"nvidia.com/gpu": "1"}}));
    assert!(pod.get("nodeSelector").is_none());
    assert!(pod.get("affinity").is_none());
    assert_eq!(pod["volumes"][0]["emptyDir"], json!({"medium": "Memory"}));
    assert_eq!(pod["serviceAccountName"], "gpu-runner");
    assert!(
        pod.get("automountServiceAccountToken").is_none(),
        "a configured service account keeps its token"
    );
    assert_eq!(
        pod["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": "other"}])
    );
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 1, "at least 1 s");
    assert_eq!(job["spec"]["ttlSecondsAfterFinished"], 600);

    // Task args with an entrypoint image go to `args` alone.
    let l = launch("infer", json!({"args": ["--batch", "8"]}));
    let job = job_json(&l);
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    assert!(c.get("command").is_none());
    assert_eq!(c["args"], json!(["--batch", "8"]));
}

#[test]
fn hostile_task_ids_get_valid_names_labels_and_exact_annotations() {
    for id in [
        "A_".repeat(64),
        "_x_".into(),
        "-".repeat(128),
        "Z".repeat(128),
    ] {
        let mut l = launch("train", json!({}));
        l.task_id = id.clone();
        l.attempt = u32::MAX;
        let job = job_json(&l);
        let name = job["metadata"]["name"].as_str().unwrap();
        assert!(is_dns_label(name), "{name}");
        assert_eq!(name, job_name("gpu", &id, u32::MAX));
        let label = job["metadata"]["labels"]["taskbus.dev/task-id"]
            .as_str()
            .unwrap();
        assert!(
            names::is_label_value(label) && !label.is_empty(),
            "{label:?}"
        );
        assert_eq!(label, label_value(&id));
        assert_eq!(
            job["metadata"]["annotations"]["taskbus.dev/task-id"],
            id.as_str()
        );
        assert_eq!(
            job["metadata"]["labels"]["taskbus.dev/attempt"],
            "4294967295"
        );
    }
}

#[test]
fn task_labels_become_annotations_only_when_valid() {
    let mut l = launch("train", json!({}));
    for (k, v) in [
        ("owner", "ana".to_string()),
        ("cost.center", "42".to_string()),
        ("x".repeat(57).as_str(), "longest key".to_string()),
        ("x".repeat(58).as_str(), "too long".to_string()),
        ("ends-", "bad".to_string()),
        ("has/slash", "bad".to_string()),
        ("big", "v".repeat(5000)),
        ("spaces ok in values", "no".to_string()),
    ] {
        l.labels.insert(k.to_string(), v);
    }
    let job = job_json(&l);
    let ann = job["metadata"]["annotations"].as_object().unwrap();
    let copied: Vec<&str> = ann
        .keys()
        .filter_map(|k| k.strip_prefix("taskbus.dev/label-"))
        .collect();
    let longest = "x".repeat(57);
    let mut want = vec!["cost.center", longest.as_str(), "owner"];
    want.sort();
    assert_eq!(copied, want);
    assert_eq!(ann["taskbus.dev/label-owner"], "ana");
}

#[tokio::test]
async fn unknown_kind_bad_args_and_impossible_requests_are_fatal() {
    let b = JobBackend::new(
        kube::Client::new(mock::pair::<Request<Body>, Response<Body>>().0, NS),
        config(),
    );
    let e = b.job_for(&launch("render", json!({}))).unwrap_err();
    let TaskError::Fatal(msg) = e else {
        panic!("fatal expected: {e:?}")
    };
    assert!(msg.contains("\"render\""), "{msg}");
    assert!(
        msg.contains("infer, train"),
        "names the configured kinds: {msg}"
    );

    for payload in [
        json!({"args": "--lr 0.1"}),
        json!({"args": [1, 2]}),
        json!({"args": vec!["a"; MAX_ARGS + 1]}),
        json!({"blob": "x".repeat(300 * 1024)}),
    ] {
        let e = b.job_for(&launch("train", payload)).unwrap_err();
        assert!(matches!(e, TaskError::Fatal(_)), "{e:?}");
    }
    let mut l = launch("train", json!({}));
    l.gpus = 0;
    assert!(matches!(b.job_for(&l), Err(TaskError::Fatal(_))));
    let mut l = launch("train", json!({}));
    l.gpu_product = Some("NVIDIA A100 80GB".into());
    let e = b.job_for(&l).unwrap_err();
    assert!(e.to_string().contains("gpu_product"), "{e}");
}

#[test]
fn templates_parse_and_malformed_ones_are_refused() {
    assert_eq!(
        parse_template("train=ghcr.io/example/trainer:latest").unwrap(),
        (
            "train".into(),
            JobTemplate {
                image: "ghcr.io/example/trainer:latest".into(),
                command: vec![]
            }
        )
    );
    assert_eq!(
        parse_template("  llm.infer=reg:5000/a/b@sha256:abc  python -m  serve --port=8 ").unwrap(),
        (
            "llm.infer".into(),
            JobTemplate {
                image: "reg:5000/a/b@sha256:abc".into(),
                command: vec![
                    "python".into(),
                    "-m".into(),
                    "serve".into(),
                    "--port=8".into()
                ]
            }
        )
    );
    // `=` after the first one belongs to the image (a digest never has one, but a tag could not
    // either; the API refuses the image then).
    assert_eq!(parse_template("k=i=j").unwrap().1.image, "i=j");
    let long_kind = format!("{}=img", "k".repeat(129));
    for bad in [
        "",
        "   ",
        "train",
        "=img",
        "train=",
        "train= img",
        "train =img",
        long_kind.as_str(),
        "tr\u{7}ain=img",
    ] {
        let e = parse_template(bad).unwrap_err();
        assert!(!e.is_empty(), "{bad:?}");
    }
    assert!(parse_template(&format!("{}=img", "k".repeat(128))).is_ok());
    assert!(
        parse_template("训练=img").is_ok(),
        "printable non-ASCII kinds are fine"
    );
}

#[test]
fn config_problems_are_reported() {
    assert_eq!(config().problems(), Vec::<String>::new());
    let mut c = config();
    c.namespace = "Bad_NS".into();
    c.shm_size = Some("16GB".into());
    c.cpu_request = Some("lots".into());
    c.service_account = Some("Not Valid".into());
    c.image_pull_secrets = vec!["ok".into(), "-no".into()];
    c.extra_labels.insert("taskbus.dev/pool".into(), "x".into());
    c.extra_labels.insert("k".into(), "bad value!".into());
    c.templates.insert(
        "x".into(),
        JobTemplate {
            image: "".into(),
            command: vec![],
        },
    );
    let p = c.problems().join("\n");
    for want in [
        "namespace \"Bad_NS\"",
        "shm size \"16GB\"",
        "CPU request \"lots\"",
        "service account",
        "image pull secret \"-no\"",
        "clash",
        "extra label k=",
        "Job template \"x\": the image is empty",
    ] {
        assert!(p.contains(want), "{want} not in:\n{p}");
    }
    assert!(JobsConfig::new("ns").problems()[0].contains("no Job template"));
    for q in [
        "1", "16Gi", "500m", "0.5", "1e3", "2E-2", "+1", ".5", "1.5Gi",
    ] {
        assert!(is_quantity(q), "{q}");
    }
    for q in ["", "Gi", "16GB", "1.2.3", "1e", "m5", "16 Gi"] {
        assert!(!is_quantity(q), "{q}");
    }
}

// ---------------------------------------------------------------------------------------------
// run(): create, watch, outcome.

#[tokio::test]
async fn run_creates_the_job_watches_it_and_reports_completion() {
    let cluster = Shared::default();
    cluster.lock().unwrap().watches.extend([
        // First a status update that is not an end, then the end.
        Step::Modify(Box::new(|j: &mut Value| {
            j["status"] = json!({"active": 1, "startTime": "2025-01-01T00:00:00Z"})
        })),
        with_condition(
            "Complete",
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        ),
    ]);
    let (b, api) = backend(&cluster);
    let l = launch("train", json!({"args": ["--epochs", "3"]}));
    let want_body = serde_json::to_value(b.job_for(&l).unwrap()).unwrap();
    let name = job_name("gpu", "Task_01", 2);

    let out = run(&b, l).await.unwrap();
    assert_eq!(
        out,
        json!({"job": name, "namespace": NS, "adopted": false,
               "start_time": "2025-01-01T00:00:00Z", "completion_time": "2025-01-01T00:01:40Z",
               "duration_s": 100})
    );

    let reqs = seen(&cluster);
    assert_rbac(&reqs);
    let posts = of(&reqs, Method::POST);
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].path, JOBS);
    assert_eq!(
        posts[0].body, want_body,
        "the Job of job_for is what is created"
    );
    // The watcher lists by name, then watches from the list's resourceVersion, by name.
    let gets = of(&reqs, Method::GET);
    let selector = format!("metadata.name={name}");
    assert!(gets.len() >= 3, "{gets:?}");
    assert!(!gets[0].is_watch(), "a list first: {:?}", gets[0]);
    for g in &gets {
        assert_eq!(g.path, JOBS);
        assert_eq!(g.query["fieldSelector"], selector);
    }
    let watches: Vec<&&Seen> = gets.iter().filter(|g| g.is_watch()).collect();
    assert_eq!(watches.len(), 2, "watched again after each response ended");
    assert_eq!(
        watches[0].query["resourceVersion"], "1",
        "the list's version"
    );
    assert_eq!(
        watches[1].query["resourceVersion"], "2",
        "the last event's version"
    );
    assert!(
        of(&reqs, Method::DELETE).is_empty(),
        "a finished Job is left to its TTL"
    );
    api.abort();
}

#[tokio::test]
async fn a_job_past_its_deadline_is_a_retryable_failure_with_the_reason() {
    let cluster = Shared::default();
    cluster.lock().unwrap().watches.push_back(with_condition(
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    ));
    let (b, api) = backend(&cluster);
    let name = job_name("gpu", "Task_01", 2);
    let e = run(&b, launch("train", json!({}))).await.unwrap_err();
    let TaskError::Retryable(msg) = &e else {
        panic!("retryable expected: {e:?}")
    };
    assert!(msg.contains("DeadlineExceeded"), "{msg}");
    assert!(
        msg.contains("active longer than specified deadline"),
        "{msg}"
    );
    assert!(msg.contains(&name), "{msg}");
    let reqs = seen(&cluster);
    assert_rbac(&reqs);
    // The pods were asked about, by the Job controller's label.
    let pods: Vec<&Seen> = reqs.iter().filter(|r| r.path == PODS).collect();
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pods[0].query["labelSelector"],
        format!("batch.kubernetes.io/job-name={name}")
    );
    assert!(of(&reqs, Method::DELETE).is_empty());
    api.abort();
}

#[tokio::test]
async fn a_failed_container_is_reported_with_its_exit_code_and_last_words() {
    let cluster = Shared::default();
    let name = job_name("gpu", "Task_01", 2);
    {
        let mut c = cluster.lock().unwrap();
        c.watches.push_back(with_condition(
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ));
        c.pods.push(json!({
            "metadata": {"name": format!("{name}-x7k2p"), "namespace": NS,
                         "labels": {"batch.kubernetes.io/job-name": name}},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "task", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"terminated": {"exitCode": 3, "reason": "Error",
                          "message": "RuntimeError: CUDA out of memory\n"}}}]}
        }));
        // Another Job's pod is not mentioned.
        c.pods.push(json!({
            "metadata": {"name": "other-abcde", "namespace": NS,
                         "labels": {"batch.kubernetes.io/job-name": "other"}},
            "status": {"phase": "Failed", "reason": "Evicted", "message": "nope"}
        }));
    }
    let (b, api) = backend(&cluster);
    let e = run(&b, launch("train", json!({}))).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TaskError::Retryable(_)), "{e:?}");
    assert!(msg.contains("BackoffLimitExceeded"), "{msg}");
    assert!(msg.contains("exited with code 3 (Error)"), "{msg}");
    assert!(msg.contains("CUDA out of memory"), "{msg}");
    assert!(!msg.contains("Evicted"), "{msg}");
    api.abort();
}

#[tokio::test]
async fn a_redelivered_attempt_adopts_its_existing_job() {
    let cluster = Shared::default();
    let l = launch("train", json!({}));
    let name = job_name("gpu", "Task_01", 2);
    // The Job of this very attempt, created by a dispatcher that died, finished meanwhile.
    let mut existing = job_json(&l);
    existing["metadata"]["resourceVersion"] = "1".into();
    existing["status"] = json!({"startTime": "2025-01-01T00:00:00Z",
        "completionTime": "2025-01-01T00:00:10Z",
        "conditions": [{"type": "Complete", "status": "True"}]});
    {
        let mut c = cluster.lock().unwrap();
        c.rv = 1;
        c.jobs.insert(name.clone(), existing);
    }
    let (b, api) = backend(&cluster);
    let out = run(&b, l).await.unwrap();
    assert_eq!(out["adopted"], true);
    assert_eq!(out["job"], name.as_str());
    assert_eq!(out["duration_s"], 10);
    let reqs = seen(&cluster);
    assert_rbac(&reqs);
    assert_eq!(of(&reqs, Method::POST).len(), 1, "no second create");
    let gets = of(&reqs, Method::GET);
    assert_eq!(
        gets[0].path,
        format!("{JOBS}/{name}"),
        "read the existing Job"
    );
    assert!(
        gets[1..].iter().all(|g| g.path == JOBS && !g.is_watch()),
        "then the watcher's list, which already shows the end: {gets:?}"
    );
    assert!(of(&reqs, Method::DELETE).is_empty());
    api.abort();
}

#[tokio::test]
async fn a_foreign_job_under_the_same_name_is_not_adopted() {
    let cluster = Shared::default();
    let l = launch("train", json!({}));
    let name = job_name("gpu", "Task_01", 2);
    let mut other = job_json(&l);
    other["metadata"]["annotations"]["taskbus.dev/task-id"] = "someone-else".into();
    cluster.lock().unwrap().jobs.insert(name.clone(), other);
    let (b, api) = backend(&cluster);
    let e = run(&b, l).await.unwrap_err();
    assert!(matches!(e, TaskError::Fatal(_)), "{e:?}");
    assert!(e.to_string().contains("already exists"), "{e}");
    let reqs = seen(&cluster);
    assert!(reqs.iter().all(|r| !r.is_watch()), "not watched");
    assert!(of(&reqs, Method::DELETE).is_empty(), "not ours to delete");
    api.abort();
}

#[tokio::test]
async fn create_errors_are_fatal_or_retryable_by_status() {
    let forbidden = "jobs.batch is forbidden: User \"system:serviceaccount:taskbus:taskbus-gpu-dispatcher\" cannot create resource \"jobs\" in API group \"batch\" in the namespace \"gpu-jobs\"";
    let cases: [(u16, &str, &str, bool, &str); 6] = [
        (403, "Forbidden", forbidden, true, "RBAC"),
        (
            403,
            "Forbidden",
            "jobs.batch \"x\" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=2",
            false,
            "ResourceQuota",
        ),
        (422, "Invalid", "Job.batch \"x\" is invalid: spec.template.spec.volumes[0].emptyDir.sizeLimit: Invalid value", true, "invalid"),
        (404, "NotFound", "namespaces \"gpu-jobs\" not found", true, "does namespace gpu-jobs exist"),
        (500, "InternalError", "etcdserver: request timed out", false, "HTTP 500"),
        (429, "TooManyRequests", "too many requests", false, "busy"),
    ];
    for (code, reason, message, fatal, hint) in cases {
        let cluster = Shared::default();
        cluster.lock().unwrap().create_error = Some((code, reason, message.to_string()));
        let (b, api) = backend(&cluster);
        let e = run(&b, launch("train", json!({}))).await.unwrap_err();
        assert_eq!(matches!(e, TaskError::Fatal(_)), fatal, "{code}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains(message), "{code}: the API's message in {msg}");
        assert!(msg.contains(hint), "{code}: {hint} in {msg}");
        let reqs = seen(&cluster);
        assert_eq!(reqs.len(), 1, "{code}: only the create: {reqs:?}");
        api.abort();
    }
    // A dropped connection is retryable too.
    let cluster = Shared::default();
    cluster.lock().unwrap().create_disconnects = 1;
    let (b, api) = backend(&cluster);
    let e = run(&b, launch("train", json!({}))).await.unwrap_err();
    assert!(matches!(e, TaskError::Retryable(_)), "{e:?}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    api.abort();
}

#[tokio::test]
async fn cancel_deletes_the_job_with_its_pods() {
    let cluster = Shared::default();
    let (b, api) = backend(&cluster);
    let l = launch("train", json!({}));
    let cancel = l.cancel.clone();
    let name = job_name("gpu", "Task_01", 2);
    let running = tokio::spawn(async move { run(&b, l).await });
    // Wait for the watch to be open (held: the Job runs and nothing happens).
    for _ in 0..200 {
        if seen(&cluster).iter().any(Seen::is_watch) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen(&cluster).iter().any(Seen::is_watch), "watching");
    assert!(of(&seen(&cluster), Method::DELETE).is_empty());
    cancel.cancel();
    let e = running.await.unwrap().unwrap_err();
    assert!(matches!(e, TaskError::Retryable(_)), "{e:?}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    let reqs = seen(&cluster);
    assert_rbac(&reqs);
    let deletes = of(&reqs, Method::DELETE);
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].path, format!("{JOBS}/{name}"));
    assert_eq!(deletes[0].body["propagationPolicy"], "Background");
    assert!(cluster.lock().unwrap().jobs.is_empty());
    api.abort();

    // Cancelled before it starts: nothing is created.
    let cluster = Shared::default();
    let (b, api) = backend(&cluster);
    let l = launch("train", json!({}));
    l.cancel.cancel();
    assert!(matches!(run(&b, l).await, Err(TaskError::Retryable(_))));
    assert!(seen(&cluster).is_empty());
    api.abort();
}

#[tokio::test]
async fn a_job_deleted_by_someone_else_is_retryable() {
    // Seen as a DELETED event.
    let cluster = Shared::default();
    cluster.lock().unwrap().watches.push_back(Step::Delete);
    let (b, api) = backend(&cluster);
    let e = run(&b, launch("train", json!({}))).await.unwrap_err();
    assert!(matches!(e, TaskError::Retryable(_)), "{e:?}");
    assert!(e.to_string().contains("job was deleted"), "{e}");
    assert!(of(&seen(&cluster), Method::DELETE).is_empty());
    api.abort();

    // Missed while the watch was down: the watcher lists again and the Job is not there.
    let cluster = Shared::default();
    cluster
        .lock()
        .unwrap()
        .watches
        .push_back(Step::RemoveAndExpire);
    let (b, api) = backend(&cluster);
    let e = run(&b, launch("train", json!({}))).await.unwrap_err();
    assert!(e.to_string().contains("job was deleted"), "{e}");
    let lists = seen(&cluster)
        .into_iter()
        .filter(|r| r.method == Method::GET && !r.is_watch())
        .count();
    assert_eq!(lists, 2, "listed again after 410 Gone");
    api.abort();
}

#[tokio::test]
async fn watch_errors_are_retried() {
    let cluster = Shared::default();
    {
        let mut c = cluster.lock().unwrap();
        c.list_errors = 1;
        c.watches
            .push_back(with_condition("Complete", "CompletionsReached", ""));
    }
    let (b, api) = backend(&cluster);
    let out = run(&b, launch("train", json!({}))).await.unwrap();
    assert_eq!(out["adopted"], false);
    let lists = seen(&cluster)
        .into_iter()
        .filter(|r| r.method == Method::GET && !r.is_watch())
        .count();
    assert_eq!(lists, 2, "the failed list was retried");
    api.abort();
}

// ---------------------------------------------------------------------------------------------
// sweep().

fn swept_job(name: &str, pool: &str, task_id: Option<&str>, attempt: &str) -> Value {
    let mut ann = serde_json::Map::new();
    if let Some(id) = task_id {
        ann.insert("taskbus.dev/task-id".into(), id.into());
    }
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1",
            "labels": {"app.kubernetes.io/managed-by": "taskbus-gpu-dispatcher",
                       "taskbus.dev/pool": pool, "taskbus.dev/attempt": attempt,
                       "taskbus.dev/task-id": label_value(task_id.unwrap_or("x"))},
            "annotations": ann},
        "spec": {"template": {"spec": {"containers": []}}}
    })
}

#[tokio::test]
async fn sweep_deletes_only_jobs_of_attempts_that_are_no_longer_live() {
    let long_id = format!("{}_Z", "a".repeat(126));
    let cluster = Shared::default();
    {
        let mut c = cluster.lock().unwrap();
        for j in [
            swept_job("dead", "gpu", Some(&long_id), "1"),
            swept_job("live", "gpu", Some("t-live"), "1"),
            swept_job("unknown", "gpu", Some("t-unknown"), "1"),
            swept_job("watched", "gpu", Some("t-watched"), "1"),
            swept_job("no-annotation", "gpu", None, "1"),
            swept_job("bad-attempt", "gpu", Some("t-bad"), "one"),
            swept_job("other-pool", "cpu", Some("t-other"), "1"),
        ] {
            c.jobs
                .insert(j["metadata"]["name"].as_str().unwrap().into(), j);
        }
        let mut deleting = swept_job("deleting", "gpu", Some("t-deleting"), "1");
        deleting["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z".into();
        c.jobs.insert("deleting".into(), deleting);
        // Someone else's Job with a similar look but not our manager label.
        let mut foreign = swept_job("foreign", "gpu", Some("t-foreign"), "1");
        foreign["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "helm".into();
        c.jobs.insert("foreign".into(), foreign);
    }
    let (b, api) = backend(&cluster);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let watching: HashSet<String> = ["watched".to_string()].into();
    let live_answers: BTreeMap<String, Option<bool>> = [
        (long_id.clone(), Some(false)),
        ("t-live".to_string(), Some(true)),
        ("t-unknown".to_string(), None),
        ("t-watched".to_string(), Some(false)),
        ("t-deleting".to_string(), Some(false)),
        ("t-bad".to_string(), Some(false)),
        ("t-other".to_string(), Some(false)),
        ("t-foreign".to_string(), Some(false)),
    ]
    .into();
    let n = b
        .sweep("gpu", &watching, |task_id, attempt| {
            asked.lock().unwrap().push((task_id.clone(), attempt));
            let answer = live_answers[&task_id];
            async move { answer }
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
    let mut asked = asked.lock().unwrap().clone();
    asked.sort();
    assert_eq!(
        asked,
        vec![
            (long_id.clone(), 1),
            ("t-live".to_string(), 1),
            ("t-unknown".to_string(), 1)
        ],
        "the exact task id from the annotation; watched, deleting and unlabelled Jobs are not asked about"
    );
    let reqs = seen(&cluster);
    assert_rbac(&reqs);
    let lists = of(&reqs, Method::GET);
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0].path, JOBS);
    assert_eq!(
        lists[0].query["labelSelector"],
        "app.kubernetes.io/managed-by=taskbus-gpu-dispatcher,taskbus.dev/pool=gpu"
    );
    let deletes = of(&reqs, Method::DELETE);
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].path, format!("{JOBS}/dead"));
    assert_eq!(deletes[0].body["propagationPolicy"], "Background");
    let left: Vec<String> = cluster.lock().unwrap().jobs.keys().cloned().collect();
    assert!(!left.contains(&"dead".to_string()));
    assert_eq!(left.len(), 8);
    api.abort();
}

#[tokio::test]
async fn sweep_reports_a_failed_list() {
    let cluster = Shared::default();
    cluster.lock().unwrap().list_errors = 1;
    let (b, api) = backend(&cluster);
    let e = b
        .sweep("gpu", &HashSet::new(), |_, _| async { Some(false) })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("etcd is having a day"), "{e}");
    assert!(e.to_string().contains("gpu-jobs"), "{e}");
    api.abort();
}

/// The end of a dispatcher's shutdown grace leaves the Job running (the redelivered attempt
/// adopts it); a cancel or timeout deletes it.
#[tokio::test]
async fn shutdown_leaves_the_job_running_but_cancel_deletes_it() {
    let cluster = Shared::default();
    let (b, api) = backend(&cluster);
    let l = launch("train", json!({}));
    let (cancel, shutdown) = (l.cancel.clone(), CancellationToken::new());
    let sd = shutdown.clone();
    let b2 = b.clone();
    let running = tokio::spawn(async move { b2.run_attempt(l, sd).await });
    for _ in 0..200 {
        if seen(&cluster).iter().any(Seen::is_watch) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen(&cluster).iter().any(Seen::is_watch), "watching");
    // As the agent SDK does at the end of the grace: both tokens fire.
    shutdown.cancel();
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!running.is_finished(), "the attempt is left to be dropped");
    running.abort();
    assert!(of(&seen(&cluster), Method::DELETE).is_empty());
    assert_eq!(cluster.lock().unwrap().jobs.len(), 1, "the Job still runs");

    // The redelivered attempt adopts it; a cancel then deletes it.
    let l = launch("train", json!({}));
    let cancel = l.cancel.clone();
    let again = tokio::spawn(async move { b.run_attempt(l, CancellationToken::new()).await });
    for _ in 0..200 {
        if seen(&cluster).iter().filter(|s| s.is_watch()).count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    let e = tokio::time::timeout(Duration::from_secs(20), again)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    let reqs = seen(&cluster);
    assert_eq!(
        of(&reqs, Method::POST).len(),
        2,
        "one create, one 409 adopt"
    );
    assert_eq!(of(&reqs, Method::DELETE).len(), 1);
    assert!(cluster.lock().unwrap().jobs.is_empty());
    api.abort();
}
