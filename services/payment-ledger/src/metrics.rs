//! Prometheus metrics of the ledger (prefix `taskbus_ledger_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One label set per label name, so each family's label says what its values are:
/// `holds{status}`, `settlements{outcome}`, `bad_events{reason}`, `errors{stage}`.
macro_rules! label_set {
    ($name:ident, $field:ident) => {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        pub struct $name {
            pub $field: String,
        }
        impl From<&str> for $name {
            fn from(v: &str) -> Self {
                Self { $field: v.into() }
            }
        }
    };
}
label_set!(Status, status);
label_set!(Outcome, outcome);
label_set!(Reason, reason);
label_set!(Stage, stage);
label_set!(Currency, currency);

/// What payers spent, by currency and pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Spend {
    pub currency: String,
    pub pool: String,
}

/// Amounts as floats: monitoring figures, not accounting (the ledger's tables are exact).
pub type AmountCounter = Counter<f64, std::sync::atomic::AtomicU64>;
pub type AmountGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone)]
pub struct Metrics {
    /// Hold results by status (`new`, `repeat`, `insufficient_funds`, `invalid`).
    pub holds: Family<Status, Counter>,
    /// Resolved holds by outcome (`posted`, `voided`).
    pub settlements: Family<Outcome, Counter>,
    /// Events refused by settlement, by reason.
    pub bad_events: Family<Reason, Counter>,
    /// Transient errors, by stage.
    pub errors: Family<Stage, Counter>,
    pub settle_batch: Histogram,
    /// Paid for succeeded tasks (the agent's and the platform's shares), by currency and pool.
    pub spent: Family<Spend, AmountCounter>,
    /// `--spend-budget-per-hour`, by currency (only those configured).
    pub spend_budget: Family<Currency, AmountGauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            holds: Family::default(),
            settlements: Family::default(),
            bad_events: Family::default(),
            errors: Family::default(),
            settle_batch: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            spent: Family::default(),
            spend_budget: Family::default(),
        }
    }
}

impl Metrics {
    /// The service's registry: every family under the prefix `taskbus_ledger_`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("taskbus_ledger");
        self.register(&mut r);
        r
    }

    fn register(&self, r: &mut Registry) {
        r.register("holds", "Hold results, by status", self.holds.clone());
        r.register(
            "settlements",
            "Holds resolved, by outcome",
            self.settlements.clone(),
        );
        r.register(
            "bad_events",
            "Events settlement could not use, by reason",
            self.bad_events.clone(),
        );
        r.register("errors", "Transient errors, by stage", self.errors.clone());
        r.register(
            "settle_batch_size",
            "Events per settlement batch",
            self.settle_batch.clone(),
        );
        r.register(
            "spent",
            "Paid for succeeded tasks (agent and platform shares), by currency and pool, in the currency's units",
            self.spent.clone(),
        );
        r.register(
            "spend_budget_per_hour",
            "Hourly spend above which TaskbusSpendOverBudget fires (--spend-budget-per-hour), by currency",
            self.spend_budget.clone(),
        );
    }

    pub fn count<L>(family: &Family<L, Counter>, label: &str, n: u64)
    where
        L: for<'a> From<&'a str> + Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
    {
        family.get_or_create(&L::from(label)).inc_by(n);
    }

    /// Add a posted hold's agent and platform shares to `spent`.
    pub fn spend(&self, r: &crate::store::SettledRecord) {
        use rust_decimal::prelude::ToPrimitive;
        let amount = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap_or_default();
        // Summed exactly, then converted: 0.81 + 0.09 is 0.9, not 0.9000000000000001.
        let paid = (amount(&r.agent_amount) + amount(&r.platform_amount))
            .to_f64()
            .unwrap_or(0.0);
        if paid > 0.0 {
            self.spent
                .get_or_create(&Spend {
                    currency: r.currency.clone(),
                    pool: r.pool.clone(),
                })
                .inc_by(paid);
        }
    }

    pub fn error(&self, stage: &str) {
        Self::count(&self.errors, stage, 1);
    }
}
