//! Slurm's queued jobs, polled (`[bridge.slurm_queue]`): Slurm 22.05 has no submit-time hook
//! that knows the job id, so the bridge asks `squeue -h -t PD -O …` every `every` and publishes
//! `job.queued` for each pending job's next run attempt (`RestartCnt` + 1; a requeued job waits
//! as its next attempt). The event id derives from the run key, so a job seen by many polls is
//! one event; the bridge also remembers what it published while the job stays pending, so it
//! does not send it again. A poll that fails is logged and counted, and the next one tries
//! again.

use std::{collections::HashSet, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wnodes_bus::ErrorChain;
use wnodes_lrms::{Item, LrmsEvent, LrmsKind, Publisher, State, slurm_cli};

/// `[bridge.slurm_queue]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmQueueConfig {
    /// Poll Slurm's pending jobs (default off).
    pub enabled: bool,
    /// `squeue` (a name on `PATH`, or a path); `SLURM_CONF` comes from the bridge's environment.
    pub squeue: PathBuf,
    /// How often (default 10 s).
    #[serde(with = "humantime_serde")]
    pub every: Duration,
}

impl Default for SlurmQueueConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            squeue: "squeue".into(),
            every: Duration::from_secs(10),
        }
    }
}

/// The queued events of squeue's answer (one line per pending job); lines that do not read
/// are returned as errors naming them.
pub fn queued_events(out: &str, now: jiff::Timestamp) -> (Vec<LrmsEvent>, Vec<String>) {
    let mut events = Vec::new();
    let mut bad = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        match slurm_cli::parse_squeue(line) {
            Ok(j) => {
                let mut e = LrmsEvent::new(LrmsKind::Slurm, j.job_id, State::Queued, now, "squeue");
                e.run_attempt = j.restarts.saturating_add(1);
                let u = &mut e.usage;
                u.user = Some(j.user).filter(|s| !s.is_empty());
                u.queue = Some(j.partition).filter(|s| !s.is_empty());
                u.cores = (j.cpus > 0).then_some(j.cpus);
                u.memory_request_bytes = (j.memory_bytes > 0).then_some(j.memory_bytes);
                events.push(e);
            }
            Err(why) => bad.push(format!("{line:?}: {why}")),
        }
    }
    (events, bad)
}

/// Polls until `shutdown`.
///
/// # Errors
/// Never: a failed poll or publish is logged and tried again at the next poll.
pub async fn run(
    config: SlurmQueueConfig,
    publisher: Publisher,
    shutdown: CancellationToken,
) -> Result<(), crate::BridgeError> {
    let format = slurm_cli::squeue_format();
    // Run keys published and still pending at the last poll.
    let mut published: HashSet<(String, u32)> = HashSet::new();
    let mut tick = tokio::time::interval(config.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let mut c = tokio::process::Command::new(&config.squeue);
        c.args(["-h", "-t", "PD", "-O", &format])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(Duration::from_secs(30), c.output()).await {
            Ok(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(Ok(o)) => {
                tracing::warn!(squeue = %config.squeue.display(), said = %String::from_utf8_lossy(&o.stderr).trim(), "squeue failed; trying again at the next poll.");
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(squeue = %config.squeue.display(), error = %e, "Cannot run squeue; trying again at the next poll.");
                continue;
            }
            Err(_) => {
                tracing::warn!(squeue = %config.squeue.display(), "squeue did not answer within 30 s; trying again at the next poll.");
                continue;
            }
        };
        let (events, bad) = queued_events(&out, jiff::Timestamp::now());
        for b in &bad {
            tracing::warn!(line = %b, "An squeue line that does not read: skipped.");
        }
        let pending: HashSet<(String, u32)> = events
            .iter()
            .map(|e| (e.job_id.clone(), e.run_attempt))
            .collect();
        let new: Vec<Item> = events
            .into_iter()
            .filter(|e| !published.contains(&(e.job_id.clone(), e.run_attempt)))
            .map(|e| Item::Event(Box::new(e)))
            .collect();
        if new.is_empty() {
            published.retain(|k| pending.contains(k));
            continue;
        }
        match publisher.publish_items(&new).await {
            Ok(()) => {
                tracing::info!(queued = new.len(), "Published Slurm's newly pending jobs.");
                published = pending;
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "Cannot publish Slurm's pending jobs; trying again at the next poll.");
                published.retain(|k| pending.contains(k));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// squeue 22.05's answer for two pending jobs (one requeued once), as printed on this
    /// project's machine for the agent's fields, and one line that does not read.
    #[test]
    fn pending_jobs_become_queued_events_of_their_next_attempt() {
        let out = "20|65534|65534|nobody|PENDING|1|wnodes|demo|UNLIMITED||\n\
                   21|1000|100|alice|PENDING|0|wnodes|atlas|1:00:00|cpu=2,mem=512M|\n\
                   garbage\n";
        let (events, bad) = queued_events(out, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("garbage"), "{bad:?}");
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[0].job_id.as_str(), events[0].run_attempt),
            ("20", 2)
        );
        assert_eq!(events[0].state, State::Queued);
        assert_eq!(events[0].usage.user.as_deref(), Some("nobody"));
        assert_eq!(events[0].usage.cores, None);
        assert_eq!(
            (events[1].job_id.as_str(), events[1].run_attempt),
            ("21", 1)
        );
        assert_eq!(events[1].usage.cores, Some(2));
        assert_eq!(events[1].usage.memory_request_bytes, Some(512 << 20));
        assert_eq!(events[1].usage.queue.as_deref(), Some("wnodes"));
    }
}
