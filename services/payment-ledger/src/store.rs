//! The ledger core: accounts, holds, settlements and operator transfers in PostgreSQL.
//!
//! Every batch is one transaction. Account rows are locked in id order (so concurrent batches
//! never deadlock) and changed once per batch with summed deltas, as late in the transaction as
//! possible: an account row is held only for the tail of one transaction, which is what keeps
//! the escrow and platform accounts from serialising the ledger (see docs/LEDGER.md).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, Row, Transaction};
use taskbus_proto::api::{HoldResult, HoldStatus};
use taskbus_proto::ids::{is_valid_agent_id, is_valid_pool, is_valid_task_id};

use crate::api::{
    Balance, BalanceReply, MoveReply, MoveRequest, StatementLine, StatementReply, TransferView,
    TransfersReply,
};
use crate::money::{self, fmt_amount, parse_amount, split, Currencies, CurrencySpec};

/// Account names the ledger keeps for itself; payers and agents may not use them.
pub const RESERVED_NAMES: [&str; 3] = ["escrow", "platform", "external"];

/// Ledger settings that shape the money (the service's [`crate::Config`] carries them).
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    pub currencies: Vec<CurrencySpec>,
    pub default_currency: String,
    /// Share of each payout the platform keeps, 0 to 1.
    pub fee_share: Decimal,
    /// Escrow and platform accounts per currency (`escrow.0` … `escrow.<n-1>`).
    pub shards: u32,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            currencies: vec![
                CurrencySpec {
                    code: "USD".into(),
                    scale: 2,
                },
                CurrencySpec {
                    code: "SAT".into(),
                    scale: 0,
                },
            ],
            default_currency: "USD".into(),
            fee_share: Decimal::new(1, 1),
            shards: 8,
        }
    }
}

/// Errors of the store that are not about the request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("ledger configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Deadlocks, serialisation failures and lost connections: the batch may simply be retried.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => {
                matches!(
                    e.code().as_deref(),
                    Some("40P01") | Some("40001") | Some("57P01")
                )
            }
            StoreError::Db(_) => true,
            StoreError::Config(_) => false,
        }
    }
}

/// Why an operator request failed; the variant picks the API error code.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InsufficientFunds(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        OpError::Store(StoreError::Db(e))
    }
}

impl OpError {
    /// HTTP-like code used in API error replies.
    pub fn code(&self) -> u16 {
        match self {
            OpError::BadRequest(_) => 400,
            OpError::NotFound(_) => 404,
            OpError::Conflict(_) => 409,
            OpError::InsufficientFunds(_) => 422,
            OpError::Store(_) => 503,
        }
    }
}

/// One hold to make: from the hold endpoint, or replayed from a `held` event (`at` set).
#[derive(Debug, Clone, PartialEq)]
pub struct HoldInput {
    pub task_id: String,
    pub pool: String,
    pub payer: String,
    pub amount: String,
    pub currency: Option<String>,
    /// The hold's time; `None`: now. Replays pass the `held` event's time.
    pub at: Option<DateTime<Utc>>,
}

impl From<&taskbus_proto::api::Hold> for HoldInput {
    fn from(h: &taskbus_proto::api::Hold) -> Self {
        Self {
            task_id: h.task_id.clone(),
            pool: h.pool.clone(),
            payer: h.payer.clone(),
            amount: h.amount.clone(),
            currency: h.currency.clone(),
            at: None,
        }
    }
}

/// What became of one hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Made now.
    New,
    /// Made earlier with the same content and still pending.
    Pending,
    /// Made earlier with the same content and already settled or voided.
    Resolved(String),
    /// The task id already has a hold with other content.
    Conflict(String),
    InsufficientFunds(String),
    Invalid(String),
}

impl HoldOutcome {
    pub fn to_result(&self, task_id: &str) -> HoldResult {
        let (status, message) = match self {
            HoldOutcome::New | HoldOutcome::Pending => (HoldStatus::Held, None),
            HoldOutcome::InsufficientFunds(m) => (HoldStatus::InsufficientFunds, Some(m.clone())),
            HoldOutcome::Resolved(m) | HoldOutcome::Conflict(m) | HoldOutcome::Invalid(m) => {
                (HoldStatus::Invalid, Some(m.clone()))
            }
        };
        HoldResult {
            task_id: task_id.to_string(),
            status,
            message,
        }
    }
    pub fn is_held(&self) -> bool {
        matches!(self, HoldOutcome::New | HoldOutcome::Pending)
    }
}

/// A hold that stands (for the `held` event).
#[derive(Debug, Clone, PartialEq)]
pub struct HeldRecord {
    pub task_id: String,
    pub pool: String,
    pub payer: String,
    pub amount: String,
    pub currency: String,
    pub at: DateTime<Utc>,
}

/// Result of [`Ledger::hold`]: one outcome per input (same order) and the holds that stand.
#[derive(Debug, Clone, Default)]
pub struct HoldBatch {
    pub outcomes: Vec<HoldOutcome>,
    pub held: Vec<HeldRecord>,
}

/// How a task ended, as read from the events stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// `succeeded`: post `min(price × multiplier, price)`.
    Succeeded {
        agent_id: String,
        multiplier: Decimal,
    },
    /// `dead`, `cancelled`, `expired`: void.
    Void { outcome: String },
    /// `rejected`: void a hold made at or before `at` (a later hold belongs to a resubmission).
    Rejected { at: DateTime<Utc> },
}

/// One outcome event for a task, with its stream sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResolution {
    pub task_id: String,
    pub seq: u64,
    pub resolution: Resolution,
}

/// A resolved hold (for the `settled` event).
#[derive(Debug, Clone, PartialEq)]
pub struct SettledRecord {
    pub task_id: String,
    pub pool: String,
    /// `posted` or `voided`.
    pub outcome: String,
    /// The event that resolved it: `succeeded`, `dead`, …
    pub cause: String,
    pub currency: String,
    pub agent_amount: String,
    pub platform_amount: String,
    pub refund_amount: String,
    pub agent_id: Option<String>,
    pub at: DateTime<Utc>,
    /// Stream sequence of the resolving event.
    pub seq: u64,
}

#[derive(Debug, Clone)]
struct SystemAccounts {
    escrow: Vec<i64>,
    platform: Vec<i64>,
    external: i64,
}

struct Inner {
    db: PgPool,
    currencies: Currencies,
    fee_share: Decimal,
    shards: u32,
    system: HashMap<String, SystemAccounts>,
    /// Agent account ids by (name, currency), learned after commits.
    agents: std::sync::Mutex<HashMap<(String, String), i64>>,
}

/// The ledger over one PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: std::sync::Arc<Inner>,
}

struct ValidHold {
    idx: usize,
    task_id: String,
    pool: String,
    payer: String,
    amount: Decimal,
    currency: String,
    scale: u32,
    at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct ExistingHold {
    pool: String,
    payer: String,
    amount: Decimal,
    currency: String,
    status: String,
    outcome: Option<String>,
    at: DateTime<Utc>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    debits_pending: Decimal,
    debits_posted: Decimal,
    credits_pending: Decimal,
    credits_posted: Decimal,
}

/// A user account name: `[A-Za-z0-9_-]{1,128}` and not reserved.
pub fn check_user_account(name: &str) -> Result<(), String> {
    if !is_valid_agent_id(name) {
        return Err(format!(
            "account {:?} must be 1 to 128 characters from A-Z a-z 0-9 _ -",
            money::truncate(name, 40)
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "account name {name:?} is reserved for the ledger's own accounts"
        ));
    }
    Ok(())
}

fn is_platform_shard(name: &str) -> bool {
    name.strip_prefix("platform.")
        .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Ledger {
    /// Register the configured currencies (refusing a scale that differs from the stored one)
    /// and create the system accounts. Migrations must have run.
    pub async fn open(db: PgPool, opts: &LedgerOptions) -> Result<Self, StoreError> {
        let currencies = Currencies::new(&opts.currencies, &opts.default_currency)
            .map_err(StoreError::Config)?;
        if opts.fee_share < Decimal::ZERO || opts.fee_share > Decimal::ONE {
            return Err(StoreError::Config(format!(
                "fee share {} must be between 0 and 1",
                opts.fee_share
            )));
        }
        if !(1..=1024).contains(&opts.shards) {
            return Err(StoreError::Config(
                "shards must be between 1 and 1024".into(),
            ));
        }
        let mut system = HashMap::new();
        for (code, scale) in currencies.iter() {
            sqlx::query("INSERT INTO ledger.currencies (code, scale) VALUES ($1, $2) ON CONFLICT (code) DO NOTHING")
                .bind(code)
                .bind(scale as i32)
                .execute(&db)
                .await?;
            let stored: i32 =
                sqlx::query_scalar("SELECT scale FROM ledger.currencies WHERE code = $1")
                    .bind(code)
                    .fetch_one(&db)
                    .await?;
            if stored != scale as i32 {
                return Err(StoreError::Config(format!(
                    "currency {code} is configured with scale {scale} but the ledger already keeps it with \
                     scale {stored}; a currency's scale cannot change"
                )));
            }
            let mut names = vec!["external".to_string()];
            let mut kinds = vec!["external".to_string()];
            let mut guards = vec![false];
            for i in 0..opts.shards {
                names.push(format!("escrow.{i}"));
                kinds.push("escrow".into());
                guards.push(true);
                names.push(format!("platform.{i}"));
                kinds.push("platform".into());
                guards.push(true);
            }
            sqlx::query(
                "INSERT INTO ledger.accounts (name, currency, kind, no_overdraft)
                 SELECT n, $2, k, g FROM UNNEST($1::text[], $3::text[], $4::bool[]) AS t(n, k, g)
                 ON CONFLICT (name, currency) DO NOTHING",
            )
            .bind(&names)
            .bind(code)
            .bind(&kinds)
            .bind(&guards)
            .execute(&db)
            .await?;
            let rows = sqlx::query(
                "SELECT name, id FROM ledger.accounts WHERE currency = $1 AND name = ANY($2)",
            )
            .bind(code)
            .bind(&names)
            .fetch_all(&db)
            .await?;
            let ids: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let id = |n: &str| {
                ids.get(n).copied().ok_or_else(|| {
                    StoreError::Config(format!("system account {n} {code} is missing"))
                })
            };
            let acc = SystemAccounts {
                escrow: (0..opts.shards)
                    .map(|i| id(&format!("escrow.{i}")))
                    .collect::<Result<_, _>>()?,
                platform: (0..opts.shards)
                    .map(|i| id(&format!("platform.{i}")))
                    .collect::<Result<_, _>>()?,
                external: id("external")?,
            };
            system.insert(code.to_string(), acc);
        }
        Ok(Self {
            inner: std::sync::Arc::new(Inner {
                db,
                currencies,
                fee_share: opts.fee_share,
                shards: opts.shards,
                system,
                agents: std::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn db(&self) -> &PgPool {
        &self.inner.db
    }
    pub fn currencies(&self) -> &Currencies {
        &self.inner.currencies
    }
    fn scale(&self, currency: &str) -> u32 {
        self.inner.currencies.scale(currency).unwrap_or(0)
    }
    fn system(&self, currency: &str) -> Result<&SystemAccounts, StoreError> {
        self.inner.system.get(currency).ok_or_else(|| {
            StoreError::Config(format!("no system accounts for currency {currency}"))
        })
    }

    fn validate_hold(&self, idx: usize, h: &HoldInput) -> Result<ValidHold, String> {
        if !is_valid_task_id(&h.task_id) {
            return Err("task_id must be 1 to 128 characters from A-Z a-z 0-9 _ -".into());
        }
        if !is_valid_pool(&h.pool) {
            return Err(format!(
                "pool {:?} is not a valid pool name",
                money::truncate(&h.pool, 70)
            ));
        }
        check_user_account(&h.payer).map_err(|e| format!("payer: {e}"))?;
        let (currency, scale) = self.inner.currencies.resolve(h.currency.as_deref())?;
        let amount = parse_amount(&h.amount, &currency, scale)?;
        Ok(ValidHold {
            idx,
            task_id: h.task_id.clone(),
            pool: h.pool.clone(),
            payer: h.payer.clone(),
            amount,
            currency,
            scale,
            at: h.at,
        })
    }

    /// Put each task's price on hold, payer → escrow, as pending transfers, in one transaction.
    /// Idempotent per task id; see [`HoldOutcome`].
    pub async fn hold(&self, inputs: &[HoldInput]) -> Result<HoldBatch, StoreError> {
        self.hold_with(inputs, false).await
    }

    /// [`Ledger::hold`] that first looks for existing holds without taking any lock: cheaper
    /// when most holds are expected to exist already (settlement re-reading `held` events).
    pub async fn hold_repeats(&self, inputs: &[HoldInput]) -> Result<HoldBatch, StoreError> {
        self.hold_with(inputs, true).await
    }

    async fn hold_with(
        &self,
        inputs: &[HoldInput],
        precheck: bool,
    ) -> Result<HoldBatch, StoreError> {
        let n = inputs.len();
        let mut outcomes: Vec<Option<HoldOutcome>> = vec![None; n];
        let mut valid: Vec<ValidHold> = Vec::new();
        let mut first: HashMap<String, usize> = HashMap::new(); // task id -> index into `valid`
        let mut repeats: Vec<(usize, usize)> = Vec::new(); // (input index, index into `valid`)
        for (i, h) in inputs.iter().enumerate() {
            match self.validate_hold(i, h) {
                Err(m) => outcomes[i] = Some(HoldOutcome::Invalid(m)),
                Ok(v) => match first.get(&v.task_id) {
                    Some(&j) => repeats.push((i, j)),
                    None => {
                        first.insert(v.task_id.clone(), valid.len());
                        valid.push(v);
                    }
                },
            }
        }
        let mut created_at: HashMap<String, DateTime<Utc>> = HashMap::new();
        if !valid.is_empty() {
            let ids: Vec<&str> = valid.iter().map(|v| v.task_id.as_str()).collect();
            let existing = if precheck {
                existing_holds(&self.inner.db, &ids).await?
            } else {
                HashMap::new()
            };
            let mut fresh: Vec<&ValidHold> = Vec::new();
            for v in &valid {
                match existing.get(&v.task_id) {
                    Some(e) => {
                        created_at.insert(v.task_id.clone(), e.at);
                        outcomes[v.idx] = Some(compare(v, e));
                    }
                    None => fresh.push(v),
                }
            }
            if !fresh.is_empty() {
                let made = self.insert_holds(&fresh).await?;
                for (v, (o, at)) in fresh.iter().zip(made) {
                    if let Some(at) = at {
                        created_at.insert(v.task_id.clone(), at);
                    }
                    outcomes[v.idx] = Some(o);
                }
            }
        }
        for (i, j) in repeats {
            let v = &valid[j];
            let again = self.validate_hold(i, &inputs[i]);
            let same = again.is_ok_and(|w| {
                w.pool == v.pool
                    && w.payer == v.payer
                    && w.amount == v.amount
                    && w.currency == v.currency
            });
            outcomes[i] = Some(if same {
                match outcomes[v.idx].clone() {
                    Some(HoldOutcome::New) => HoldOutcome::Pending,
                    Some(o) => o,
                    None => HoldOutcome::Invalid("internal: no outcome".into()),
                }
            } else {
                HoldOutcome::Conflict(format!(
                    "task {} appears twice in this request with different content",
                    v.task_id
                ))
            });
        }
        let outcomes: Vec<HoldOutcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| HoldOutcome::Invalid("internal: no outcome".into())))
            .collect();
        let mut held = Vec::new();
        let mut seen = HashSet::new();
        for v in &valid {
            if outcomes[v.idx].is_held() && seen.insert(v.task_id.clone()) {
                held.push(HeldRecord {
                    task_id: v.task_id.clone(),
                    pool: v.pool.clone(),
                    payer: v.payer.clone(),
                    amount: fmt_amount(v.amount, v.scale),
                    currency: v.currency.clone(),
                    at: created_at.get(&v.task_id).copied().unwrap_or_else(Utc::now),
                });
            }
        }
        Ok(HoldBatch { outcomes, held })
    }

    /// The locked part of [`Ledger::hold`]: one outcome (and creation time) per fresh hold.
    async fn insert_holds(
        &self,
        fresh: &[&ValidHold],
    ) -> Result<Vec<(HoldOutcome, Option<DateTime<Utc>>)>, StoreError> {
        let mut tx = self.inner.db.begin().await?;
        let mut names: Vec<&str> = Vec::new();
        let mut curs: Vec<&str> = Vec::new();
        let mut escrow_ids: Vec<i64> = Vec::new();
        let mut pairs = HashSet::new();
        for v in fresh {
            if pairs.insert((v.payer.as_str(), v.currency.as_str())) {
                names.push(&v.payer);
                curs.push(&v.currency);
            }
            let sys = self.system(&v.currency)?;
            escrow_ids.push(sys.escrow[money::shard_of(&v.task_id, self.inner.shards) as usize]);
        }
        // Lock the payers and the escrow shards in id order (the one lock order of the ledger).
        let rows = sqlx::query(
            "SELECT id, name, currency, no_overdraft, credits_posted - debits_posted - debits_pending
             FROM ledger.accounts
             WHERE (name, currency) IN (SELECT * FROM UNNEST($1::text[], $2::text[])) OR id = ANY($3)
             ORDER BY id FOR UPDATE",
        )
        .bind(&names)
        .bind(&curs)
        .bind(&escrow_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut avail: HashMap<(String, String), (i64, bool, Decimal)> = HashMap::new();
        for r in &rows {
            avail.insert((r.get(1), r.get(2)), (r.get(0), r.get(3), r.get(4)));
        }
        // Another replica may have made some of these holds meanwhile.
        let ids: Vec<&str> = fresh.iter().map(|v| v.task_id.as_str()).collect();
        let raced = existing_holds(&mut *tx, &ids).await?;
        let mut out: Vec<Option<(HoldOutcome, Option<DateTime<Utc>>)>> = vec![None; fresh.len()];
        let mut accepted: Vec<(usize, i64, i64)> = Vec::new(); // (index in fresh, payer, escrow)
        for (k, v) in fresh.iter().enumerate() {
            if let Some(e) = raced.get(&v.task_id) {
                out[k] = Some((compare(v, e), Some(e.at)));
                continue;
            }
            let escrow = escrow_ids[k];
            match avail.get_mut(&(v.payer.clone(), v.currency.clone())) {
                None => {
                    out[k] = Some((
                        HoldOutcome::InsufficientFunds(format!(
                            "payer {} has no {} account; deposit to it first",
                            v.payer, v.currency
                        )),
                        None,
                    ))
                }
                Some((id, guard, available)) => {
                    if *guard && v.amount > *available {
                        out[k] = Some((
                            HoldOutcome::InsufficientFunds(format!(
                                "payer {} has {} {} available, the task needs {}",
                                v.payer,
                                fmt_amount((*available).max(Decimal::ZERO), v.scale),
                                v.currency,
                                fmt_amount(v.amount, v.scale)
                            )),
                            None,
                        ));
                    } else {
                        *available -= v.amount;
                        accepted.push((k, *id, escrow));
                    }
                }
            }
        }
        if !accepted.is_empty() {
            let now = Utc::now();
            let t_ids: Vec<&str> = accepted
                .iter()
                .map(|a| fresh[a.0].task_id.as_str())
                .collect();
            let pools: Vec<&str> = accepted.iter().map(|a| fresh[a.0].pool.as_str()).collect();
            let debit: Vec<i64> = accepted.iter().map(|a| a.1).collect();
            let credit: Vec<i64> = accepted.iter().map(|a| a.2).collect();
            let amounts: Vec<Decimal> = accepted.iter().map(|a| fresh[a.0].amount).collect();
            let currencies: Vec<&str> = accepted
                .iter()
                .map(|a| fresh[a.0].currency.as_str())
                .collect();
            let ats: Vec<DateTime<Utc>> = accepted
                .iter()
                .map(|a| fresh[a.0].at.unwrap_or(now))
                .collect();
            let inserted: HashSet<String> = sqlx::query_scalar(
                "INSERT INTO ledger.transfers
                     (kind, status, debit_account, credit_account, currency, amount, task_id, pool, created_at)
                 SELECT 'hold', 'pending', d, c, cur, a, t, p, at
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::numeric[], $6::text[], $7::timestamptz[])
                      AS u(t, p, d, c, a, cur, at)
                 ON CONFLICT (task_id, kind) WHERE task_id IS NOT NULL DO NOTHING
                 RETURNING task_id",
            )
            .bind(&t_ids)
            .bind(&pools)
            .bind(&debit)
            .bind(&credit)
            .bind(&amounts)
            .bind(&currencies)
            .bind(&ats)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            let mut deltas: BTreeMap<i64, Delta> = BTreeMap::new();
            let mut lost = Vec::new();
            for (a, at) in accepted.iter().zip(&ats) {
                let v = fresh[a.0];
                if inserted.contains(&v.task_id) {
                    deltas.entry(a.1).or_default().debits_pending += v.amount;
                    deltas.entry(a.2).or_default().credits_pending += v.amount;
                    out[a.0] = Some((HoldOutcome::New, Some(*at)));
                } else {
                    lost.push(a.0);
                }
            }
            apply_deltas(&mut tx, &deltas).await?;
            tx.commit().await?;
            if !lost.is_empty() {
                // Made by a concurrent request with another payer: compare with what won.
                let ids: Vec<&str> = lost.iter().map(|k| fresh[*k].task_id.as_str()).collect();
                let won = existing_holds(&self.inner.db, &ids).await?;
                for k in lost {
                    out[k] = Some(match won.get(&fresh[k].task_id) {
                        Some(e) => (compare(fresh[k], e), Some(e.at)),
                        None => (
                            HoldOutcome::Invalid("the hold could not be recorded; retry".into()),
                            None,
                        ),
                    });
                }
            }
        } else {
            tx.commit().await?;
        }
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or((HoldOutcome::Invalid("internal: no outcome".into()), None)))
            .collect())
    }

    /// Resolve the pending holds of these tasks, in one transaction. For each task the first
    /// applicable event (in the given order) resolves its hold; a hold that is no longer pending
    /// is left alone, so a replayed or repeated event changes nothing. Returns the holds resolved
    /// by this call.
    pub async fn settle(
        &self,
        events: &[TaskResolution],
    ) -> Result<Vec<SettledRecord>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_task: HashMap<&str, Vec<&TaskResolution>> = HashMap::new();
        for e in events {
            by_task.entry(e.task_id.as_str()).or_default().push(e);
        }
        let ids: Vec<&str> = by_task.keys().copied().collect();
        let mut tx = self.inner.db.begin().await?;
        let rows = sqlx::query(
            "SELECT id, task_id, pool, debit_account, credit_account, amount, currency, created_at
             FROM ledger.transfers
             WHERE kind = 'hold' AND task_id = ANY($1) AND status = 'pending'
             ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        struct Plan {
            hold_id: i64,
            task_id: String,
            pool: String,
            payer: i64,
            escrow: i64,
            amount: Decimal,
            currency: String,
            scale: u32,
            seq: u64,
            cause: String,
            posted: Option<(String, Decimal, money::Split)>,
        }
        let mut plans = Vec::new();
        for r in &rows {
            let task_id: String = r.get(1);
            let created: DateTime<Utc> = r.get(7);
            let currency: String = r.get(6);
            let scale = self.scale(&currency);
            let amount: Decimal = r.get(5);
            let Some(evs) = by_task.get(task_id.as_str()) else {
                continue;
            };
            let chosen = evs.iter().find(|e| match &e.resolution {
                Resolution::Rejected { at } => created <= *at,
                _ => true,
            });
            let Some(e) = chosen else { continue };
            let (cause, posted) = match &e.resolution {
                Resolution::Succeeded {
                    agent_id,
                    multiplier,
                } => (
                    "succeeded".to_string(),
                    Some((
                        agent_id.clone(),
                        *multiplier,
                        split(amount, *multiplier, self.inner.fee_share, scale),
                    )),
                ),
                Resolution::Void { outcome } => (outcome.clone(), None),
                Resolution::Rejected { .. } => ("rejected".to_string(), None),
            };
            plans.push(Plan {
                hold_id: r.get(0),
                task_id,
                pool: r.get(2),
                payer: r.get(3),
                escrow: r.get(4),
                amount,
                currency,
                scale,
                seq: e.seq,
                cause,
                posted,
            });
        }
        if plans.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        // Agent accounts, created on first payout.
        let mut agent_keys: Vec<(String, String)> = plans
            .iter()
            .filter_map(|p| {
                p.posted
                    .as_ref()
                    .map(|(a, _, _)| (a.clone(), p.currency.clone()))
            })
            .collect();
        agent_keys.sort();
        agent_keys.dedup();
        let mut agent_ids: HashMap<(String, String), i64> = HashMap::new();
        {
            // Account ids never change: known agents need no statement.
            let known = self.inner.agents.lock().unwrap_or_else(|e| e.into_inner());
            agent_keys.retain(|k| match known.get(k) {
                Some(id) => {
                    agent_ids.insert(k.clone(), *id);
                    false
                }
                None => true,
            });
        }
        let mut learned = Vec::new();
        if !agent_keys.is_empty() {
            let names: Vec<&str> = agent_keys.iter().map(|k| k.0.as_str()).collect();
            let curs: Vec<&str> = agent_keys.iter().map(|k| k.1.as_str()).collect();
            sqlx::query(
                "INSERT INTO ledger.accounts (name, currency, kind, no_overdraft)
                 SELECT n, c, 'agent', true FROM UNNEST($1::text[], $2::text[]) AS t(n, c)
                 ORDER BY n, c
                 ON CONFLICT (name, currency) DO NOTHING",
            )
            .bind(&names)
            .bind(&curs)
            .execute(&mut *tx)
            .await?;
            let rows = sqlx::query(
                "SELECT name, currency, id FROM ledger.accounts
                 WHERE (name, currency) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
            )
            .bind(&names)
            .bind(&curs)
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                let key: (String, String) = (r.get(0), r.get(1));
                let id: i64 = r.get(2);
                learned.push((key.clone(), id));
                agent_ids.insert(key, id);
            }
        }
        let mut deltas: BTreeMap<i64, Delta> = BTreeMap::new();
        let (
            mut u_id,
            mut u_status,
            mut u_posted,
            mut u_outcome,
            mut u_agent,
            mut u_rep,
            mut u_seq,
        ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (
            mut p_kind,
            mut p_debit,
            mut p_credit,
            mut p_amount,
            mut p_cur,
            mut p_task,
            mut p_pool,
            mut p_agent,
        ) = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        let mut records = Vec::new();
        let now = Utc::now();
        for p in &plans {
            deltas.entry(p.payer).or_default().debits_pending -= p.amount;
            deltas.entry(p.escrow).or_default().credits_pending -= p.amount;
            u_id.push(p.hold_id);
            u_outcome.push(p.cause.clone());
            u_seq.push(p.seq as i64);
            match &p.posted {
                Some((agent, multiplier, s)) => {
                    let sys = self.system(&p.currency)?;
                    let platform =
                        sys.platform[money::shard_of(&p.task_id, self.inner.shards) as usize];
                    let agent_acc = agent_ids
                        .get(&(agent.clone(), p.currency.clone()))
                        .copied()
                        .ok_or_else(|| {
                            StoreError::Config(format!("agent account {agent} was not created"))
                        })?;
                    let d = deltas.entry(p.payer).or_default();
                    d.debits_posted += s.payout;
                    let e = deltas.entry(p.escrow).or_default();
                    e.credits_posted += s.payout;
                    e.debits_posted += s.payout;
                    deltas.entry(agent_acc).or_default().credits_posted += s.agent;
                    deltas.entry(platform).or_default().credits_posted += s.platform;
                    for (kind, to, amount) in [
                        ("payout", agent_acc, s.agent),
                        ("fee", platform, s.platform),
                    ] {
                        if amount > Decimal::ZERO {
                            p_kind.push(kind);
                            p_debit.push(p.escrow);
                            p_credit.push(to);
                            p_amount.push(amount);
                            p_cur.push(p.currency.as_str());
                            p_task.push(p.task_id.as_str());
                            p_pool.push(p.pool.as_str());
                            p_agent.push(agent.as_str());
                        }
                    }
                    u_status.push("settled");
                    u_posted.push(s.payout);
                    u_agent.push(Some(agent.clone()));
                    u_rep.push(Some(*multiplier));
                    records.push(SettledRecord {
                        task_id: p.task_id.clone(),
                        pool: p.pool.clone(),
                        outcome: "posted".into(),
                        cause: p.cause.clone(),
                        currency: p.currency.clone(),
                        agent_amount: fmt_amount(s.agent, p.scale),
                        platform_amount: fmt_amount(s.platform, p.scale),
                        refund_amount: fmt_amount(s.refund, p.scale),
                        agent_id: Some(agent.clone()),
                        at: now,
                        seq: p.seq,
                    });
                }
                None => {
                    u_status.push("voided");
                    u_posted.push(Decimal::ZERO);
                    u_agent.push(None);
                    u_rep.push(None);
                    records.push(SettledRecord {
                        task_id: p.task_id.clone(),
                        pool: p.pool.clone(),
                        outcome: "voided".into(),
                        cause: p.cause.clone(),
                        currency: p.currency.clone(),
                        agent_amount: fmt_amount(Decimal::ZERO, p.scale),
                        platform_amount: fmt_amount(Decimal::ZERO, p.scale),
                        refund_amount: fmt_amount(p.amount, p.scale),
                        agent_id: None,
                        at: now,
                        seq: p.seq,
                    });
                }
            }
        }
        let ids: Vec<i64> = deltas.keys().copied().collect();
        sqlx::query("SELECT id FROM ledger.accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE ledger.transfers t
             SET status = u.status, posted_amount = u.posted, outcome = u.outcome, agent_id = u.agent,
                 reputation = u.rep, resolved_seq = u.seq, resolved_at = $8
             FROM UNNEST($1::int8[], $2::text[], $3::numeric[], $4::text[], $5::text[], $6::numeric[], $7::int8[])
                  AS u(id, status, posted, outcome, agent, rep, seq)
             WHERE t.id = u.id",
        )
        .bind(&u_id)
        .bind(&u_status)
        .bind(&u_posted)
        .bind(&u_outcome)
        .bind(&u_agent)
        .bind(&u_rep)
        .bind(&u_seq)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if !p_kind.is_empty() {
            sqlx::query(
                "INSERT INTO ledger.transfers
                     (kind, status, debit_account, credit_account, currency, amount, task_id, pool, agent_id, created_at)
                 SELECT k, 'posted', d, c, cur, a, t, p, ag, $9
                 FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::numeric[], $5::text[], $6::text[], $7::text[], $8::text[])
                      AS u(k, d, c, a, cur, t, p, ag)",
            )
            .bind(&p_kind)
            .bind(&p_debit)
            .bind(&p_credit)
            .bind(&p_amount)
            .bind(&p_cur)
            .bind(&p_task)
            .bind(&p_pool)
            .bind(&p_agent)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        apply_deltas(&mut tx, &deltas).await?;
        tx.commit().await?;
        if !learned.is_empty() {
            // Only after the commit: a rolled-back account row must not be remembered.
            let mut known = self.inner.agents.lock().unwrap_or_else(|e| e.into_inner());
            known.extend(learned);
        }
        Ok(records)
    }

    /// The settlement records of holds resolved by exactly these (task, event sequence) pairs:
    /// used to publish `settled` again when the resolving event is redelivered.
    pub async fn settled_by(
        &self,
        pairs: &[(String, u64)],
    ) -> Result<Vec<SettledRecord>, StoreError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
        let seqs: Vec<i64> = pairs.iter().map(|p| p.1 as i64).collect();
        let rows = sqlx::query(
            "SELECT h.task_id, h.pool, h.status, h.outcome, h.currency, h.amount, h.posted_amount, h.agent_id,
                    h.resolved_at, h.resolved_seq, COALESCE(f.amount, 0)
             FROM UNNEST($1::text[], $2::int8[]) AS q(t, s)
             JOIN ledger.transfers h ON h.task_id = q.t AND h.kind = 'hold' AND h.resolved_seq = q.s
             LEFT JOIN ledger.transfers f ON f.task_id = h.task_id AND f.kind = 'fee'",
        )
        .bind(&ids)
        .bind(&seqs)
        .fetch_all(&self.inner.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let currency: String = r.get(4);
                let scale = self.scale(&currency);
                let amount: Decimal = r.get(5);
                let posted: Decimal = r.get::<Option<Decimal>, _>(6).unwrap_or_default();
                let fee: Decimal = r.get(10);
                let status: String = r.get(2);
                SettledRecord {
                    task_id: r.get(0),
                    pool: r.get(1),
                    outcome: if status == "settled" {
                        "posted"
                    } else {
                        "voided"
                    }
                    .into(),
                    cause: r.get::<Option<String>, _>(3).unwrap_or_default(),
                    agent_amount: fmt_amount(posted - fee, scale),
                    platform_amount: fmt_amount(fee, scale),
                    refund_amount: fmt_amount(amount - posted, scale),
                    currency,
                    agent_id: r.get(7),
                    at: r
                        .get::<Option<DateTime<Utc>>, _>(8)
                        .unwrap_or_else(Utc::now),
                    seq: r.get::<Option<i64>, _>(9).unwrap_or_default() as u64,
                }
            })
            .collect())
    }

    /// External → `account` (created as a payer account when missing).
    pub async fn deposit(&self, req: &MoveRequest) -> Result<MoveReply, OpError> {
        self.move_money("deposit", req).await
    }

    /// `account` → external; refused when the account's available balance is short.
    pub async fn withdraw(&self, req: &MoveRequest) -> Result<MoveReply, OpError> {
        self.move_money("withdrawal", req).await
    }

    async fn move_money(&self, kind: &str, req: &MoveRequest) -> Result<MoveReply, OpError> {
        let deposit = kind == "deposit";
        if deposit || !is_platform_shard(&req.account) {
            check_user_account(&req.account).map_err(OpError::BadRequest)?;
        }
        let (currency, scale) = self
            .inner
            .currencies
            .resolve(req.currency.as_deref())
            .map_err(OpError::BadRequest)?;
        let amount = parse_amount(&req.amount, &currency, scale).map_err(OpError::BadRequest)?;
        if let Some(k) = &req.key {
            if k.is_empty() || k.len() > 200 || k.chars().any(char::is_control) {
                return Err(OpError::BadRequest(
                    "key must be 1 to 200 printable characters".into(),
                ));
            }
        }
        let digest = format!("{kind}|{}|{}|{currency}", req.account, amount.normalize());
        let external = self.system(&currency)?.external;
        let mut tx = self.inner.db.begin().await?;
        if let Some(key) = &req.key {
            if let Some(r) = self.repeat(&mut tx, key, &digest).await? {
                tx.commit().await?;
                return self
                    .move_reply(r, kind, &req.account, &currency, scale, amount, true)
                    .await;
            }
        }
        if deposit {
            sqlx::query(
                "INSERT INTO ledger.accounts (name, currency, kind, no_overdraft) VALUES ($1, $2, 'payer', true)
                 ON CONFLICT (name, currency) DO NOTHING",
            )
            .bind(&req.account)
            .bind(&currency)
            .execute(&mut *tx)
            .await?;
        }
        let row = sqlx::query(
            "SELECT id, no_overdraft, credits_posted - debits_posted - debits_pending FROM ledger.accounts
             WHERE name = $1 AND currency = $2",
        )
        .bind(&req.account)
        .bind(&currency)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(OpError::NotFound(format!(
                "no {currency} account named {}",
                req.account
            )));
        };
        let account: i64 = row.get(0);
        let locked = sqlx::query(
            "SELECT id, no_overdraft, credits_posted - debits_posted - debits_pending FROM ledger.accounts
             WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind([account, external].as_slice())
        .fetch_all(&mut *tx)
        .await?;
        if !deposit {
            let (guard, available): (bool, Decimal) = locked
                .iter()
                .find(|r| r.get::<i64, _>(0) == account)
                .map(|r| (r.get(1), r.get(2)))
                .unwrap_or((true, Decimal::ZERO));
            if guard && amount > available {
                return Err(OpError::InsufficientFunds(format!(
                    "{} has {} {currency} available, cannot withdraw {}",
                    req.account,
                    fmt_amount(available.max(Decimal::ZERO), scale),
                    fmt_amount(amount, scale)
                )));
            }
        }
        let (debit, credit) = if deposit {
            (external, account)
        } else {
            (account, external)
        };
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO ledger.transfers (kind, status, debit_account, credit_account, currency, amount, idem_key, request)
             VALUES ($1, 'posted', $2, $3, $4, $5, $6, $7)
             ON CONFLICT (idem_key) WHERE idem_key IS NOT NULL DO NOTHING
             RETURNING id",
        )
        .bind(kind)
        .bind(debit)
        .bind(credit)
        .bind(&currency)
        .bind(amount)
        .bind(req.key.as_deref())
        .bind(&digest)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            // The same key committed concurrently: answer as a repeat.
            drop(tx);
            let mut tx = self.inner.db.begin().await?;
            let key = req.key.as_deref().unwrap_or_default();
            let r = self.repeat(&mut tx, key, &digest).await?.ok_or_else(|| {
                OpError::Conflict("concurrent request with the same key; retry".into())
            })?;
            tx.commit().await?;
            return self
                .move_reply(r, kind, &req.account, &currency, scale, amount, true)
                .await;
        };
        let mut deltas = BTreeMap::new();
        deltas.insert(
            debit,
            Delta {
                debits_posted: amount,
                ..Default::default()
            },
        );
        deltas.insert(
            credit,
            Delta {
                credits_posted: amount,
                ..Default::default()
            },
        );
        apply_deltas(&mut tx, &deltas).await?;
        tx.commit().await?;
        self.move_reply(id, kind, &req.account, &currency, scale, amount, false)
            .await
    }

    /// The transfer id of an earlier request with `key`, if it had the same content.
    async fn repeat(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        key: &str,
        digest: &str,
    ) -> Result<Option<i64>, OpError> {
        let row = sqlx::query("SELECT id, request FROM ledger.transfers WHERE idem_key = $1")
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let request: Option<String> = r.get(1);
                if request.as_deref() == Some(digest) {
                    Ok(Some(r.get(0)))
                } else {
                    Err(OpError::Conflict(format!(
                        "idempotency key {key:?} was already used for a different request ({})",
                        request.unwrap_or_default()
                    )))
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn move_reply(
        &self,
        id: i64,
        kind: &str,
        account: &str,
        currency: &str,
        scale: u32,
        amount: Decimal,
        duplicate: bool,
    ) -> Result<MoveReply, OpError> {
        let b = self.balance(account, Some(currency)).await?;
        let balance =
            b.balances.into_iter().next().ok_or_else(|| {
                OpError::NotFound(format!("no {currency} account named {account}"))
            })?;
        Ok(MoveReply {
            transfer_id: id,
            kind: kind.into(),
            account: account.into(),
            currency: currency.into(),
            amount: fmt_amount(amount, scale),
            duplicate,
            balance,
        })
    }

    /// Balances of an account in each currency; `platform` and `escrow` sum their shards.
    pub async fn balance(
        &self,
        account: &str,
        currency: Option<&str>,
    ) -> Result<BalanceReply, OpError> {
        if account.is_empty() || account.len() > 200 {
            return Err(OpError::BadRequest(
                "account must be 1 to 200 characters".into(),
            ));
        }
        let rows = if account == "platform" || account == "escrow" {
            sqlx::query(
                "SELECT $1::text, currency, kind, bool_and(no_overdraft), SUM(debits_pending), SUM(debits_posted),
                        SUM(credits_pending), SUM(credits_posted)
                 FROM ledger.accounts WHERE kind = $1 AND ($2::text IS NULL OR currency = $2)
                 GROUP BY currency, kind ORDER BY currency",
            )
            .bind(account)
            .bind(currency)
            .fetch_all(&self.inner.db)
            .await?
        } else {
            sqlx::query(
                "SELECT name, currency, kind, no_overdraft, debits_pending, debits_posted, credits_pending, credits_posted
                 FROM ledger.accounts WHERE name = $1 AND ($2::text IS NULL OR currency = $2) ORDER BY currency",
            )
            .bind(account)
            .bind(currency)
            .fetch_all(&self.inner.db)
            .await?
        };
        Ok(BalanceReply {
            account: account.into(),
            balances: rows.iter().map(|r| self.balance_row(r)).collect(),
        })
    }

    fn balance_row(&self, r: &sqlx::postgres::PgRow) -> Balance {
        let currency: String = r.get(1);
        let scale = self.scale(&currency);
        let (dp, dpo, cp, cpo): (Decimal, Decimal, Decimal, Decimal) =
            (r.get(4), r.get(5), r.get(6), r.get(7));
        let f = |d: Decimal| fmt_amount(d, scale);
        Balance {
            account: r.get(0),
            kind: r.get(2),
            no_overdraft: r.get(3),
            posted: f(cpo - dpo),
            available: f(cpo - dpo - dp),
            debits_pending: f(dp),
            debits_posted: f(dpo),
            credits_pending: f(cp),
            credits_posted: f(cpo),
            currency,
        }
    }

    /// All accounts (optionally of one kind) with balances.
    pub async fn accounts(&self, kind: Option<&str>, limit: u32) -> Result<Vec<Balance>, OpError> {
        if let Some(k) = kind {
            if !["payer", "agent", "escrow", "platform", "external"].contains(&k) {
                return Err(OpError::BadRequest(format!(
                    "unknown account kind {:?}; use payer, agent, escrow, platform or external",
                    money::truncate(k, 20)
                )));
            }
        }
        if !(1..=10_000).contains(&limit) {
            return Err(OpError::BadRequest(
                "limit must be between 1 and 10000".into(),
            ));
        }
        let rows = sqlx::query(
            "SELECT name, currency, kind, no_overdraft, debits_pending, debits_posted, credits_pending, credits_posted
             FROM ledger.accounts WHERE ($1::text IS NULL OR kind = $1) ORDER BY kind, name, currency LIMIT $2",
        )
        .bind(kind)
        .bind(limit as i64)
        .fetch_all(&self.inner.db)
        .await?;
        Ok(rows.iter().map(|r| self.balance_row(r)).collect())
    }

    /// The account's transfers with a running posted balance, newest last.
    pub async fn statement(
        &self,
        account: &str,
        currency: Option<&str>,
        limit: u32,
    ) -> Result<StatementReply, OpError> {
        if !(1..=10_000).contains(&limit) {
            return Err(OpError::BadRequest(
                "limit must be between 1 and 10000".into(),
            ));
        }
        let (currency, scale) = self
            .inner
            .currencies
            .resolve(currency)
            .map_err(OpError::BadRequest)?;
        let found: Option<(i64, String)> = sqlx::query_as(
            "SELECT id, kind FROM ledger.accounts WHERE name = $1 AND currency = $2",
        )
        .bind(account)
        .bind(&currency)
        .fetch_optional(&self.inner.db)
        .await?;
        let Some((id, kind)) = found else {
            return Err(OpError::NotFound(format!(
                "no {currency} account named {:?}",
                money::truncate(account, 60)
            )));
        };
        // Escrow and platform shards are not in the statement indexes (see the migration): scan.
        let filter = if kind == "escrow" || kind == "platform" {
            "t.debit_account = $1 OR t.credit_account = $1"
        } else {
            "(t.debit_account = $1 AND t.kind IN ('deposit', 'withdrawal', 'hold'))
             OR (t.credit_account = $1 AND t.kind IN ('deposit', 'withdrawal', 'payout'))"
        };
        let sql = format!(
            "SELECT * FROM (
                 SELECT t.id, t.created_at, t.kind, t.status, t.task_id, o.name,
                        s.sign * CASE t.status WHEN 'posted' THEN t.amount WHEN 'settled' THEN t.posted_amount ELSE 0 END AS eff,
                        s.sign * CASE t.status WHEN 'pending' THEN t.amount ELSE 0 END AS pend,
                        SUM(s.sign * CASE t.status WHEN 'posted' THEN t.amount WHEN 'settled' THEN t.posted_amount ELSE 0 END)
                            OVER (ORDER BY t.id) AS running,
                        COUNT(*) OVER () AS total
                 FROM ledger.transfers t
                 CROSS JOIN LATERAL (SELECT CASE WHEN t.debit_account = $1 THEN -1 ELSE 1 END AS sign) s
                 JOIN ledger.accounts o ON o.id = CASE WHEN t.debit_account = $1 THEN t.credit_account ELSE t.debit_account END
                 WHERE {filter}
             ) x ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(id)
            .bind(limit as i64)
            .fetch_all(&self.inner.db)
            .await?;
        let f = |d: Decimal| fmt_amount(d, scale);
        let total: i64 = rows.first().map(|r| r.get(9)).unwrap_or(0);
        let mut lines: Vec<StatementLine> = rows
            .iter()
            .map(|r| StatementLine {
                transfer_id: r.get(0),
                at: r.get(1),
                kind: r.get(2),
                status: r.get(3),
                task_id: r.get(4),
                counterparty: r.get(5),
                amount: f(r.get(6)),
                pending: f(r.get(7)),
                balance: f(r.get(8)),
            })
            .collect();
        let omitted = total - lines.len() as i64;
        lines.reverse();
        Ok(StatementReply {
            account: account.into(),
            currency,
            lines,
            omitted,
        })
    }

    /// Every transfer of one task (its hold, payout and fee).
    pub async fn transfers(&self, task_id: &str) -> Result<TransfersReply, OpError> {
        if !is_valid_task_id(task_id) {
            return Err(OpError::BadRequest(
                "task_id must be 1 to 128 characters from A-Z a-z 0-9 _ -".into(),
            ));
        }
        let rows = sqlx::query(
            "SELECT t.id, t.kind, t.status, d.name, c.name, t.currency, t.amount, t.posted_amount, t.task_id,
                    t.pool, t.outcome, t.agent_id, t.reputation, t.created_at, t.resolved_at
             FROM ledger.transfers t
             JOIN ledger.accounts d ON d.id = t.debit_account
             JOIN ledger.accounts c ON c.id = t.credit_account
             WHERE t.task_id = $1 ORDER BY t.id",
        )
        .bind(task_id)
        .fetch_all(&self.inner.db)
        .await?;
        let transfers = rows
            .iter()
            .map(|r| {
                let currency: String = r.get(5);
                let scale = self.scale(&currency);
                TransferView {
                    transfer_id: r.get(0),
                    kind: r.get(1),
                    status: r.get(2),
                    debit_account: r.get(3),
                    credit_account: r.get(4),
                    amount: fmt_amount(r.get(6), scale),
                    posted_amount: r.get::<Option<Decimal>, _>(7).map(|d| fmt_amount(d, scale)),
                    currency,
                    task_id: r.get(8),
                    pool: r.get(9),
                    outcome: r.get(10),
                    agent_id: r.get(11),
                    reputation: r
                        .get::<Option<Decimal>, _>(12)
                        .map(|d| d.normalize().to_string()),
                    created_at: r.get(13),
                    resolved_at: r.get(14),
                }
            })
            .collect();
        Ok(TransfersReply {
            task_id: task_id.into(),
            transfers,
        })
    }
}

fn compare(v: &ValidHold, e: &ExistingHold) -> HoldOutcome {
    let same =
        e.pool == v.pool && e.payer == v.payer && e.amount == v.amount && e.currency == v.currency;
    if !same {
        return HoldOutcome::Conflict(format!(
            "task {} already has a hold of {} {} from payer {} in pool {}; a hold with different content is refused",
            v.task_id,
            fmt_amount(e.amount, v.scale),
            e.currency,
            e.payer,
            e.pool
        ));
    }
    match e.status.as_str() {
        "pending" => HoldOutcome::Pending,
        other => HoldOutcome::Resolved(format!(
            "the hold of task {} was already {} (after {}); a hold resolves at most once, so a task that \
             runs again needs a new task id",
            v.task_id,
            if other == "settled" { "posted" } else { "voided" },
            e.outcome.as_deref().unwrap_or("an outcome")
        )),
    }
}

async fn existing_holds<'e, E>(
    db: E,
    ids: &[&str],
) -> Result<HashMap<String, ExistingHold>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let rows = sqlx::query(
        "SELECT t.task_id, t.pool, a.name, t.amount, t.currency, t.status, t.outcome, t.created_at
         FROM ledger.transfers t JOIN ledger.accounts a ON a.id = t.debit_account
         WHERE t.kind = 'hold' AND t.task_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                ExistingHold {
                    pool: r.get::<Option<String>, _>(1).unwrap_or_default(),
                    payer: r.get(2),
                    amount: r.get(3),
                    currency: r.get(4),
                    status: r.get(5),
                    outcome: r.get(6),
                    at: r.get(7),
                },
            )
        })
        .collect())
}

/// Add summed deltas to account rows (already locked by the caller, in id order).
async fn apply_deltas(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &BTreeMap<i64, Delta>,
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = deltas.keys().copied().collect();
    let dp: Vec<Decimal> = deltas.values().map(|d| d.debits_pending).collect();
    let dpo: Vec<Decimal> = deltas.values().map(|d| d.debits_posted).collect();
    let cp: Vec<Decimal> = deltas.values().map(|d| d.credits_pending).collect();
    let cpo: Vec<Decimal> = deltas.values().map(|d| d.credits_posted).collect();
    sqlx::query(
        "UPDATE ledger.accounts a
         SET debits_pending = a.debits_pending + d.dp, debits_posted = a.debits_posted + d.dpo,
             credits_pending = a.credits_pending + d.cp, credits_posted = a.credits_posted + d.cpo
         FROM UNNEST($1::int8[], $2::numeric[], $3::numeric[], $4::numeric[], $5::numeric[]) AS d(id, dp, dpo, cp, cpo)
         WHERE a.id = d.id",
    )
    .bind(&ids)
    .bind(&dp)
    .bind(&dpo)
    .bind(&cp)
    .bind(&cpo)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
