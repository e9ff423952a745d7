//! A run's events read back from the events stream, and its per-phase timeline: what
//! `wnodesctl job`, the dev stack's demo and the benchmarks show of one run.
//!
//! Reading needs `STREAM.INFO` and `DIRECT.GET` on the events stream (the `monitor` identity
//! has both); it walks the messages of one host's subjects (or of all), one direct get per
//! message, so it suits an operator's question about one run, not bulk reads.

use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use prost::Message;
use wnodes_proto::v1 as proto;

use crate::{
    error::BusError,
    event::{EventExt, EventType},
    subject,
};

/// One event of a run, with the time JetStream stored it.
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub event_type: EventType,
    /// JetStream's publish (store) time of the message.
    pub time: SystemTime,
    pub event: proto::Event,
    /// The trace id of the message's `traceparent`, when it has one.
    pub trace_id: Option<String>,
    /// Its sequence in the events stream.
    pub sequence: u64,
}

/// One phase of a run: from one event to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// e.g. `"job.started → vm.requested"`.
    pub name: String,
    pub duration: Duration,
}

/// The trace id (32 hex digits) of a W3C `traceparent` value.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// Every event of the run `run_key` (`site/lrms/job_id/attempt`) in the events stream, in
/// stream order; only `host`'s subjects when given (and the `_queued` ones, where a run's
/// `job.queued` is).
pub async fn read(
    js: &jetstream::Context,
    run_key: &str,
    host: Option<&str>,
) -> Result<Vec<RunEvent>, BusError> {
    let filters = match host {
        Some(h) => vec![
            subject::host_filter(h)?,
            subject::event_subject("", EventType::JobQueued.name())?,
        ],
        None => vec![subject::EVENTS_SUBJECTS.to_owned()],
    };
    read_subjects(js, &format!("run {run_key}"), filters, |event| {
        event.run.as_ref().map(crate::event::run_key).as_deref() == Some(run_key)
    })
    .await
}

/// The events on `filters` that `keep` keeps, in stream order (each message once), walked
/// with one direct get per message. `what` names them in an error.
pub async fn read_subjects(
    js: &jetstream::Context,
    what: &str,
    filters: Vec<String>,
    keep: impl Fn(&proto::Event) -> bool,
) -> Result<Vec<RunEvent>, BusError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| BusError::EventsRead {
        what: what.to_owned(),
        source: e,
    };
    let stream = js
        .get_stream(subject::EVENTS_STREAM)
        .await
        .map_err(|e| err(Box::new(e)))?;
    let mut out = Vec::new();
    for filter in filters {
        let mut next = 1u64;
        loop {
            let msg = match stream
                .direct_get_next_for_subject(filter.clone(), Some(next))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(err(Box::new(e))),
            };
            next = msg.sequence + 1;
            let Ok(event) = proto::Event::decode(msg.payload.as_ref()) else {
                continue;
            };
            if !keep(&event) {
                continue;
            }
            let Some(event_type) = event.event_type() else {
                continue;
            };
            out.push(RunEvent {
                event_type,
                time: SystemTime::from(msg.time),
                trace_id: msg
                    .headers
                    .get("traceparent")
                    .and_then(|v| trace_id_of(v.as_str())),
                sequence: msg.sequence,
                event,
            });
        }
    }
    out.sort_by_key(|e| e.sequence);
    out.dedup_by_key(|e| e.sequence);
    Ok(out)
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
            trace_id: None,
            sequence: ms,
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

#[cfg(test)]
mod trace_tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        assert_eq!(
            trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_id_of("garbage"), None);
        assert_eq!(trace_id_of("00-xyz-b7ad6b7169203331-01"), None);
    }
}
