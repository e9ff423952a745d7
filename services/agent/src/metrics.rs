//! The host agent's Prometheus metrics (`wnodes_agent_*`).

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub(crate) started: Counter,
    pub(crate) refusals: Family<Labels, Counter>,
    pub(crate) starters_lost: Counter,
    pub(crate) live: Gauge,
}

impl Metrics {
    /// Registers the metrics under `wnodes_agent_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("wnodes_agent");
        r.register(
            "runs_started",
            "Runs started for a job starter (JobStarted published)",
            m.started.clone(),
        );
        r.register(
            "refusals",
            "Job starters refused, by reason (not_in_job, uid, claimed_job, dev_identity, ...)",
            m.refusals.clone(),
        );
        r.register(
            "starters_lost",
            "Runs cancelled because their job starter's connection closed before the run ended",
            m.starters_lost.clone(),
        );
        r.register(
            "live_runs",
            "Runs whose job starter is connected",
            m.live.clone(),
        );
        m
    }

    pub(crate) fn accepted(&self) {
        self.started.inc();
    }

    pub(crate) fn refused(&self, kind: &'static str) {
        self.refusals
            .get_or_create(&vec![("reason", kind.to_owned())])
            .inc();
    }

    /// Job starters refused for `reason`.
    pub fn refusals(&self, reason: &str) -> u64 {
        self.refusals
            .get_or_create(&vec![("reason", reason.to_owned())])
            .get()
    }
}
