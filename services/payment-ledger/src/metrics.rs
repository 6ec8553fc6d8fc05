//! Prometheus metrics of the ledger (prefix `taskbus_ledger_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            holds: Family::default(),
            settlements: Family::default(),
            bad_events: Family::default(),
            errors: Family::default(),
            settle_batch: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
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
    }

    pub fn count<L>(family: &Family<L, Counter>, label: &str, n: u64)
    where
        L: for<'a> From<&'a str> + Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
    {
        family.get_or_create(&L::from(label)).inc_by(n);
    }

    pub fn error(&self, stage: &str) {
        Self::count(&self.errors, stage, 1);
    }
}
