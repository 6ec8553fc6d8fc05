//! The ledger binary refuses hostile flag values with a sentence, before it connects to
//! anything (the URLs below lead nowhere, so a value that slipped through would fail later
//! with a different message).

use std::process::Command;

fn ledger(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_taskbus-ledger"))
        .env_clear()
        .args([
            "--nats-url",
            "nats://127.0.0.1:1",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
        ])
        .args(args)
        .output()
        .expect("run taskbus-ledger");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn spend_budgets_are_checked_before_anything_connects() {
    for (value, says) in [
        ("USD", "CURRENCY=AMOUNT"),
        ("usd=250", "upper-case"),
        ("USD=0", "positive amount"),
        ("USD=-1", "positive amount"),
        ("USD=inf", "positive amount"),
        ("USD=1e9", "positive amount"),
        ("USD=1,=5", "upper-case"),
    ] {
        let (code, err) = ledger(&["--spend-budget-per-hour", value]);
        assert_eq!(code, 2, "{value:?}: {err}");
        assert!(err.contains(says), "{value:?}: {err}");
    }
    // Parsed, but for a currency the ledger is not configured with.
    let (code, err) = ledger(&["--spend-budget-per-hour", "USD=1,EUR=2"]);
    assert_ne!(code, 0);
    assert!(err.contains("EUR") && err.contains("--currencies"), "{err}");
}
