//! Accounting's Prometheus metrics.

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// Accounting's Prometheus metrics (`wnodes_accounting_*`); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub(crate) records: Counter,
    pub(crate) vm_failed: Family<Labels, Counter>,
}

impl Metrics {
    /// Registers the metrics under `wnodes_accounting_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("wnodes_accounting");
        r.register("usage_records", "Usage records written", m.records.clone());
        r.register(
            "vm_failed",
            "Runs whose VM failed before it ran (no usage record), by phase",
            m.vm_failed.clone(),
        );
        m
    }

    /// Usage records written by this process.
    pub fn records(&self) -> u64 {
        self.records.get()
    }

    /// `VmFailed` events seen by this process in `phase`.
    pub fn vm_failed(&self, phase: &str) -> u64 {
        self.vm_failed
            .get_or_create(&vec![("phase", phase.to_owned())])
            .get()
    }
}
