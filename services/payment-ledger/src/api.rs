//! Request and response bodies of the ledger's NATS API (service `taskbus-ledger`).
//!
//! Endpoints, under `<prefix>.ledger.` (every reply is `{"ok": …}` or
//! `{"error": {"code": 400|404|409|500|503, "error": "sentence"}}`):
//!
//! | subject | request | reply |
//! |---|---|---|
//! | `hold` | [`taskbus_proto::api::HoldRequest`] | [`taskbus_proto::api::HoldResponse`] |
//! | `deposit` | [`MoveRequest`] | [`MoveReply`] |
//! | `withdraw` | [`MoveRequest`] | [`MoveReply`] |
//! | `balance` | [`BalanceRequest`] | [`BalanceReply`] |
//! | `statement` | [`StatementRequest`] | [`StatementReply`] |
//! | `transfers` | [`TransfersRequest`] | [`TransfersReply`] |
//! | `accounts` | [`AccountsRequest`] | [`AccountsReply`] |
//! | `audit` | `{}` | [`AuditReply`] |
//!
//! Amounts are decimal strings everywhere.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Endpoint names (the last subject token after `<prefix>.ledger.`).
pub const ENDPOINTS: [&str; 8] = [
    "hold",
    "deposit",
    "withdraw",
    "balance",
    "statement",
    "transfers",
    "accounts",
    "audit",
];

/// `<prefix>.ledger.<endpoint>`
pub fn subject(prefix: &str, endpoint: &str) -> String {
    format!("{prefix}.ledger.{endpoint}")
}

/// `deposit` (external → account, creating the account) and `withdraw` (account → external).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub account: String,
    /// Decimal string within the currency's scale.
    pub amount: String,
    /// Default: the ledger's default currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Idempotency key: the same key with the same request returns the first result; with a
    /// different request it is an error (409). Without a key the request is not idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveReply {
    pub transfer_id: i64,
    /// `deposit` or `withdrawal`.
    pub kind: String,
    pub account: String,
    pub currency: String,
    pub amount: String,
    /// True when this was a repeat of an earlier request with the same key.
    pub duplicate: bool,
    /// The account's balance after the request.
    pub balance: Balance,
}

/// `balance`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceRequest {
    /// An account name; `platform` and `escrow` sum their shards.
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// One account (or one sum of shards) in one currency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Balance {
    pub account: String,
    pub currency: String,
    pub kind: String,
    pub no_overdraft: bool,
    /// `credits_posted − debits_posted`.
    pub posted: String,
    /// `posted − debits_pending`: what a new hold or withdrawal may use.
    pub available: String,
    pub debits_pending: String,
    pub debits_posted: String,
    pub credits_pending: String,
    pub credits_posted: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalanceReply {
    pub account: String,
    /// One entry per currency the account has (empty: the account does not exist).
    pub balances: Vec<Balance>,
}

/// `statement`: the account's transfers with a running balance, newest last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatementRequest {
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The most recent `limit` lines (1–10,000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementLine {
    pub transfer_id: i64,
    pub at: DateTime<Utc>,
    /// deposit | withdrawal | hold | payout | fee
    pub kind: String,
    /// posted | pending | settled | voided
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The other account of the transfer.
    pub counterparty: String,
    /// Signed effect on the posted balance (credit positive).
    pub amount: String,
    /// Signed amount still pending (holds not yet settled).
    pub pending: String,
    /// Posted balance after this line.
    pub balance: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementReply {
    pub account: String,
    pub currency: String,
    pub lines: Vec<StatementLine>,
    /// Lines older than the ones returned.
    pub omitted: i64,
}

/// `transfers`: everything the ledger did for one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransfersRequest {
    pub task_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferView {
    pub transfer_id: i64,
    pub kind: String,
    pub status: String,
    pub debit_account: String,
    pub credit_account: String,
    pub currency: String,
    pub amount: String,
    /// For holds: the part posted at settlement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posted_amount: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// For holds: `succeeded`, `dead`, `cancelled`, `expired` or `rejected` once resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransfersReply {
    pub task_id: String,
    pub transfers: Vec<TransferView>,
}

/// `accounts`: list accounts with balances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsRequest {
    /// payer | agent | escrow | platform | external
    pub kind: Option<String>,
    /// 1–10,000, default 100.
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountsReply {
    pub accounts: Vec<Balance>,
}

/// `audit`: the ledger's invariants checked against the database now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReply {
    pub ok: bool,
    pub problems: Vec<String>,
}
