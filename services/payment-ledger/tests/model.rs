//! Property test: random rounds of concurrent deposits, holds, posts and voids, with retries
//! (the same key or task again, in the same round or later), run against a real PostgreSQL and
//! checked against a simple in-memory model. After every round: the ledger's invariants hold,
//! every result is one that some serial order of the round's operations gives in the model,
//! and every balance equals the model's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};
use rust_decimal::Decimal;
use sqlx::Row;
use taskbus_ledger::api::MoveRequest;
use taskbus_ledger::money::split;
use taskbus_ledger::store::OpError;
use taskbus_ledger::{HoldInput, HoldOutcome, Ledger, LedgerOptions, Resolution, TaskResolution};
use taskbus_tests::TestDb;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    /// Deposit `cents` to payer `payer` under key `key`.
    Deposit {
        key: u8,
        payer: u8,
        cents: u32,
    },
    Hold {
        task: u8,
        payer: u8,
        cents: u32,
    },
    /// Post with reputation `rep_pct` / 100.
    Post {
        task: u8,
        agent: u8,
        rep_pct: u8,
    },
    Void {
        task: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5, 0u8..3, 1u32..800).prop_map(|(key, payer, cents)| Op::Deposit {
            key,
            payer,
            cents
        }),
        (0u8..10, 0u8..3, 1u32..400).prop_map(|(task, payer, cents)| Op::Hold {
            task,
            payer,
            cents
        }),
        (0u8..10, 0u8..2, 0u8..160).prop_map(|(task, agent, rep_pct)| Op::Post {
            task,
            agent,
            rep_pct
        }),
        (0u8..10).prop_map(|task| Op::Void { task }),
    ]
}

/// A round: up to 3 distinct operations plus retries of them, run concurrently.
fn round() -> impl Strategy<Value = Vec<Op>> {
    (
        prop::collection::vec(op(), 1..=3),
        prop::collection::vec(0usize..3, 0..=1),
    )
        .prop_map(|(mut ops, retries)| {
            for r in retries {
                let o = ops[r % ops.len()].clone();
                ops.push(o);
            }
            ops
        })
}

#[derive(Debug, Clone, PartialEq)]
enum Obs {
    Deposited { duplicate: bool },
    DepositConflict,
    Hold(&'static str),
    Settled(Option<(String, Option<String>)>),
}

#[derive(Debug, Clone, PartialEq)]
enum HoldState {
    Pending,
    Resolved,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    /// payer -> (posted, pending)
    payers: HashMap<u8, (Decimal, Decimal)>,
    /// task -> (payer, amount, state)
    holds: HashMap<u8, (u8, Decimal, HoldState)>,
    /// key -> (payer, amount)
    keys: HashMap<u8, (u8, Decimal)>,
    agents: HashMap<u8, Decimal>,
    platform: Decimal,
}

fn cents(c: u32) -> Decimal {
    Decimal::new(c as i64, 2)
}

impl Model {
    fn apply(&mut self, op: &Op) -> Obs {
        match *op {
            Op::Deposit {
                key,
                payer,
                cents: c,
            } => match self.keys.get(&key) {
                Some(&(p, a)) if p == payer && a == cents(c) => Obs::Deposited { duplicate: true },
                Some(_) => Obs::DepositConflict,
                None => {
                    self.keys.insert(key, (payer, cents(c)));
                    self.payers.entry(payer).or_default().0 += cents(c);
                    Obs::Deposited { duplicate: false }
                }
            },
            Op::Hold {
                task,
                payer,
                cents: c,
            } => match self.holds.get(&task) {
                Some((p, a, state)) if *p == payer && *a == cents(c) => match state {
                    HoldState::Pending => Obs::Hold("pending"),
                    HoldState::Resolved => Obs::Hold("resolved"),
                },
                Some(_) => Obs::Hold("conflict"),
                None => match self.payers.get_mut(&payer) {
                    Some((posted, pending)) if *posted - *pending >= cents(c) => {
                        *pending += cents(c);
                        self.holds
                            .insert(task, (payer, cents(c), HoldState::Pending));
                        Obs::Hold("new")
                    }
                    _ => Obs::Hold("insufficient"),
                },
            },
            Op::Post {
                task,
                agent,
                rep_pct,
            } => match self.holds.get_mut(&task) {
                Some((payer, amount, state)) if *state == HoldState::Pending => {
                    *state = HoldState::Resolved;
                    let s = split(
                        *amount,
                        Decimal::new(rep_pct as i64, 2),
                        Decimal::new(1, 1),
                        2,
                    );
                    let p = self.payers.entry(*payer).or_default();
                    p.0 -= s.payout;
                    p.1 -= *amount;
                    *self.agents.entry(agent).or_default() += s.agent;
                    self.platform += s.platform;
                    Obs::Settled(Some(("posted".into(), Some(format!("a{agent}")))))
                }
                _ => Obs::Settled(None),
            },
            Op::Void { task } => match self.holds.get_mut(&task) {
                Some((payer, amount, state)) if *state == HoldState::Pending => {
                    *state = HoldState::Resolved;
                    self.payers.entry(*payer).or_default().1 -= *amount;
                    Obs::Settled(Some(("voided".into(), None)))
                }
                _ => Obs::Settled(None),
            },
        }
    }
}

struct Case<'a> {
    ledger: &'a Ledger,
    id: u32,
    seq: &'a std::sync::atomic::AtomicU64,
}

impl Case<'_> {
    fn payer(&self, p: u8) -> String {
        format!("c{}-p{p}", self.id)
    }
    fn task(&self, t: u8) -> String {
        format!("c{}-t{t}", self.id)
    }
    fn agent(&self, a: u8) -> String {
        format!("c{}-a{a}", self.id)
    }

    async fn run(&self, op: &Op) -> Result<Obs, String> {
        match *op {
            Op::Deposit {
                key,
                payer,
                cents: c,
            } => {
                let req = MoveRequest {
                    account: self.payer(payer),
                    amount: cents(c).to_string(),
                    currency: Some("USD".into()),
                    key: Some(format!("c{}-k{key}", self.id)),
                };
                match self.ledger.deposit(&req).await {
                    Ok(r) => Ok(Obs::Deposited {
                        duplicate: r.duplicate,
                    }),
                    Err(OpError::Conflict(_)) => Ok(Obs::DepositConflict),
                    Err(e) => Err(format!("deposit failed: {e}")),
                }
            }
            Op::Hold {
                task,
                payer,
                cents: c,
            } => {
                let h = HoldInput {
                    task_id: self.task(task),
                    pool: "default".into(),
                    payer: self.payer(payer),
                    amount: cents(c).to_string(),
                    currency: None,
                    at: None,
                };
                let r = self
                    .ledger
                    .hold(&[h])
                    .await
                    .map_err(|e| format!("hold failed: {e}"))?;
                Ok(Obs::Hold(match &r.outcomes[0] {
                    HoldOutcome::New => "new",
                    HoldOutcome::Pending => "pending",
                    HoldOutcome::Resolved(_) => "resolved",
                    HoldOutcome::Conflict(_) => "conflict",
                    HoldOutcome::InsufficientFunds(_) => "insufficient",
                    HoldOutcome::Invalid(m) => return Err(format!("hold invalid: {m}")),
                }))
            }
            Op::Post {
                task,
                agent,
                rep_pct,
            } => {
                let r = TaskResolution {
                    task_id: self.task(task),
                    seq: self.seq.fetch_add(1, Ordering::SeqCst),
                    resolution: Resolution::Succeeded {
                        agent_id: self.agent(agent),
                        multiplier: Decimal::new(rep_pct as i64, 2),
                    },
                };
                self.settled(&r).await
            }
            Op::Void { task } => {
                let r = TaskResolution {
                    task_id: self.task(task),
                    seq: self.seq.fetch_add(1, Ordering::SeqCst),
                    resolution: Resolution::Void {
                        outcome: "dead".into(),
                    },
                };
                self.settled(&r).await
            }
        }
    }

    async fn settled(&self, r: &TaskResolution) -> Result<Obs, String> {
        let recs = self
            .ledger
            .settle(std::slice::from_ref(r))
            .await
            .map_err(|e| format!("settle failed: {e}"))?;
        let prefix = format!("c{}-", self.id);
        Ok(Obs::Settled(recs.first().map(|s| {
            (
                s.outcome.clone(),
                s.agent_id
                    .as_ref()
                    .map(|a| a.trim_start_matches(&prefix).to_string()),
            )
        })))
    }

    /// (posted, pending) of every account of this case, plus the platform and escrow totals.
    async fn balances(
        &self,
    ) -> Result<(HashMap<String, (Decimal, Decimal)>, Decimal, Decimal), String> {
        let rows = sqlx::query(
            "SELECT name, credits_posted - debits_posted, debits_pending FROM ledger.accounts
             WHERE name LIKE $1 AND currency = 'USD'",
        )
        .bind(format!("c{}-%", self.id))
        .fetch_all(self.ledger.db())
        .await
        .map_err(|e| e.to_string())?;
        let totals = sqlx::query(
            "SELECT COALESCE(SUM(credits_posted - debits_posted) FILTER (WHERE kind = 'platform'), 0),
                    COALESCE(SUM(credits_pending) FILTER (WHERE kind = 'escrow'), 0)
             FROM ledger.accounts WHERE currency = 'USD'",
        )
        .fetch_one(self.ledger.db())
        .await
        .map_err(|e| e.to_string())?;
        Ok((
            rows.iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect(),
            totals.get(0),
            totals.get(1),
        ))
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

async fn run_case(
    ledger: &Ledger,
    id: u32,
    seq: &std::sync::atomic::AtomicU64,
    rounds: Vec<Vec<Op>>,
) -> Result<(), TestCaseError> {
    let case = Case { ledger, id, seq };
    let (_, platform0, escrow0) = case.balances().await.map_err(TestCaseError::fail)?;
    let mut model = Model::default();
    for (n, ops) in rounds.iter().enumerate() {
        let observed: Vec<Obs> = futures::future::join_all(ops.iter().map(|o| case.run(o)))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(TestCaseError::fail)?;
        let problems = taskbus_ledger::audit::check(ledger.db())
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            problems.is_empty(),
            "round {n} {ops:?}: invariants broken: {problems:?}"
        );
        let (accounts, platform, escrow) = case.balances().await.map_err(TestCaseError::fail)?;
        // Some serial order of this round must give these results and these balances.
        let mut found = None;
        for order in permutations(ops.len()) {
            let mut m = model.clone();
            let mut expected = vec![None; ops.len()];
            for &i in &order {
                expected[i] = Some(m.apply(&ops[i]));
            }
            let expected: Vec<Obs> = expected.into_iter().map(Option::unwrap).collect();
            if expected != observed {
                continue;
            }
            let payers_ok = (0u8..3).all(|p| {
                let want = m.payers.get(&p).copied().unwrap_or_default();
                let got = accounts.get(&case.payer(p)).copied().unwrap_or_default();
                want == got
            });
            let agents_ok = (0u8..2).all(|a| {
                m.agents.get(&a).copied().unwrap_or_default()
                    == accounts
                        .get(&case.agent(a))
                        .map(|x| x.0)
                        .unwrap_or_default()
            });
            let pending: Decimal = m.payers.values().map(|p| p.1).sum();
            if payers_ok
                && agents_ok
                && platform - platform0 == m.platform
                && escrow - escrow0 == pending
            {
                found = Some(m);
                break;
            }
        }
        match found {
            Some(m) => model = m,
            None => {
                return Err(TestCaseError::fail(format!(
                    "round {n}: ops {ops:?} gave {observed:?} and balances {accounts:?} (platform {}, escrow {}), \
                     which no serial order gives from model {model:?}",
                    platform - platform0,
                    escrow - escrow0
                )))
            }
        }
    }
    Ok(())
}

#[test]
fn concurrent_operations_match_the_model() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    let ledger = rt.block_on(async {
        let pool = taskbus_runtime::db::connect_and_migrate(&db.url, 8)
            .await
            .expect("migrate");
        let opts = LedgerOptions {
            shards: 4,
            ..Default::default()
        };
        Ledger::open(pool, &opts).await.expect("ledger opens")
    });
    let cases: u32 = std::env::var("LEDGER_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let next = AtomicU32::new(0);
    let seq = std::sync::atomic::AtomicU64::new(1);
    let mut runner = TestRunner::new(PropConfig {
        cases,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let result = runner.run(&prop::collection::vec(round(), 1..14), |rounds| {
        let id = next.fetch_add(1, Ordering::SeqCst);
        rt.block_on(run_case(&ledger, id, &seq, rounds))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
