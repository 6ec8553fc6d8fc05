//! The ledger's invariants, checked against the database (tests run this after every
//! operation; operators through `taskbus.ledger.audit`).
//!
//! 1. Per currency, Σ debits = Σ credits over all accounts, posted and pending separately.
//! 2. No `no_overdraft` account has `debits_posted + debits_pending > credits_posted`.
//! 3. Every account's four balance columns equal the sums of its journal rows.
//! 4. Every transfer's accounts exist and are in the transfer's currency (no foreign keys: see
//!    the migration `20261122000101_ledger_speed.sql`).
//! 5. A settled hold's posted part equals its payout plus fee; a voided hold has neither; a
//!    task has at most one payout and one fee (the unique index also guarantees this).

use sqlx::{PgPool, Row};

/// What the audit found; empty means every invariant holds.
pub async fn check(db: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let mut problems = Vec::new();

    for r in sqlx::query(
        "SELECT currency, SUM(debits_posted) - SUM(credits_posted), SUM(debits_pending) - SUM(credits_pending)
         FROM ledger.accounts GROUP BY currency
         HAVING SUM(debits_posted) <> SUM(credits_posted) OR SUM(debits_pending) <> SUM(credits_pending)",
    )
    .fetch_all(db)
    .await?
    {
        problems.push(format!(
            "{}: debits minus credits is {} posted and {} pending, not zero",
            r.get::<String, _>(0),
            r.get::<rust_decimal::Decimal, _>(1),
            r.get::<rust_decimal::Decimal, _>(2)
        ));
    }

    for r in sqlx::query(
        "SELECT name, currency, credits_posted - debits_posted - debits_pending FROM ledger.accounts
         WHERE no_overdraft AND debits_posted + debits_pending > credits_posted",
    )
    .fetch_all(db)
    .await?
    {
        problems.push(format!(
            "account {} {} is overdrawn: available {}",
            r.get::<String, _>(0),
            r.get::<String, _>(1),
            r.get::<rust_decimal::Decimal, _>(2)
        ));
    }

    for r in sqlx::query(
        "WITH eff AS (
             SELECT debit_account AS acc,
                    CASE status WHEN 'pending' THEN amount ELSE 0 END AS dp,
                    CASE status WHEN 'posted' THEN amount WHEN 'settled' THEN posted_amount ELSE 0 END AS dpo,
                    0::numeric AS cp, 0::numeric AS cpo
             FROM ledger.transfers
             UNION ALL
             SELECT credit_account, 0, 0,
                    CASE status WHEN 'pending' THEN amount ELSE 0 END,
                    CASE status WHEN 'posted' THEN amount WHEN 'settled' THEN posted_amount ELSE 0 END
             FROM ledger.transfers
         ), sums AS (
             SELECT acc, SUM(dp) dp, SUM(dpo) dpo, SUM(cp) cp, SUM(cpo) cpo FROM eff GROUP BY acc
         )
         SELECT a.name, a.currency FROM ledger.accounts a LEFT JOIN sums s ON s.acc = a.id
         WHERE a.debits_pending <> COALESCE(s.dp, 0) OR a.debits_posted <> COALESCE(s.dpo, 0)
            OR a.credits_pending <> COALESCE(s.cp, 0) OR a.credits_posted <> COALESCE(s.cpo, 0)",
    )
    .fetch_all(db)
    .await?
    {
        problems.push(format!(
            "account {} {} does not match the sum of its transfers",
            r.get::<String, _>(0),
            r.get::<String, _>(1)
        ));
    }

    for r in sqlx::query(
        "SELECT t.id, d.id IS NULL OR c.id IS NULL FROM ledger.transfers t
         LEFT JOIN ledger.accounts d ON d.id = t.debit_account LEFT JOIN ledger.accounts c ON c.id = t.credit_account
         WHERE d.id IS NULL OR c.id IS NULL OR d.currency <> t.currency OR c.currency <> t.currency LIMIT 20",
    )
    .fetch_all(db)
    .await?
    {
        problems.push(if r.get::<bool, _>(1) {
            format!("transfer {} refers to a missing account", r.get::<i64, _>(0))
        } else {
            format!("transfer {} mixes currencies", r.get::<i64, _>(0))
        });
    }

    for r in sqlx::query(
        "SELECT h.task_id, h.status, h.posted_amount, COALESCE(SUM(p.amount), 0)
         FROM ledger.transfers h
         LEFT JOIN ledger.transfers p ON p.task_id = h.task_id AND p.kind IN ('payout', 'fee')
         WHERE h.kind = 'hold'
         GROUP BY h.id, h.task_id, h.status, h.posted_amount
         HAVING (h.status = 'settled' AND COALESCE(SUM(p.amount), 0) <> h.posted_amount)
             OR (h.status IN ('pending', 'voided') AND COUNT(p.id) > 0)
         LIMIT 20",
    )
    .fetch_all(db)
    .await?
    {
        problems.push(format!(
            "hold of task {} ({}) does not match its payouts",
            r.get::<String, _>(0),
            r.get::<String, _>(1)
        ));
    }
    Ok(problems)
}
