//! The GPU dispatcher's local backend against a real nats-server, PostgreSQL and coordinator,
//! with declared GPUs (CI has none): tasks run pinned to their GPUs, a GPU is never given to two
//! tasks at once, unplaceable tasks fail with the reason, cancel kills the process and frees its
//! GPUs, and the binary refuses bad flags.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use taskbus_agent::CancellationToken;
use taskbus_gpu_dispatcher::allocator::PoolQuota;
use taskbus_gpu_dispatcher::dispatcher::{self, Backend, DispatcherConfig, GpuSource};
use taskbus_gpu_dispatcher::inventory;
use taskbus_gpu_dispatcher::local::{parse_exec, LocalConfig};
use taskbus_proto::PoolSettings;
use taskbus_runtime::devservers::free_port;
use taskbus_tests::stack::Stack;
use taskbus_tests::{ask, eventually, http_get, workspace_bin};

const T: Duration = Duration::from_secs(40);

/// A script that logs `<task> <gpus> <start ns> <end ns>` to `dir/<task>.log`, sleeps for
/// `payload.ms` (default 300) and prints its GPUs as JSON.
fn probe_script(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("probe.sh");
    let body = format!(
        r#"#!/bin/sh
start=$(date +%s%N)
echo $$ > {dir}/$TASKBUS_TASK_ID.pid
ms=$(cat | sed -n 's/.*"ms":\([0-9]*\).*/\1/p')
sleep $(awk "BEGIN {{print ${{ms:-300}}/1000}}")
echo "$TASKBUS_TASK_ID $CUDA_VISIBLE_DEVICES $start $(date +%s%N)" > {dir}/$TASKBUS_TASK_ID.log
echo "{{\"gpus\":\"$CUDA_VISIBLE_DEVICES\"}}"
"#,
        dir = dir.display()
    );
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("probe={}", path.display())
}

fn dispatcher_config(s: &Stack, dir: &Path, gpus: u32, pools: Vec<PoolQuota>) -> DispatcherConfig {
    let local = LocalConfig {
        programs: [parse_exec(&probe_script(dir)).unwrap()]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        ..LocalConfig::default()
    };
    let mut c = DispatcherConfig::new(s.nats.url(), pools, Backend::Local(local));
    c.agent_id = "gpu-node-1".into();
    c.gpus = GpuSource::Declared(inventory::declared(gpus, Some("NVIDIA-A10"), Some(23_028)));
    c.grace = Duration::from_secs(5);
    c
}

fn pool(name: &str, quota: Option<u32>) -> PoolQuota {
    PoolQuota {
        pool: name.into(),
        quota,
    }
}

async fn gpu_pools(s: &Stack, names: &[&str]) {
    for name in names {
        s.set_pool(
            name,
            PoolSettings {
                ack_wait_ms: 2_000,
                ..Default::default()
            },
        )
        .await;
    }
}

/// `(gpus, start, end)` of each finished task from the probe's logs.
fn runs(dir: &Path) -> BTreeMap<String, (Vec<String>, u128, u128)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap();
            let f: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(f.len(), 4, "{text}");
            out.insert(
                f[0].to_string(),
                (
                    f[1].split(',').map(str::to_string).collect(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                ),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_tasks_run_pinned_and_never_share_a_gpu() {
    let s = Stack::new(30_000).await;
    gpu_pools(&s, &["gpu", "gpu-batch"]).await;
    let (_coord, _ct) = s.coordinator().await;
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let mut c = dispatcher_config(
        &s,
        dir.path(),
        3,
        vec![pool("gpu", None), pool("gpu-batch", Some(1))],
    );
    c.http_listen = Some(metrics_addr);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(dispatcher::run(c, shutdown.clone()));

    // 10 tasks asking for 1, 2 or 3 GPUs, on two pools; batch may hold one GPU at a time.
    let mut want = BTreeMap::new();
    for i in 0..10u32 {
        let (p, gpus) = if i % 3 == 2 {
            ("gpu-batch", 1)
        } else {
            ("gpu", 1 + i % 3)
        };
        let id = format!("g{i}");
        let gpus = if i == 6 { 3 } else { gpus };
        s.submit(
            p,
            json!({"kind": "probe", "id": id, "payload": {"ms": 200},
                   "resources": {"gpus": gpus, "gpu_product": "NVIDIA A10"}}),
        )
        .await;
        want.insert(id, (p, gpus));
    }
    // Never placeable here: more GPUs than exist, over the pool's quota, another product,
    // more memory; and a kind with no program.
    for (id, p, res, kind) in [
        ("too-many", "gpu", json!({"gpus": 4}), "probe"),
        ("over-quota", "gpu-batch", json!({"gpus": 2}), "probe"),
        (
            "wrong-product",
            "gpu",
            json!({"gpu_product": "NVIDIA-H100-80GB-HBM3"}),
            "probe",
        ),
        ("too-big", "gpu", json!({"gpu_memory_mib": 40_000}), "probe"),
        ("no-program", "gpu", json!({"gpus": 1}), "rm-rf"),
    ] {
        s.submit(
            p,
            json!({"kind": kind, "id": id, "resources": res, "max_attempts": 3}),
        )
        .await;
    }
    for id in want.keys() {
        let t = s.wait_status(id, "succeeded", T).await;
        let r = t.result.clone().unwrap();
        assert_eq!(r["exit_code"], 0, "{r}");
        assert_eq!(t.agent_id.as_deref(), Some("gpu-node-1"));
    }
    for (id, text) in [
        ("too-many", "asks for 4 GPU(s)"),
        ("over-quota", "at most 1 at once"),
        ("wrong-product", "NVIDIA-H100-80GB-HBM3"),
        ("too-big", "at least 40000 MiB"),
        ("no-program", "no program for task kind"),
    ] {
        let t = s.wait_status(id, "dead", T).await;
        let err = t.error.clone().unwrap_or_default();
        assert!(err.contains(text), "{id}: {err}");
        assert_eq!(t.attempt, 1, "{id}: failed for good at once, not retried");
    }

    // From the probes' own logs: each task got as many distinct GPUs as it asked for, and no
    // two tasks held a GPU at overlapping times; batch never ran two at once.
    let runs = runs(dir.path());
    assert_eq!(runs.len(), want.len(), "{runs:?}");
    for (id, (gpus, _, _)) in &runs {
        let mut distinct = gpus.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len() as u32, want[id].1, "{id}: {gpus:?}");
        assert!(gpus.iter().all(|g| ["0", "1", "2"].contains(&g.as_str())));
    }
    let list: Vec<_> = runs.iter().collect();
    for (i, (a, (ga, sa, ea))) in list.iter().enumerate() {
        for (b, (gb, sb, eb)) in &list[i + 1..] {
            let overlap = sa < eb && sb < ea;
            if overlap {
                assert!(
                    ga.iter().all(|g| !gb.contains(g)),
                    "{a} {ga:?} and {b} {gb:?} shared a GPU at the same time"
                );
                assert!(
                    !(want[*a].0 == "gpu-batch" && want[*b].0 == "gpu-batch"),
                    "{a} and {b} ran at once over batch's quota of 1"
                );
            }
        }
    }
    // The 3-GPU task had the machine to itself, so GPUs were really shared out in turn.
    let (_, s6, e6) = &runs["g6"];
    assert!(runs
        .iter()
        .filter(|(id, _)| *id != "g6")
        .all(|(_, (_, s, e))| e <= s6 || s >= e6));

    let (code, page) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(page.contains("taskbus_gpu_gpus 3"), "{page}");
    assert!(
        page.contains(r#"taskbus_gpu_gpus_in_use{pool="gpu"} 0"#),
        "{page}"
    );
    assert!(
        page.contains(r#"taskbus_agent_tasks_total{pool="gpu",outcome="succeeded"} 7"#),
        "{page}"
    );
    shutdown.cancel();
    run.await.unwrap().expect("dispatcher stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_process_and_frees_its_gpu() {
    let s = Stack::new(30_000).await;
    gpu_pools(&s, &["gpu"]).await;
    let (_coord, _ct) = s.coordinator().await;
    let dir = tempfile::tempdir().unwrap();
    let c = dispatcher_config(&s, dir.path(), 1, vec![pool("gpu", None)]);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(dispatcher::run(c, shutdown.clone()));

    s.submit(
        "gpu",
        json!({"kind": "probe", "id": "long", "payload": {"ms": 60_000}}),
    )
    .await;
    // Waits for the only GPU (pulled only once it is free, or held at the head of the line).
    s.submit(
        "gpu",
        json!({"kind": "probe", "id": "next", "payload": {"ms": 10}}),
    )
    .await;
    s.wait_status("long", "running", T).await;
    let pid: i32 = eventually("the probe's pid", T, || async {
        std::fs::read_to_string(dir.path().join("long.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.task("next").await.unwrap().status,
        "queued",
        "the second task must not start while the only GPU is busy"
    );
    let reply = ask(
        &s.client,
        &s.subjects.api("task.cancel"),
        serde_json::to_vec(&json!({"id": "long"})).unwrap(),
    )
    .await
    .expect("cancel answered");
    assert!(reply.get("ok").is_some(), "{reply}");
    s.wait_status("long", "cancelled", T).await;
    eventually("the cancelled process to be gone", T, || async {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        stat.map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
            .then_some(())
    })
    .await;
    let t = s.wait_status("next", "succeeded", T).await;
    assert_eq!(t.result.unwrap()["gpus"], json!(["0"]));
    shutdown.cancel();
    run.await.unwrap().expect("dispatcher stops cleanly");
}

/// Run the dispatcher binary with `args` and `env` (and a NATS URL nothing listens on), expect
/// it to fail, and return what it printed on stderr.
async fn refused(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .args([
            "--nats-url",
            "nats://127.0.0.1:1",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env_remove("TASKBUS_POOLS")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{args:?} {env:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_refuses_bad_flags_with_advice() {
    let bin = workspace_bin("taskbus-gpu-dispatcher");
    let cases: &[(&[&str], &str)] = &[
        (&["--exec", "x=/bin/true"], "--pool"),
        (
            &["--pool", "GPU", "--exec", "x=/bin/true"],
            "not a valid pool name",
        ),
        (&["--pool", "gpu=0", "--exec", "x=/bin/true"], "quota 0"),
        (&["--pool", "gpu", "--exec", "nocommand"], "KIND=PROGRAM"),
        (&["--pool", "gpu", "--gpus", "2"], "--exec"),
        (
            &[
                "--pool",
                "gpu",
                "--backend",
                "kubernetes",
                "--job-template",
                "t=img",
            ],
            "needs --gpus",
        ),
        (
            &["--pool", "gpu", "--backend", "kubernetes", "--gpus", "2"],
            "template",
        ),
        (
            &[
                "--pool",
                "gpu",
                "--gpus",
                "2",
                "--exec",
                "x=/bin/true",
                "--job-template",
                "t=img",
            ],
            "--job-template is for --backend kubernetes",
        ),
        (
            &[
                "--pool",
                "gpu",
                "--gpu-product",
                "A10",
                "--exec",
                "x=/bin/true",
            ],
            "--gpus",
        ),
        (
            &["--pool", "gpu", "--gpus", "0", "--exec", "x=/bin/true"],
            "0",
        ),
    ];
    for (args, text) in cases {
        let err = refused(&bin, args, &[]).await;
        assert!(err.contains(text), "{args:?}: {err}");
    }
    // The variables take several entries, and are checked the same way.
    let env = [
        ("TASKBUS_POOLS", "gpu,batch=2"),
        ("TASKBUS_EXEC", "a=/bin/true --x;b"),
    ];
    let err = refused(&bin, &[], &env).await;
    assert!(err.contains("\"b\" is not KIND=PROGRAM"), "{err}");
    // Without a driver and without --gpus, NVML's absence is explained (on a GPU machine the
    // dispatcher would find its GPUs and then fail to reach NATS instead).
    let err = refused(&bin, &["--pool", "gpu", "--exec", "x=/bin/true"], &[]).await;
    assert!(
        err.contains("NVML") || err.contains("NATS") || err.contains("nats"),
        "{err}"
    );
    let help = tokio::process::Command::new(&bin)
        .arg("--help")
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in [
        "--exec",
        "--job-template",
        "CUDA_VISIBLE_DEVICES",
        "Examples",
    ] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

/// `taskbus dev --gpus 2` against servers someone else started: the demo GPU pool runs tasks on
/// its declared GPUs next to the echo agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taskbus_dev_runs_a_gpu_pool() {
    let s = Stack::new(30_000).await;
    let mut dev = s.taskbus_dev([
        "--agents",
        "1",
        "--demo-rate",
        "0",
        "--gpus",
        "2",
        "--duration",
        "60",
    ]);
    s.submit("default", json!({"kind": "echo", "id": "e1", "payload": 1}))
        .await;
    s.submit(
        "gpu",
        json!({"kind": "gpu-env", "id": "dev-g1", "resources": {"gpus": 2}}),
    )
    .await;
    s.submit(
        "gpu",
        json!({"kind": "sleep", "id": "dev-g2", "payload": {"args": ["0.1"]}}),
    )
    .await;
    s.wait_status("e1", "succeeded", T).await;
    let t = s.wait_status("dev-g1", "succeeded", T).await;
    assert_eq!(
        t.result.unwrap()["stdout"],
        "0,1\ndev-g1\n1\n",
        "CUDA_VISIBLE_DEVICES, task id, attempt"
    );
    s.wait_status("dev-g2", "succeeded", T).await;
    // The CLI's GPU flags: `taskbus submit --gpus 2 --wait` prints the outcome.
    let out = tokio::process::Command::new(workspace_bin("taskbus"))
        .args(["--nats-url", &s.nats.url(), "submit", "--pool", "gpu"])
        .args([
            "--kind",
            "gpu-env",
            "--gpus",
            "2",
            "--gpu-product",
            "dev-gpu",
            "--wait",
            "--json",
        ])
        .env_remove("TASKBUS_PREFIX")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(r#"0,1\n"#), "{text}");
    let out = tokio::process::Command::new(workspace_bin("taskbus"))
        .args(["--nats-url", &s.nats.url(), "submit", "--pool", "gpu"])
        .args(["--kind", "gpu-env", "--gpus", "0"])
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "--gpus 0 is refused before anything is sent"
    );
    // SIGTERM: everything drains and the process exits 0.
    let pid = dev.id().unwrap() as i32;
    // SAFETY: signalling a child we own.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(T, dev.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
}

/// A task waiting for GPUs when the dispatcher shuts down is handed back at once (not held for
/// the grace period) and another dispatcher runs it; the running task finishes in the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_a_task_waiting_for_gpus() {
    let s = Stack::new(30_000).await;
    gpu_pools(&s, &["gpu"]).await;
    let (_coord, _ct) = s.coordinator().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = dispatcher_config(&s, dir.path(), 2, vec![pool("gpu", None)]);
    a.agent_id = "node-a".into();
    let stop_a = CancellationToken::new();
    let run_a = tokio::spawn(dispatcher::run(a, stop_a.clone()));
    s.submit(
        "gpu",
        json!({"kind": "probe", "id": "one", "payload": {"ms": 2500}}),
    )
    .await;
    s.wait_status("one", "running", T).await;
    // Asks for both GPUs while one is busy: pulled (a GPU is free) and held at the head of
    // the line.
    s.submit(
        "gpu",
        json!({"kind": "probe", "id": "two", "payload": {"ms": 10}, "resources": {"gpus": 2}}),
    )
    .await;
    let (_, page_ok) = eventually("`two` to wait for GPUs", T, || async {
        let st = s.task("two").await?;
        (st.status == "queued").then_some(((), true))
    })
    .await;
    assert!(page_ok);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_a.cancel();
    let mut b = dispatcher_config(&s, dir.path(), 2, vec![pool("gpu", None)]);
    b.agent_id = "node-b".into();
    let stop_b = CancellationToken::new();
    let run_b = tokio::spawn(dispatcher::run(b, stop_b.clone()));
    let two = s.wait_status("two", "succeeded", T).await;
    assert_eq!(two.agent_id.as_deref(), Some("node-b"));
    assert_eq!(two.attempt, 1, "handed back, not failed");
    let one = s.wait_status("one", "succeeded", T).await;
    assert_eq!(
        one.agent_id.as_deref(),
        Some("node-a"),
        "finished within the grace"
    );
    run_a.await.unwrap().expect("a stops cleanly");
    stop_b.cancel();
    run_b.await.unwrap().expect("b stops cleanly");
}
