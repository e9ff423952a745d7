//! A run's events read back from the `WNODES_EVENTS` stream, and the per-phase timeline.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use prost::Message;
use wnodes_bus::{EventExt, EventType, proto, subject};

use crate::Stack;

/// One event of a run, with the time JetStream stored it.
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub event_type: EventType,
    /// JetStream's publish (store) time of the message.
    pub time: SystemTime,
    pub event: proto::Event,
}

/// A run's events answer `wnodes_testkit::events::RunEvents` (has, count, the one `VmStopped`,
/// ...) in the system tests.
impl wnodes_testkit::events::RecordedEvent for RunEvent {
    fn event(&self) -> &proto::Event {
        &self.event
    }

    fn stored_at(&self) -> Option<SystemTime> {
        Some(self.time)
    }
}

/// One phase of a run: from one event to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// e.g. `"job.started → vm.requested"`.
    pub name: String,
    pub duration: Duration,
}

impl Stack {
    /// Every event of `run` (a run key `site/lrms/job_id/attempt`, or a job id meaning its
    /// attempt 1) in `WNODES_EVENTS`, in stream order. Reads the whole stream: fine for a dev
    /// stack's few thousand events.
    pub async fn run_events(&self, run: &str) -> anyhow::Result<Vec<RunEvent>> {
        let key = self.run_key_of(run);
        let client = wnodes_bus::connect::connect(&self.nats_admin(), "wnodes-dev", None, None)
            .await
            .context("connecting to nats-server as the admin")?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js
            .get_stream(subject::EVENTS_STREAM)
            .await
            .context("looking up WNODES_EVENTS")?;
        let state = stream
            .info()
            .await
            .context("WNODES_EVENTS info")?
            .state
            .clone();
        let mut out = Vec::new();
        for seq in state.first_sequence.max(1)..=state.last_sequence {
            let Ok(msg) = stream.get_raw_message(seq).await else {
                continue;
            };
            let Ok(event) = proto::Event::decode(msg.payload.as_ref()) else {
                continue;
            };
            if event.run.as_ref().map(wnodes_bus::event::run_key) != Some(key.clone()) {
                continue;
            }
            let Some(event_type) = event.event_type() else {
                continue;
            };
            out.push(RunEvent {
                event_type,
                time: SystemTime::from(msg.time),
                event,
            });
        }
        Ok(out)
    }
}

fn first(events: &[RunEvent], t: EventType) -> Option<SystemTime> {
    events
        .iter()
        .filter(|e| e.event_type == t)
        .map(|e| e.time)
        .min()
}

fn last(events: &[RunEvent], t: EventType) -> Option<SystemTime> {
    events
        .iter()
        .filter(|e| e.event_type == t)
        .map(|e| e.time)
        .max()
}

fn between(name: &str, a: Option<SystemTime>, b: Option<SystemTime>) -> Option<Phase> {
    let d = b?.duration_since(a?).unwrap_or_default();
    Some(Phase {
        name: name.into(),
        duration: d,
    })
}

/// The per-phase durations of a run (phases whose events are missing are left out):
/// `job.started → vm.requested`; `vm.requested →` each of `image.ready`, `scratch.ready`,
/// `network.ready`, `storage.ready`; `last ready → vm.running`; `vm.running → vm.stopped`;
/// `vm.stopped → all released`; `vm.stopped → usage.recorded`; and `job.started →
/// usage.recorded` (total).
pub fn timeline(events: &[RunEvent]) -> Vec<Phase> {
    use EventType as T;
    let started = first(events, T::JobStarted);
    let requested = first(events, T::VmRequested);
    let running = first(events, T::VmRunning);
    let stopped = first(events, T::VmStopped).or_else(|| first(events, T::VmFailed));
    let readies = [
        T::ImageReady,
        T::ScratchReady,
        T::NetworkReady,
        T::StorageReady,
    ];
    let last_ready = readies.iter().filter_map(|t| first(events, *t)).max();
    let mut out = Vec::new();
    out.extend(between("job.started → vm.requested", started, requested));
    for t in readies {
        out.extend(between(
            &format!("vm.requested → {}", t.name()),
            requested,
            first(events, t),
        ));
    }
    out.extend(between("last ready → vm.running", last_ready, running));
    out.extend(between("vm.running → vm.stopped", running, stopped));
    out.extend(between(
        "vm.stopped → all released",
        stopped,
        last(events, T::ResourceReleased),
    ));
    out.extend(between(
        "vm.stopped → usage.recorded",
        stopped,
        first(events, T::UsageRecorded),
    ));
    out.extend(between(
        "job.started → usage.recorded (total)",
        started,
        first(events, T::UsageRecorded),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: EventType, ms: u64) -> RunEvent {
        RunEvent {
            event_type: t,
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
            event: proto::Event::default(),
        }
    }

    #[test]
    fn phases_run_from_each_event_to_the_next_and_skip_missing_ones() {
        use EventType as T;
        let events = [
            ev(T::JobStarted, 1000),
            ev(T::VmRequested, 1010),
            ev(T::ScratchReady, 1050),
            ev(T::NetworkReady, 1060),
            ev(T::StorageReady, 1070),
            ev(T::ImageReady, 1500),
            ev(T::VmRunning, 1700),
            ev(T::VmStopped, 5700),
            ev(T::ResourceReleased, 5710),
            ev(T::ResourceReleased, 5730),
            ev(T::UsageRecorded, 5720),
        ];
        let p = timeline(&events);
        let get = |name: &str| {
            p.iter()
                .find(|x| x.name == name)
                .map(|x| x.duration.as_millis())
        };
        assert_eq!(get("job.started → vm.requested"), Some(10));
        assert_eq!(get("vm.requested → image.ready"), Some(490));
        assert_eq!(get("last ready → vm.running"), Some(200));
        assert_eq!(get("vm.running → vm.stopped"), Some(4000));
        assert_eq!(get("vm.stopped → all released"), Some(30));
        assert_eq!(get("vm.stopped → usage.recorded"), Some(20));
        assert_eq!(get("job.started → usage.recorded (total)"), Some(4720));
        assert_eq!(p.len(), 10);
        // A VM that failed before running: no running/stopped phases.
        let failed = [
            ev(T::JobStarted, 0),
            ev(T::VmRequested, 5),
            ev(T::VmFailed, 9),
        ];
        let p = timeline(&failed);
        assert_eq!(p.len(), 1, "{p:?}");
    }
}
