//! The `taskbus ledger` CLI module (services/cli/src/ledger.rs, compiled here too) against a
//! running ledger: parsing, text and JSON output, refusals.

mod common;

#[path = "../../cli/src/ledger.rs"]
#[allow(dead_code)]
mod ledger_cli;

use clap::Parser;
use common::*;
use ledger_cli::{execute, LedgerCmd};
use taskbus_proto::api::{HoldRequest, HoldResponse};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: LedgerCmd,
}

fn cmd(args: &[&str]) -> LedgerCmd {
    let mut v = vec!["taskbus-ledger"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).expect("parses").cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_talk_to_the_ledger() {
    let env = Env::new().await;
    let (running, token) = env.start().await;
    let c = &env.client;

    let out = execute(
        cmd(&["deposit", "alice", "10", "USD", "--key", "d1"]),
        c,
        "taskbus",
    )
    .await
    .unwrap();
    assert!(out.starts_with("deposit 10.00 USD to"), "{out}");
    let out = execute(
        cmd(&["deposit", "alice", "10", "USD", "--key", "d1"]),
        c,
        "taskbus",
    )
    .await
    .unwrap();
    assert!(out.contains("repeated request"), "{out}");
    let err = execute(cmd(&["withdraw", "alice", "11", "USD"]), c, "taskbus")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("422"), "{err}");
    let err = execute(cmd(&["deposit", "alice", "1.234", "USD"]), c, "taskbus")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("never rounded"), "{err}");

    let r: HoldResponse = env
        .call(
            "hold",
            &HoldRequest {
                holds: vec![hold("cli-t1", "alice", "4", Some("USD"))],
            },
        )
        .await
        .unwrap();
    assert_eq!(r.results[0].status, taskbus_proto::api::HoldStatus::Held);
    env.publish(&succeeded("cli-t1", "agent-c", Some("0.5")))
        .await;
    env.wait_resolved(1).await;

    let out = execute(cmd(&["balance", "alice"]), c, "taskbus")
        .await
        .unwrap();
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .eq(["alice", "payer", "USD", "8.00", "8.00", "0.00", "0.00"]),
        "{out}"
    );
    let json = execute(cmd(&["balance", "agent-c", "--json"]), c, "taskbus")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["balances"][0]["posted"], "1.80");
    let out = execute(cmd(&["balance", "platform"]), c, "taskbus")
        .await
        .unwrap();
    assert!(out.contains("0.20"), "{out}");
    let out = execute(cmd(&["statement", "alice"]), c, "taskbus")
        .await
        .unwrap();
    assert!(
        out.contains("cli-t1") && out.lines().last().unwrap().ends_with("8.00"),
        "{out}"
    );
    let json = execute(
        cmd(&["transfers", "--task", "cli-t1", "--json"]),
        c,
        "taskbus",
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["transfers"].as_array().unwrap().len(), 3);
    let out = execute(cmd(&["transfers", "--task", "cli-t1"]), c, "taskbus")
        .await
        .unwrap();
    assert!(out.contains("payout") && out.contains("agent-c"), "{out}");
    let out = execute(cmd(&["accounts", "--kind", "agent"]), c, "taskbus")
        .await
        .unwrap();
    assert_eq!(out.lines().count(), 2, "{out}");
    let out = execute(cmd(&["audit"]), c, "taskbus").await.unwrap();
    assert_eq!(out, "ledger invariants hold");
    let out = execute(cmd(&["balance", "nobody"]), c, "taskbus")
        .await
        .unwrap();
    assert_eq!(out, "nobody: no account");

    token.cancel();
    running.wait().await;
    let err = execute(cmd(&["balance", "alice"]), c, "taskbus")
        .await
        .unwrap_err();
    // The ledger confirmed its unsubscriptions with the server before stopping.
    assert!(err.to_string().contains("no ledger answers"), "{err:#}");
}

#[test]
fn cli_parses_the_issue_syntax() {
    assert_eq!(
        cmd(&["deposit", "acme", "12.50", "USD"]),
        LedgerCmd::Deposit {
            account: "acme".into(),
            amount: "12.50".into(),
            currency: Some("USD".into()),
            key: None,
            json: false
        }
    );
    assert!(matches!(
        cmd(&["transfers", "--task", "t1", "--json"]),
        LedgerCmd::Transfers { json: true, .. }
    ));
    assert!(matches!(
        cmd(&["statement", "acme", "--json"]),
        LedgerCmd::Statement {
            limit: 50,
            json: true,
            ..
        }
    ));
    assert!(Cli::try_parse_from(["x", "transfers"]).is_err());
}
