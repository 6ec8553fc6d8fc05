//! Prometheus metrics of the coordinator.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabel {
    pub schedule: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub admitted: Counter,
    pub duplicates: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub outcomes: Family<OutcomeLabel, Counter>,
    pub batch_size: Histogram,
    pub errors: Family<StageLabel, Counter>,
    pub pruned: Family<StatusLabel, Counter>,
    /// Schedule ticks this replica submitted (every replica submits every tick; the copies are
    /// dropped as duplicates).
    pub schedule_fired: Family<ScheduleLabel, Counter>,
    /// Schedule ticks passed over because they were older than the misfire grace.
    pub schedule_skipped: Family<ScheduleLabel, Counter>,
    /// Invalid revisions seen in the schedules bucket.
    pub schedule_invalid: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            admitted: Counter::default(),
            duplicates: Counter::default(),
            rejected: Family::default(),
            outcomes: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            errors: Family::default(),
            pruned: Family::default(),
            schedule_fired: Family::default(),
            schedule_skipped: Family::default(),
            schedule_invalid: Counter::default(),
        }
    }
}

impl Metrics {
    /// The service's registry: every family under the prefix `taskbus_coordinator_`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("taskbus_coordinator");
        self.register(&mut r);
        r
    }

    fn register(&self, r: &mut Registry) {
        r.register("admitted", "Tasks admitted", self.admitted.clone());
        r.register(
            "duplicates",
            "Submit messages dropped because their task id was already admitted",
            self.duplicates.clone(),
        );
        r.register(
            "rejected",
            "Submit messages rejected, by reason",
            self.rejected.clone(),
        );
        r.register(
            "outcomes",
            "Outcomes recorded, by outcome",
            self.outcomes.clone(),
        );
        r.register(
            "admission_batch_size",
            "Messages per admission batch",
            self.batch_size.clone(),
        );
        r.register("errors", "Transient errors, by stage", self.errors.clone());
        r.register(
            "tasks_pruned",
            "Finished task records deleted by the retention settings, by status",
            self.pruned.clone(),
        );
        r.register(
            "schedule_ticks_fired",
            "Schedule ticks submitted by this replica (each replica submits every tick; \
             admission keeps one), by schedule",
            self.schedule_fired.clone(),
        );
        r.register(
            "schedule_ticks_skipped",
            "Schedule ticks not submitted because they were older than the misfire grace, \
             by schedule",
            self.schedule_skipped.clone(),
        );
        r.register(
            "schedule_invalid_entries",
            "Invalid entries (revisions) seen in the schedules bucket and ignored",
            self.schedule_invalid.clone(),
        );
    }

    pub fn error(&self, stage: &str) {
        self.errors
            .get_or_create(&StageLabel {
                stage: stage.into(),
            })
            .inc();
    }
}
