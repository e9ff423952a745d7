//! Conventions on top of the generated [`Event`] envelope: event type names, run keys and the
//! deterministic event ids that become `Nats-Msg-Id`.
//!
//! An event id is `<type>:<run key>` (e.g. `vm.requested:INFN-T1/htcondor/1001.0/1`). A run has
//! exactly one event of each type (one VM per run), so the id is the same every time a producer
//! derives it again from the same input: a redelivered `JobStarted` yields the same
//! `VmRequested` id, and JetStream drops the duplicate inside its window. `ResourceReleased`
//! adds the resource kind (`resource.released.scratch:...`).

use std::time::SystemTime;

use wnodes_proto::v1::{Event, JobRunRef, Lrms, ResourceKind, event::Body};

use crate::{error::BusError, subject};

/// The kind of an event, as named in subjects, ids, `ce-type` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    JobQueued,
    JobStarted,
    JobFinished,
    JobCancelled,
    JobHeld,
    JobReleased,
    JobEvicted,
    VmRequested,
    ImageReady,
    ImageFailed,
    ScratchReady,
    ScratchFailed,
    NetworkReady,
    NetworkFailed,
    StorageReady,
    StorageFailed,
    VmRunning,
    VmStopped,
    VmFailed,
    ResourceReleased,
    UsageRecorded,
    /// A start seen in the LRMS's own records (an observation; the launcher does not consume it).
    JobStartObserved,
}

impl EventType {
    /// Every event type.
    pub const ALL: [EventType; 22] = [
        Self::JobQueued,
        Self::JobStarted,
        Self::JobFinished,
        Self::JobCancelled,
        Self::JobHeld,
        Self::JobReleased,
        Self::JobEvicted,
        Self::VmRequested,
        Self::ImageReady,
        Self::ImageFailed,
        Self::ScratchReady,
        Self::ScratchFailed,
        Self::NetworkReady,
        Self::NetworkFailed,
        Self::StorageReady,
        Self::StorageFailed,
        Self::VmRunning,
        Self::VmStopped,
        Self::VmFailed,
        Self::ResourceReleased,
        Self::UsageRecorded,
        Self::JobStartObserved,
    ];

    /// Dotted name: the last two subject tokens, e.g. `"vm.requested"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::JobQueued => "job.queued",
            Self::JobStarted => "job.started",
            Self::JobFinished => "job.finished",
            Self::JobCancelled => "job.cancelled",
            Self::JobHeld => "job.held",
            Self::JobReleased => "job.released",
            Self::JobEvicted => "job.evicted",
            Self::VmRequested => "vm.requested",
            Self::ImageReady => "image.ready",
            Self::ImageFailed => "image.failed",
            Self::ScratchReady => "scratch.ready",
            Self::ScratchFailed => "scratch.failed",
            Self::NetworkReady => "network.ready",
            Self::NetworkFailed => "network.failed",
            Self::StorageReady => "storage.ready",
            Self::StorageFailed => "storage.failed",
            Self::VmRunning => "vm.running",
            Self::VmStopped => "vm.stopped",
            Self::VmFailed => "vm.failed",
            Self::ResourceReleased => "resource.released",
            Self::UsageRecorded => "usage.recorded",
            Self::JobStartObserved => "job.start_observed",
        }
    }

    /// CloudEvents `type` attribute, e.g. `it.infn.wnodes.vm.requested.v1`.
    pub fn cloudevents_type(self) -> &'static str {
        macro_rules! ce {
            ($($t:ident => $n:literal),+ $(,)?) => {
                match self { $(Self::$t => concat!("it.infn.wnodes.", $n, ".v1")),+ }
            };
        }
        ce! {
            JobQueued => "job.queued",
            JobStarted => "job.started",
            JobFinished => "job.finished",
            JobCancelled => "job.cancelled",
            JobHeld => "job.held",
            JobReleased => "job.released",
            JobEvicted => "job.evicted",
            VmRequested => "vm.requested",
            ImageReady => "image.ready",
            ImageFailed => "image.failed",
            ScratchReady => "scratch.ready",
            ScratchFailed => "scratch.failed",
            NetworkReady => "network.ready",
            NetworkFailed => "network.failed",
            StorageReady => "storage.ready",
            StorageFailed => "storage.failed",
            VmRunning => "vm.running",
            VmStopped => "vm.stopped",
            VmFailed => "vm.failed",
            ResourceReleased => "resource.released",
            UsageRecorded => "usage.recorded",
            JobStartObserved => "job.start_observed",
        }
    }

    /// The type of a body.
    pub fn of(body: &Body) -> Self {
        match body {
            Body::JobQueued(_) => Self::JobQueued,
            Body::JobStarted(_) => Self::JobStarted,
            Body::JobFinished(_) => Self::JobFinished,
            Body::JobCancelled(_) => Self::JobCancelled,
            Body::JobHeld(_) => Self::JobHeld,
            Body::JobReleased(_) => Self::JobReleased,
            Body::JobEvicted(_) => Self::JobEvicted,
            Body::VmRequested(_) => Self::VmRequested,
            Body::ImageReady(_) => Self::ImageReady,
            Body::ImageFailed(_) => Self::ImageFailed,
            Body::ScratchReady(_) => Self::ScratchReady,
            Body::ScratchFailed(_) => Self::ScratchFailed,
            Body::NetworkReady(_) => Self::NetworkReady,
            Body::NetworkFailed(_) => Self::NetworkFailed,
            Body::StorageReady(_) => Self::StorageReady,
            Body::StorageFailed(_) => Self::StorageFailed,
            Body::VmRunning(_) => Self::VmRunning,
            Body::VmStopped(_) => Self::VmStopped,
            Body::VmFailed(_) => Self::VmFailed,
            Body::ResourceReleased(_) => Self::ResourceReleased,
            Body::UsageRecorded(_) => Self::UsageRecorded,
            Body::JobStartObserved(_) => Self::JobStartObserved,
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Lowercase LRMS name used in run keys.
pub fn lrms_name(lrms: i32) -> &'static str {
    match Lrms::try_from(lrms).unwrap_or(Lrms::Unspecified) {
        Lrms::Unspecified => "unknown",
        Lrms::Htcondor => "htcondor",
        Lrms::Slurm => "slurm",
        Lrms::Pbs => "pbs",
        Lrms::Lsf => "lsf",
    }
}

/// The accounting key of a run: `site/lrms/job_id/attempt`.
pub fn run_key(run: &JobRunRef) -> String {
    format!(
        "{}/{}/{}/{}",
        run.site,
        lrms_name(run.lrms),
        run.job_id,
        run.run_attempt
    )
}

/// The CloudEvents 1.0 context attributes of an event, for tools and exports that speak
/// CloudEvents. They are derived from the envelope, not sent as NATS headers (ARCHITECTURE.md,
/// "CloudEvents"). Header names in binary mode are `ce-<attribute>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEventAttributes {
    pub specversion: &'static str,
    /// = the event id = `Nats-Msg-Id`.
    pub id: String,
    /// `<service>@<host>`.
    pub source: String,
    /// `it.infn.wnodes.<type>.v1`.
    pub r#type: &'static str,
    /// The run key.
    pub subject: String,
    /// RFC 3339, UTC; `None` when the event has no time.
    pub time: Option<String>,
    pub datacontenttype: &'static str,
}

impl CloudEventAttributes {
    /// Binary-mode header pairs (`ce-specversion`, `ce-id`, ...), in the spec's order.
    pub fn headers(&self) -> Vec<(&'static str, &str)> {
        let mut h = vec![
            ("ce-specversion", self.specversion),
            ("ce-id", self.id.as_str()),
            ("ce-source", self.source.as_str()),
            ("ce-type", self.r#type),
            ("ce-subject", self.subject.as_str()),
        ];
        if let Some(t) = &self.time {
            h.push(("ce-time", t.as_str()));
        }
        h.push(("ce-datacontenttype", self.datacontenttype));
        h
    }
}

/// Extension methods on the envelope.
pub trait EventExt {
    /// Builds an event with its deterministic id. `source` is `"<service>@<host>"`.
    fn build(run: JobRunRef, host: &str, source: &str, body: Body) -> Event;
    /// An event caused by this one: same run, same host, built by `source`. This is how a
    /// handler answers (a redelivered cause yields the same derived id).
    fn derive(&self, source: &str, body: Body) -> Event;
    /// The event's type, or `None` when it has no body (a malformed event).
    fn event_type(&self) -> Option<EventType>;
    /// The subject this event is published to.
    fn subject(&self) -> Result<String, BusError>;
    /// The run key (`site/lrms/job_id/attempt`), empty when the event has no run.
    fn run_key(&self) -> String;
    /// The CloudEvents attributes of this event, or `None` when it has no body.
    fn cloudevent(&self) -> Option<CloudEventAttributes>;
}

impl EventExt for Event {
    fn build(run: JobRunRef, host: &str, source: &str, body: Body) -> Event {
        let ty = EventType::of(&body);
        let mut id = format!("{}:{}", ty.name(), run_key(&run));
        if let Body::ResourceReleased(r) = &body {
            let kind = match ResourceKind::try_from(r.kind).unwrap_or(ResourceKind::Unspecified) {
                ResourceKind::Unspecified => "unspecified",
                ResourceKind::Scratch => "scratch",
                ResourceKind::Network => "network",
                ResourceKind::Storage => "storage",
                ResourceKind::Vm => "vm",
            };
            id = format!("{}.{kind}:{}", ty.name(), run_key(&run));
        }
        Event {
            id,
            time: Some(prost_types::Timestamp::from(SystemTime::now())),
            source: source.to_owned(),
            run: Some(run),
            host: host.to_owned(),
            body: Some(body),
        }
    }

    fn derive(&self, source: &str, body: Body) -> Event {
        Event::build(
            self.run.clone().unwrap_or_default(),
            &self.host,
            source,
            body,
        )
    }

    fn event_type(&self) -> Option<EventType> {
        self.body.as_ref().map(EventType::of)
    }

    fn subject(&self) -> Result<String, BusError> {
        let ty = self.event_type().ok_or(BusError::EmptyEvent)?;
        subject::event_subject(&self.host, ty.name())
    }

    fn run_key(&self) -> String {
        self.run.as_ref().map(run_key).unwrap_or_default()
    }

    fn cloudevent(&self) -> Option<CloudEventAttributes> {
        let ty = self.event_type()?;
        Some(CloudEventAttributes {
            specversion: "1.0",
            id: self.id.clone(),
            source: self.source.clone(),
            r#type: ty.cloudevents_type(),
            subject: self.run_key(),
            time: self.time.as_ref().map(|t| t.to_string()),
            datacontenttype: "application/protobuf",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_proto::v1::{JobCancelled, ResourceReleased};

    fn run() -> JobRunRef {
        JobRunRef {
            site: "INFN-T1".into(),
            lrms: Lrms::Htcondor as i32,
            job_id: "1001.0".into(),
            run_attempt: 2,
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct_per_type() {
        let a = Event::build(
            run(),
            "hv1",
            "t@x",
            Body::JobCancelled(JobCancelled::default()),
        );
        let b = Event::build(
            run(),
            "hv1",
            "t@y",
            Body::JobCancelled(JobCancelled::default()),
        );
        assert_eq!(a.id, b.id);
        assert_eq!(a.id, "job.cancelled:INFN-T1/htcondor/1001.0/2");
        let rel = |k: ResourceKind| {
            Event::build(
                run(),
                "hv1",
                "t",
                Body::ResourceReleased(ResourceReleased {
                    kind: k as i32,
                    ..Default::default()
                }),
            )
            .id
        };
        assert_ne!(rel(ResourceKind::Scratch), rel(ResourceKind::Network));
        assert_eq!(
            rel(ResourceKind::Scratch),
            "resource.released.scratch:INFN-T1/htcondor/1001.0/2"
        );
        assert_eq!(a.subject().unwrap(), "wnodes.evt.hv1.job.cancelled");
        let d = a.derive("svc@hv1", Body::JobCancelled(JobCancelled::default()));
        assert_eq!(
            (d.run, d.host.as_str(), d.id),
            (a.run.clone(), "hv1", a.id.clone())
        );
    }

    #[test]
    fn cloudevent_attributes_come_from_the_envelope() {
        let mut e = Event::build(
            run(),
            "hv1",
            "launcher@hv1",
            Body::JobCancelled(JobCancelled::default()),
        );
        e.time = Some(prost_types::Timestamp {
            seconds: 1_740_823_510,
            nanos: 0,
        });
        let ce = e.cloudevent().unwrap();
        assert_eq!(ce.id, "job.cancelled:INFN-T1/htcondor/1001.0/2");
        assert_eq!(ce.source, "launcher@hv1");
        assert_eq!(ce.r#type, "it.infn.wnodes.job.cancelled.v1");
        assert_eq!(ce.subject, "INFN-T1/htcondor/1001.0/2");
        assert_eq!(ce.time.as_deref(), Some("2025-03-01T10:05:10Z"));
        let names: Vec<_> = ce.headers().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "ce-specversion",
                "ce-id",
                "ce-source",
                "ce-type",
                "ce-subject",
                "ce-time",
                "ce-datacontenttype"
            ]
        );
        e.body = None;
        assert!(e.cloudevent().is_none());
    }

    #[test]
    fn every_type_has_a_unique_two_token_name() {
        let mut names: Vec<_> = EventType::ALL.iter().map(|t| t.name()).collect();
        assert!(names.iter().all(|n| n.split('.').count() == 2));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EventType::ALL.len());
        for (i, t) in EventType::ALL.iter().enumerate() {
            // `ALL` is in declaration order (metrics index by `as usize`).
            assert_eq!(*t as usize, i);
            assert_eq!(
                t.cloudevents_type(),
                format!("it.infn.wnodes.{}.v1", t.name())
            );
        }
    }
}
