//! The local backend: a task runs as a child process of the dispatcher, pinned to its GPUs.
//!
//! - The program comes from the dispatcher's configuration (`--exec KIND=PROGRAM [ARGS...]`),
//!   never from the task: a producer chooses a kind, not a command line. `payload.args` (an
//!   array of strings) is appended to the program's arguments; the whole payload is written to
//!   its stdin as JSON.
//! - Environment: the dispatcher's own, plus `CUDA_VISIBLE_DEVICES` and
//!   `NVIDIA_VISIBLE_DEVICES` (the GPUs given to the task, comma separated),
//!   `CUDA_DEVICE_ORDER=PCI_BUS_ID`, and `TASKBUS_TASK_ID`, `TASKBUS_POOL`, `TASKBUS_ATTEMPT`,
//!   `TASKBUS_KIND`, and `TRACEPARENT` when the task has one.
//! - The process runs in its own process group. On cancel or timeout the group gets SIGTERM,
//!   then SIGKILL after the kill grace (2 s); if the dispatcher drops the task (shutdown) the group
//!   gets SIGKILL at once. No grandchild outlives its task.
//! - Exit 0 succeeds with `{"exit_code", "gpus", "stdout", "stderr", "truncated"}` (the last
//!   `output_limit` bytes of each stream) and `"output"` when stdout is one JSON value. Any other
//!   exit fails the attempt (retryable) with the exit status and the end of stderr.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use taskbus_agent::TaskError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::launch::{payload_text, task_args, task_env, Launch};

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Program and leading arguments by task kind.
    pub programs: BTreeMap<String, Vec<String>>,
    /// Bytes kept of the end of stdout and of stderr each.
    pub output_limit: usize,
    /// Time between SIGTERM and SIGKILL when a task is cancelled or times out. The agent SDK
    /// waits 2 s for a stopped handler and then drops it (which SIGKILLs the group), so a
    /// longer grace has no effect inside an agent.
    pub kill_grace: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            programs: BTreeMap::new(),
            output_limit: 64 * 1024,
            kill_grace: Duration::from_secs(2),
        }
    }
}

/// Parse `KIND=PROGRAM [ARGS...]` (whitespace separated; no quoting: put a complex command in a
/// script).
pub fn parse_exec(spec: &str) -> Result<(String, Vec<String>), String> {
    let Some((kind, cmd)) = spec.split_once('=') else {
        return Err(format!(
            "{spec:?} is not KIND=PROGRAM [ARGS...], e.g. train=/opt/bin/train --fp16"
        ));
    };
    let kind = kind.trim();
    if kind.is_empty()
        || kind.len() > 128
        || kind.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "task kind {kind:?} must be 1 to 128 printable characters without spaces"
        ));
    }
    let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
    if argv.is_empty() {
        return Err(format!("--exec {kind}= names no program"));
    }
    Ok((kind.to_string(), argv))
}

/// Keeps the last `limit` bytes of a stream.
async fn tail<R: AsyncRead + Unpin>(mut r: R, limit: usize) -> (Vec<u8>, bool) {
    let mut kept: Vec<u8> = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > limit {
                    let cut = kept.len() - limit;
                    kept.drain(..cut);
                    truncated = true;
                }
            }
        }
    }
    (kept, truncated)
}

/// Signals a whole process group.
fn kill_group(pgid: u32, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        if pgid > 0 {
            // SAFETY: kill(2) with a negative pid signals the group; no memory is involved.
            unsafe {
                libc::kill(-pgid, signal);
            }
        }
    }
}

/// SIGKILLs the process group when dropped before the task ended (the dispatcher gave up on
/// the attempt), so nothing keeps running on GPUs that are handed to another task.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            kill_group(pgid, libc::SIGKILL);
        }
    }
}

/// Run one attempt to its end.
pub async fn run(config: &LocalConfig, l: Launch) -> Result<Value, TaskError> {
    let Some(program) = config.programs.get(&l.kind) else {
        let known: Vec<&str> = config.programs.keys().map(String::as_str).collect();
        return Err(TaskError::Fatal(format!(
            "no program for task kind {:?} on this dispatcher (it runs: {})",
            l.kind,
            known.join(", ")
        )));
    };
    let mut argv = program.clone();
    argv.extend(task_args(&l.payload)?);
    let stdin_text = payload_text(&l.payload)?;
    let devices = l.devices.join(",");
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(task_env(&l))
        .env("CUDA_VISIBLE_DEVICES", &devices)
        .env("NVIDIA_VISIBLE_DEVICES", &devices)
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if l.traceparent.is_none() {
        // Not the dispatcher's own, if it has one: the task is not part of that trace.
        cmd.env_remove("TRACEPARENT");
    }
    let mut child = cmd.spawn().map_err(|e| {
        TaskError::Retryable(format!(
            "cannot start {:?} for task kind {:?}: {e} (check --exec on this dispatcher)",
            argv[0], l.kind
        ))
    })?;
    let mut group = GroupGuard(child.id());
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A program that does not read its stdin closes it early: not an error.
            let _ = stdin.write_all(stdin_text.as_bytes()).await;
            let _ = stdin.shutdown().await;
        }
    };
    let limit = config.output_limit;
    let out = tail(child.stdout.take().expect("piped"), limit);
    let err = tail(child.stderr.take().expect("piped"), limit);
    let pgid = group.0;
    let (status, (stdout, out_cut), (stderr, err_cut), ()) = tokio::join!(
        async {
            let s = tokio::select! {
                status = child.wait() => Some(status),
                _ = l.cancel.cancelled() => None,
            };
            if s.is_none() {
                // Cancelled or timed out: ask the group to stop, then make it.
                if let Some(pgid) = pgid {
                    kill_group(pgid, libc::SIGTERM);
                }
                if tokio::time::timeout(config.kill_grace, child.wait())
                    .await
                    .is_err()
                {
                    if let Some(pgid) = pgid {
                        kill_group(pgid, libc::SIGKILL);
                    }
                    let _ = child.wait().await;
                }
            }
            s
        },
        out,
        err,
        feed
    );
    // The group leader has exited; stray members of its group are stopped with it.
    if let Some(pgid) = group.0.take() {
        kill_group(pgid, libc::SIGKILL);
    }
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let Some(status) = status else {
        return Err(TaskError::Retryable(
            "stopped: cancelled or timed out".into(),
        ));
    };
    let status =
        status.map_err(|e| TaskError::Retryable(format!("waiting for the process: {e}")))?;
    if status.success() {
        let mut result = json!({
            "exit_code": 0,
            "gpus": l.devices,
            "stdout": stdout,
            "stderr": stderr,
            "truncated": out_cut || err_cut,
        });
        if !out_cut {
            if let Ok(v) = serde_json::from_str::<Value>(stdout.trim()) {
                result["output"] = v;
            }
        }
        return Ok(result);
    }
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".into(),
    };
    let end: String = {
        let chars: Vec<char> = stderr.trim_end().chars().collect();
        chars[chars.len().saturating_sub(2000)..].iter().collect()
    };
    Err(TaskError::Retryable(if end.is_empty() {
        how
    } else {
        format!("{how}; stderr ends: {end}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskbus_agent::CancellationToken;

    fn launch(kind: &str, payload: Value, devices: &[&str]) -> Launch {
        Launch {
            task_id: "t-1".into(),
            pool: "gpu".into(),
            attempt: 2,
            kind: kind.into(),
            payload,
            labels: BTreeMap::new(),
            gpus: devices.len() as u32,
            gpu_memory_mib: None,
            gpu_product: None,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            timeout: Duration::from_secs(30),
            cancel: CancellationToken::new(),
            traceparent: None,
        }
    }

    /// A shell script as the program of `kind` (`--exec` has no quoting).
    fn config(dir: &tempfile::TempDir, programs: &[(&str, &str)]) -> LocalConfig {
        use std::os::unix::fs::PermissionsExt;
        LocalConfig {
            programs: programs
                .iter()
                .map(|(k, body)| {
                    let path = dir.path().join(k);
                    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                    parse_exec(&format!("{k}={}", path.display())).unwrap()
                })
                .collect(),
            output_limit: 1024,
            kill_grace: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn runs_pinned_to_its_gpus() {
        let script = r#"echo "{\"gpus\":\"$CUDA_VISIBLE_DEVICES\",\"task\":\"$TASKBUS_TASK_ID\",\"attempt\":$TASKBUS_ATTEMPT,\"args\":\"$*\",\"stdin\":$(cat)}""#;
        let dir = tempfile::tempdir().unwrap();
        let c = config(&dir, &[("probe", script)]);
        let r = run(
            &c,
            launch("probe", json!({"args": ["a", "b"], "x": 1}), &["1", "3"]),
        )
        .await
        .unwrap();
        assert_eq!(r["exit_code"], 0);
        assert_eq!(r["gpus"], json!(["1", "3"]));
        let out = &r["output"];
        assert_eq!(out["gpus"], "1,3", "{r}");
        assert_eq!(out["task"], "t-1");
        assert_eq!(out["attempt"], 2);
        assert_eq!(out["args"], "a b");
        assert_eq!(out["stdin"], json!({"args": ["a", "b"], "x": 1}));
    }

    #[tokio::test]
    async fn the_task_gets_its_traceparent_when_it_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(
            &dir,
            &[("tp", r#"echo "{\"tp\":\"${TRACEPARENT-unset}\"}""#)],
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut l = launch("tp", json!({}), &["0"]);
        l.traceparent = Some(tp.into());
        let r = run(&c, l).await.unwrap();
        assert_eq!(r["output"]["tp"], tp, "{r}");
        let r = run(&c, launch("tp", json!({}), &["0"])).await.unwrap();
        assert_eq!(r["output"]["tp"], "unset", "{r}");
    }

    #[tokio::test]
    async fn failure_carries_exit_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(&dir, &[("bad", "echo out; echo boom >&2; exit 3")]);
        let e = run(&c, launch("bad", json!({}), &["0"])).await.unwrap_err();
        assert!(matches!(e, TaskError::Retryable(_)));
        let text = e.to_string();
        assert!(
            text.contains("exit status 3") && text.contains("boom"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(&dir, &[("loud", "head -c 100000 /dev/zero | tr '\\0' x")]);
        let r = run(&c, launch("loud", json!({}), &["0"])).await.unwrap();
        assert_eq!(r["stdout"].as_str().unwrap().len(), 1024);
        assert_eq!(r["truncated"], true);
        assert!(r.get("output").is_none());
    }

    #[tokio::test]
    async fn refuses_what_the_task_may_not_choose() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(&dir, &[("ok", "true")]);
        let e = run(&c, launch("rm", json!({}), &["0"])).await.unwrap_err();
        assert!(matches!(e, TaskError::Fatal(_)));
        assert!(e.to_string().contains("it runs: ok"), "{e}");
        let e = run(&c, launch("ok", json!({"args": "; rm -rf /"}), &["0"]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("array of strings"), "{e}");
        let c = LocalConfig {
            programs: [parse_exec("missing=/nonexistent/program").unwrap()].into(),
            ..LocalConfig::default()
        };
        let e = run(&c, launch("missing", json!({}), &["0"]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot start"), "{e}");
        for bad in ["", "noequals", "=prog", "k=", "a b=prog", "k=   "] {
            assert!(parse_exec(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_exec("train=python3  /app/train.py --fp16").unwrap(),
            (
                "train".into(),
                vec!["python3".into(), "/app/train.py".into(), "--fp16".into()]
            )
        );
    }

    /// Cancelling stops the whole process group, grandchildren included, even one that ignores
    /// SIGTERM.
    #[tokio::test]
    async fn cancel_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "trap '' TERM\nsleep 30 &\necho $! > {}\nwait",
            pidfile.display()
        );
        let c = config(&dir, &[("stuck", &script)]);
        let l = launch("stuck", json!({}), &["0"]);
        let cancel = l.cancel.clone();
        let task = tokio::spawn(async move { run(&c, l).await });
        let mut grandchild = None;
        for _ in 0..100 {
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = s.trim().parse::<i32>() {
                    grandchild = Some(p);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grandchild = grandchild.expect("the script started");
        cancel.cancel();
        let e = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stopped within the kill grace")
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
        let mut gone = false;
        for _ in 0..50 {
            // Gone, or a zombie waiting to be reaped (its parent was killed too).
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            if stat.map_or(true, |s| s.split_whitespace().nth(2) == Some("Z")) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "grandchild {grandchild} still runs");
    }
}
