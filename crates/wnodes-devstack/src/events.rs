//! A run's events read back from the `WNODES_EVENTS` stream (`wnodes_bus::runs`).

use anyhow::Context;

pub use wnodes_bus::runs::{Phase, RunEvent, timeline};

use crate::Stack;

impl Stack {
    /// Every event of `run` (a run key `site/lrms/job_id/attempt`, or a job id meaning its
    /// attempt 1) in `WNODES_EVENTS`, in stream order, read as the monitor.
    pub async fn run_events(&self, run: &str) -> anyhow::Result<Vec<RunEvent>> {
        let key = self.run_key_of(run);
        let client = wnodes_bus::connect::connect(&self.nats_monitor(), "wnodes-dev", None, None)
            .await
            .context("connecting to nats-server as the monitor")?;
        let js = async_nats::jetstream::new(client);
        wnodes_bus::runs::read(&js, &key, None)
            .await
            .with_context(|| format!("reading the events of {key}"))
    }
}
