//! `taskbus ledger …`: the payment ledger's operator commands, through the ledger's
//! request/reply API (`<prefix>.ledger.*`, service `taskbus-ledger`).

use std::time::Duration;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use taskbus_ledger::api::{
    self, AccountsReply, AccountsRequest, AuditReply, Balance, BalanceReply, BalanceRequest,
    MoveReply, MoveRequest, StatementReply, StatementRequest, TransfersReply, TransfersRequest,
};
use taskbus_proto::api::Reply;

/// Payment ledger: fund payers, pay out, inspect balances and what a task cost.
#[derive(clap::Subcommand, Debug, Clone, PartialEq)]
pub enum LedgerCmd {
    /// Credit ACCOUNT with AMOUNT from outside the ledger (creates the account).
    Deposit {
        account: String,
        /// Decimal string within the currency's decimals, e.g. 12.50.
        amount: String,
        /// Currency code, e.g. USD or SAT (default: the ledger's default currency).
        currency: Option<String>,
        /// Idempotency key: repeating the command with the same key moves the money once
        /// (default: a fresh key per command, reused for its own retries).
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Pay AMOUNT out of ACCOUNT (refused when its available balance is short).
    Withdraw {
        account: String,
        amount: String,
        currency: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Balances of an account; `platform` and `escrow` sum their shards.
    Balance {
        account: String,
        #[arg(long)]
        currency: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// An account's transfers with a running balance, newest last.
    Statement {
        account: String,
        #[arg(long)]
        currency: Option<String>,
        /// Most recent lines to show (1–10000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// What the ledger did for one task: its hold, payout and fee.
    Transfers {
        #[arg(long = "task")]
        task: String,
        #[arg(long)]
        json: bool,
    },
    /// List accounts with their balances.
    Accounts {
        /// payer, agent, escrow, platform or external.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Check the ledger's invariants now.
    Audit {
        #[arg(long)]
        json: bool,
    },
}

/// A deposit or withdrawal request; without `--key` a fresh key, so the command's own retries
/// move the money once.
fn move_request(
    account: String,
    amount: String,
    currency: Option<String>,
    key: Option<String>,
) -> MoveRequest {
    MoveRequest {
        account,
        amount,
        currency,
        key: Some(key.unwrap_or_else(|| format!("cli-{}", ulid::Ulid::new()))),
    }
}

/// Run one ledger command and print its output.
pub async fn run(cmd: LedgerCmd, client: &async_nats::Client, prefix: &str) -> anyhow::Result<()> {
    let out = execute(cmd, client, prefix).await?;
    println!("{out}");
    Ok(())
}

/// Run one ledger command and return what it prints.
pub async fn execute(
    cmd: LedgerCmd,
    client: &async_nats::Client,
    prefix: &str,
) -> anyhow::Result<String> {
    match cmd {
        LedgerCmd::Deposit {
            account,
            amount,
            currency,
            key,
            json,
        } => {
            let req = move_request(account, amount, currency, key);
            let r: MoveReply = call(client, prefix, "deposit", &req, 3).await?;
            render(json, &r, move_text)
        }
        LedgerCmd::Withdraw {
            account,
            amount,
            currency,
            key,
            json,
        } => {
            let req = move_request(account, amount, currency, key);
            let r: MoveReply = call(client, prefix, "withdraw", &req, 3).await?;
            render(json, &r, move_text)
        }
        LedgerCmd::Balance {
            account,
            currency,
            json,
        } => {
            let r: BalanceReply = call(
                client,
                prefix,
                "balance",
                &BalanceRequest { account, currency },
                1,
            )
            .await?;
            if r.balances.is_empty() && !json {
                return Ok(format!("{}: no account", r.account));
            }
            render(json, &r, |r| balances_table(&r.balances))
        }
        LedgerCmd::Statement {
            account,
            currency,
            limit,
            json,
        } => {
            let req = StatementRequest {
                account,
                currency,
                limit: Some(limit),
            };
            let r: StatementReply = call(client, prefix, "statement", &req, 1).await?;
            render(json, &r, statement_text)
        }
        LedgerCmd::Transfers { task, json } => {
            let r: TransfersReply = call(
                client,
                prefix,
                "transfers",
                &TransfersRequest { task_id: task },
                1,
            )
            .await?;
            render(json, &r, transfers_text)
        }
        LedgerCmd::Accounts { kind, limit, json } => {
            let req = AccountsRequest {
                kind,
                limit: Some(limit),
            };
            let r: AccountsReply = call(client, prefix, "accounts", &req, 1).await?;
            render(json, &r, |r| balances_table(&r.accounts))
        }
        LedgerCmd::Audit { json } => {
            let r: AuditReply = call(client, prefix, "audit", &serde_json::json!({}), 1).await?;
            let text = render(json, &r, |r| {
                if r.ok {
                    "ledger invariants hold".to_string()
                } else {
                    format!("ledger invariants broken:\n  {}", r.problems.join("\n  "))
                }
            })?;
            if !r.ok {
                bail!("{text}");
            }
            Ok(text)
        }
    }
}

fn render<T: Serialize>(
    json: bool,
    v: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<String> {
    if json {
        Ok(serde_json::to_string_pretty(v)?)
    } else {
        Ok(text(v))
    }
}

/// One request; `attempts` > 1 retries a timed-out request as is (only for keyed, idempotent
/// requests).
async fn call<Req: Serialize, Resp: DeserializeOwned>(
    client: &async_nats::Client,
    prefix: &str,
    endpoint: &str,
    req: &Req,
    attempts: u32,
) -> anyhow::Result<Resp> {
    let subject = api::subject(prefix, endpoint);
    let body = serde_json::to_vec(req)?;
    let mut attempt = 0;
    let msg = loop {
        attempt += 1;
        let r = client
            .send_request(
                subject.clone(),
                async_nats::Request::new()
                    .payload(body.clone().into())
                    .timeout(Some(Duration::from_secs(10))),
            )
            .await;
        match r {
            Ok(m) => break m,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                bail!(
                    "no ledger answers on {subject}: is taskbus-ledger running against this NATS?"
                )
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut && attempt < attempts => {
                continue
            }
            Err(e) => return Err(e).with_context(|| format!("request to {subject}")),
        }
    };
    match serde_json::from_slice::<Reply<Resp>>(&msg.payload) {
        Ok(Reply::Ok(v)) => Ok(v),
        Ok(Reply::Error(e)) => bail!("ledger refused the request ({}): {}", e.code, e.error),
        Err(e) => bail!(
            "unreadable reply from {subject}: {e}: {}",
            String::from_utf8_lossy(&msg.payload)
        ),
    }
}

fn move_text(r: &MoveReply) -> String {
    format!(
        "{} {} {} {} (transfer {}{}); {} balance {} {}, available {}",
        r.kind,
        r.amount,
        r.currency,
        if r.kind == "deposit" { "to" } else { "from" },
        r.transfer_id,
        if r.duplicate {
            ", repeated request: nothing moved again"
        } else {
            ""
        },
        r.account,
        r.balance.posted,
        r.currency,
        r.balance.available
    )
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn balances_table(b: &[Balance]) -> String {
    table(
        &[
            "ACCOUNT",
            "KIND",
            "CURRENCY",
            "POSTED",
            "AVAILABLE",
            "PENDING_OUT",
            "PENDING_IN",
        ],
        b.iter()
            .map(|b| {
                vec![
                    b.account.clone(),
                    b.kind.clone(),
                    b.currency.clone(),
                    b.posted.clone(),
                    b.available.clone(),
                    b.debits_pending.clone(),
                    b.credits_pending.clone(),
                ]
            })
            .collect(),
    )
}

fn statement_text(r: &StatementReply) -> String {
    let mut out = format!("statement of {} ({})", r.account, r.currency);
    if r.omitted > 0 {
        out.push_str(&format!(", {} older lines not shown", r.omitted));
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "ID",
            "AT",
            "KIND",
            "STATUS",
            "TASK",
            "COUNTERPARTY",
            "AMOUNT",
            "PENDING",
            "BALANCE",
        ],
        r.lines
            .iter()
            .map(|l| {
                vec![
                    l.transfer_id.to_string(),
                    l.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    l.kind.clone(),
                    l.status.clone(),
                    l.task_id.clone().unwrap_or_default(),
                    l.counterparty.clone(),
                    l.amount.clone(),
                    l.pending.clone(),
                    l.balance.clone(),
                ]
            })
            .collect(),
    ));
    out
}

fn transfers_text(r: &TransfersReply) -> String {
    if r.transfers.is_empty() {
        return format!(
            "task {}: no transfers (no price, or no hold yet)",
            r.task_id
        );
    }
    let mut out = format!("task {}\n", r.task_id);
    out.push_str(&table(
        &[
            "ID", "KIND", "STATUS", "FROM", "TO", "AMOUNT", "POSTED", "CURRENCY", "OUTCOME",
            "AGENT",
        ],
        r.transfers
            .iter()
            .map(|t| {
                vec![
                    t.transfer_id.to_string(),
                    t.kind.clone(),
                    t.status.clone(),
                    t.debit_account.clone(),
                    t.credit_account.clone(),
                    t.amount.clone(),
                    t.posted_amount.clone().unwrap_or_else(|| t.amount.clone()),
                    t.currency.clone(),
                    t.outcome.clone().unwrap_or_default(),
                    t.agent_id.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    ));
    out
}
