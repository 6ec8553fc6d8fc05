//! The `taskbus-scaler` binary: flags, environment variables, hostile values, `simulate`.

mod common;

use std::process::{Command, Output};

fn scaler(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taskbus-scaler"))
        .args(args)
        .env_remove("TASKBUS_NATS_URL")
        .env_remove("TASKBUS_HTTP_TLS_CERT")
        .env_remove("TASKBUS_HTTP_TLS_KEY")
        .env_remove("TASKBUS_GRPC_TLS_CERT")
        .env_remove("TASKBUS_GRPC_TLS_KEY")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn trace(name: &str) -> String {
    format!("{}/traces/{name}", common::manifest_dir().display())
}

#[test]
fn help_documents_flags_and_environment() {
    let o = scaler(&["--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for want in [
        "--nats-url",
        "TASKBUS_NATS_URL",
        "--grpc-listen",
        "TASKBUS_GRPC_LISTEN",
        "--http-listen",
        "TASKBUS_HTTP_LISTEN",
        "--direct",
        "TASKBUS_SCALE_DOWN_COOLDOWN_S",
        "--http-tls-cert",
        "TASKBUS_GRPC_TLS_CERT",
        "simulate",
        "external-push",
    ] {
        assert!(t.contains(want), "--help lacks {want}:\n{t}");
    }
}

#[test]
fn hostile_flags_are_refused_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["--grpc-listen", "not-an-address"], "--grpc-listen"),
        (&["--http-listen", "127.0.0.1:99999"], "--http-listen"),
        (&["--refresh-ms", "0"], "--refresh-ms"),
        (&["--refresh-ms", "-5"], "unexpected argument '-5'"),
        (&["--refresh-ms", "99999999999999999999999"], "--refresh-ms"),
        (&["--smoothing-s", "0"], "--smoothing-s"),
        (&["--stream-replicas", "9"], "--stream-replicas"),
        (&["--http-tls-cert", "/tmp/x.pem"], "--http-tls-key"),
        (&["--grpc-tls-key", "/tmp/x.pem"], "--grpc-tls-cert"),
        (
            &["--direct", "--namespace", "Not/A/Namespace"],
            "not a valid namespace",
        ),
        (&["--max-step-up", "many"], "--max-step-up"),
        (&["simulate"], "--trace"),
        (
            &["simulate", "--trace", "/nonexistent/trace.csv"],
            "cannot read trace",
        ),
        (&["simulate", "--trace", "/dev/null"], "trace is empty"),
        (
            &["simulate", "--trace", "TRACE", "--per-replica", "0"],
            "--per-replica",
        ),
        (
            &["simulate", "--trace", "TRACE", "--target-latency-s", "NaN"],
            "positive number",
        ),
        (
            &["simulate", "--trace", "TRACE", "--target-latency-s=-3"],
            "positive number",
        ),
        (
            &[
                "simulate",
                "--trace",
                "TRACE",
                "--min-replicas",
                "9",
                "--max-replicas",
                "2",
            ],
            "above --max-replicas",
        ),
    ];
    let steady = trace("steady.csv");
    for (args, want) in cases {
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "TRACE" { steady.as_str() } else { a })
            .collect();
        let o = scaler(&args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
}

#[test]
fn unreachable_nats_is_a_clear_error() {
    let o = scaler(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{}",
        text(&o)
    );
}

#[test]
fn simulate_prints_both_models_for_the_shipped_traces() {
    for (name, pools) in [
        ("steady.csv", vec!["cpu"]),
        ("bursty.csv", vec!["burst", "gpu"]),
    ] {
        let o = scaler(&["simulate", "--trace", &trace(name)]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let t = String::from_utf8(o.stdout).unwrap();
        assert!(
            t.starts_with("| pool | model | tasks | replica-seconds | p50 delay s | p99 delay s |"),
            "{t}"
        );
        for pool in pools {
            for model in ["taskbus", "keda-default"] {
                assert!(
                    t.contains(&format!("| {pool} | {model} |")),
                    "{name}: {pool}/{model} missing:\n{t}"
                );
            }
        }
    }
}

/// docs/SCALING.md records the simulator's output on the shipped traces; it must stay current.
#[test]
fn recorded_simulator_output_is_current() {
    let doc = std::fs::read_to_string(format!(
        "{}/../../docs/SCALING.md",
        common::manifest_dir().display()
    ))
    .unwrap();
    for name in ["steady.csv", "bursty.csv"] {
        let o = scaler(&["simulate", "--trace", &trace(name)]);
        assert!(o.status.success());
        for row in String::from_utf8(o.stdout).unwrap().lines() {
            assert!(
                doc.contains(row),
                "docs/SCALING.md lacks this row of `simulate --trace {name}`; re-record it:\n{row}"
            );
        }
    }
}
