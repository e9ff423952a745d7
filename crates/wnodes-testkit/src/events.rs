//! Builders for runs and events, and [`RunEvents`]: questions asked of a run's events.
//!
//! ```ignore
//! let r = run("31337").site("INFN-T1").lrms(Lrms::Lsf).attempt(2);
//! let ev = Events::new(HOST, "launcher@hv1.test").build(&r, vm_stopped("vm-1"));
//! let stopped: proto::VmStopped = events.the();
//! assert!(events.has(EventType::VmRunning), "{}", events.names());
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers: a failure is a test failure

use std::{collections::BTreeMap, path::Path, time::SystemTime};

use wnodes_bus::{EventExt, EventType, proto, proto::event::Body};

/// The site of a run built by [`run`] unless [`RunRefExt::site`] says otherwise.
pub const SITE: &str = "T1";

/// A run of job `job_id`: site [`SITE`], HTCondor, attempt 1. Change any of them with
/// [`RunRefExt`].
pub fn run(job_id: &str) -> proto::JobRunRef {
    proto::JobRunRef {
        site: SITE.into(),
        lrms: proto::Lrms::Htcondor as i32,
        job_id: job_id.into(),
        run_attempt: 1,
    }
}

/// Builder methods on a run reference.
pub trait RunRefExt: Sized {
    /// The same run at another site.
    #[must_use]
    fn site(self, site: &str) -> Self;
    /// The same run under another LRMS.
    #[must_use]
    fn lrms(self, lrms: proto::Lrms) -> Self;
    /// Another attempt of the same job.
    #[must_use]
    fn attempt(self, attempt: u32) -> Self;
}

impl RunRefExt for proto::JobRunRef {
    fn site(mut self, site: &str) -> Self {
        self.site = site.into();
        self
    }

    fn lrms(mut self, lrms: proto::Lrms) -> Self {
        self.lrms = lrms as i32;
        self
    }

    fn attempt(mut self, attempt: u32) -> Self {
        self.run_attempt = attempt;
        self
    }
}

/// An event payload (`proto::VmStopped`, ...): its type, and the way into and out of the
/// envelope's `body`.
pub trait Payload: Clone + std::fmt::Debug + Sized {
    /// The event type this payload is the body of.
    const TYPE: EventType;
    /// The payload as an envelope body.
    fn into_body(self) -> Body;
    /// The payload, when `body` is one of this type.
    fn of(body: &Body) -> Option<&Self>;
    /// The payload of `event`, when it is one of this type.
    fn of_event(event: &proto::Event) -> Option<&Self> {
        event.body.as_ref().and_then(Self::of)
    }
}

/// A payload about one VM (every `…Ready`, `…Failed`, `vm.running`, `vm.stopped`, `vm.failed`
/// and `resource.released`).
pub trait VmPayload: Payload {
    /// The VM the payload is about.
    fn vm_id(&self) -> &str;
}

/// `Payload` for every body type; `VmPayload` too for those listed after `vm:`, and
/// [`vm_id_of_body`] over them.
macro_rules! payloads {
    (run: $($r:ident),+; vm: $($v:ident),+ $(,)?) => {
        $(payloads!(@payload $r);)+
        $(
            payloads!(@payload $v);
            impl VmPayload for proto::$v {
                fn vm_id(&self) -> &str {
                    &self.vm_id
                }
            }
        )+

        /// The `vm_id` of a [`VmPayload`] body.
        fn vm_id_of_body(body: &Body) -> Option<&str> {
            match body {
                $(Body::$v(p) => Some(&p.vm_id),)+
                _ => None,
            }
        }
    };
    (@payload $t:ident) => {
        impl Payload for proto::$t {
            const TYPE: EventType = EventType::$t;
            fn into_body(self) -> Body {
                Body::$t(self)
            }
            fn of(body: &Body) -> Option<&Self> {
                match body {
                    Body::$t(p) => Some(p),
                    _ => None,
                }
            }
        }
    };
}

payloads!(
    run: JobQueued, JobStarted, JobFinished, JobCancelled, JobHeld, JobReleased, JobEvicted,
        JobStartObserved, VmRequested, UsageRecorded;
    vm: ImageReady, ImageFailed, ScratchReady, ScratchFailed, NetworkReady, NetworkFailed,
        StorageReady, StorageFailed, VmRunning, VmStopped, VmFailed, ResourceReleased,
);

/// What [`Events::build`] takes: a whole [`Body`] or any [`Payload`].
pub trait IntoBody {
    /// The envelope body.
    fn into_body(self) -> Body;
}

impl IntoBody for Body {
    fn into_body(self) -> Body {
        self
    }
}

impl<P: Payload> IntoBody for P {
    fn into_body(self) -> Body {
        Payload::into_body(self)
    }
}

/// Builds events as one producer (`source`, `"<service>@<host>"`) on one host would.
#[derive(Debug, Clone)]
pub struct Events {
    host: String,
    source: String,
}

impl Events {
    /// Events published on `host` by `source`.
    pub fn new(host: &str, source: &str) -> Self {
        Self {
            host: host.into(),
            source: source.into(),
        }
    }

    /// An event of `run` with its deterministic id ([`EventExt::build`]).
    pub fn build(&self, run: &proto::JobRunRef, body: impl IntoBody) -> proto::Event {
        proto::Event::build(run.clone(), &self.host, &self.source, body.into_body())
    }
}

/// `vm.requested` for `spec`.
pub fn vm_requested(spec: proto::VmSpec) -> proto::VmRequested {
    proto::VmRequested { spec: Some(spec) }
}

/// A VM spec with only its id.
pub fn vm_spec(vm_id: &str) -> proto::VmSpec {
    proto::VmSpec {
        vm_id: vm_id.into(),
        ..Default::default()
    }
}

/// `vm.stopped` of `vm_id`: the guest powered off.
pub fn vm_stopped(vm_id: &str) -> proto::VmStopped {
    proto::VmStopped {
        vm_id: vm_id.into(),
        stop_reason: "guest-poweroff".into(),
        ..Default::default()
    }
}

/// `vm.failed` of `vm_id` in `phase` ("policy", "image", ..., "launch") for `reason`.
pub fn vm_failed(vm_id: &str, phase: &str, reason: &str) -> proto::VmFailed {
    proto::VmFailed {
        vm_id: vm_id.into(),
        reason: reason.into(),
        phase: phase.into(),
    }
}

/// What a VM used: `cpu_seconds` of CPU, `peak_memory_bytes`, `wall` time on `cores` vCPUs.
pub fn vm_usage(
    cpu_seconds: f64,
    peak_memory_bytes: u64,
    wall: std::time::Duration,
    cores: u32,
) -> proto::VmUsage {
    proto::VmUsage {
        cpu_seconds,
        peak_memory_bytes,
        wall: prost_types::Duration::try_from(wall).ok(),
        cores,
        ..Default::default()
    }
}

/// `job.started` of `run` on `host` for `vo`, running `script` inline.
pub fn job_started(
    run: &proto::JobRunRef,
    host: &str,
    vo: &str,
    script: &str,
) -> proto::JobStarted {
    proto::JobStarted {
        job: Some(proto::JobDescription {
            run: Some(run.clone()),
            vo: vo.into(),
            host: host.into(),
            payload: Some(proto::JobPayload {
                kind: Some(proto::job_payload::Kind::InlineScript(
                    script.as_bytes().to_vec(),
                )),
                ..Default::default()
            }),
            ..Default::default()
        }),
        started_at: None,
    }
}

/// The four preparation results for a VM booting the test guest in `guest` (user-mode
/// network, no scratch disk, no storage).
pub fn ready_bodies(guest: &Path, vm_id: &str) -> [Body; 4] {
    [
        Body::ImageReady(proto::ImageReady {
            vm_id: vm_id.into(),
            image: "wnodes-test".into(),
            path: guest.join("rootfs.ext4").display().to_string(),
            format: "raw".into(),
            kernel_path: guest.join("vmlinux").display().to_string(),
            initrd_path: guest.join("initrd.img").display().to_string(),
            ..Default::default()
        }),
        Body::ScratchReady(proto::ScratchReady {
            vm_id: vm_id.into(),
            ..Default::default()
        }),
        // What the network service answers in user mode (it owns the MAC and addresses).
        Body::NetworkReady(proto::NetworkReady {
            vm_id: vm_id.into(),
            mode: proto::NetworkMode::User as i32,
            mac: "52:54:00:00:a0:b1".into(),
            address: "10.0.2.15/24".into(),
            gateway: "10.0.2.2".into(),
            ..Default::default()
        }),
        Body::StorageReady(proto::StorageReady {
            vm_id: vm_id.into(),
            ..Default::default()
        }),
    ]
}

/// The VM id an event is about (`vm.requested`'s spec, or a [`VmPayload`]'s `vm_id`).
pub fn vm_of(ev: &proto::Event) -> Option<String> {
    match ev.body.as_ref()? {
        Body::VmRequested(r) => r.spec.as_ref().map(|s| s.vm_id.clone()),
        body => vm_id_of_body(body).map(str::to_owned),
    }
}

/// The VM id of a `vm.requested` event.
///
/// # Panics
/// When `requested` is another event.
pub fn vm_id_of(requested: &proto::Event) -> String {
    match &requested.body {
        Some(Body::VmRequested(r)) => r.spec.as_ref().unwrap().vm_id.clone(),
        other => panic!("not a vm.requested: {other:?}"),
    }
}

/// An event as a test recorded it: the envelope, and when the stream stored it if known.
pub trait RecordedEvent {
    /// The envelope.
    fn event(&self) -> &proto::Event;
    /// JetStream's store time, when the event was read back from the stream.
    fn stored_at(&self) -> Option<SystemTime> {
        None
    }
}

/// A run's events read back from the stream (`wnodes_bus::runs`, the dev stack's
/// `run_events`) answer the same questions, with the time JetStream stored each.
impl RecordedEvent for wnodes_bus::runs::RunEvent {
    fn event(&self) -> &proto::Event {
        &self.event
    }

    fn stored_at(&self) -> Option<std::time::SystemTime> {
        Some(self.time)
    }
}

impl RecordedEvent for proto::Event {
    fn event(&self) -> &proto::Event {
        self
    }
}

/// The per-VM resource a `…Ready` stands for (the image is a shared cache entry, not released
/// per VM).
pub fn prepared_kind(t: EventType) -> Option<proto::ResourceKind> {
    match t {
        EventType::ScratchReady => Some(proto::ResourceKind::Scratch),
        EventType::NetworkReady => Some(proto::ResourceKind::Network),
        EventType::StorageReady => Some(proto::ResourceKind::Storage),
        _ => None,
    }
}

/// Questions asked of a run's events, in stream order. Every method that expects something
/// panics naming the events ([`RunEvents::names`]) when it is not there.
pub trait RunEvents {
    /// The event types in order.
    fn types(&self) -> Vec<EventType>;
    /// `"job.started, vm.requested, …"`.
    fn names(&self) -> String;
    /// True when an event of type `t` is there.
    fn has(&self, t: EventType) -> bool;
    /// How many events of type `t` there are.
    fn count(&self, t: EventType) -> usize;
    /// Position of the first event of type `t`.
    fn position(&self, t: EventType) -> usize;
    /// True when every type in `types` is there and each first shows up after the previous
    /// one's first.
    fn in_order(&self, types: &[EventType]) -> bool;
    /// Store time of the one event of type `t` (exactly one must be there).
    fn time_of(&self, t: EventType) -> SystemTime;
    /// Every payload of type `P`, in order.
    fn payloads<P: Payload>(&self) -> Vec<P>;
    /// The first payload of type `P`.
    fn first_payload<P: Payload>(&self) -> Option<P>;
    /// The one payload of type `P` (exactly one must be there).
    fn the<P: Payload>(&self) -> P;
    /// `resource.released` count by kind.
    fn released(&self) -> BTreeMap<i32, usize>;
    /// The per-VM resources a `…Ready` was published for, each once, in kind order.
    fn prepared(&self) -> Vec<proto::ResourceKind>;
}

impl<E: RecordedEvent> RunEvents for [E] {
    fn types(&self) -> Vec<EventType> {
        self.iter().filter_map(|e| e.event().event_type()).collect()
    }

    fn names(&self) -> String {
        self.types()
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn has(&self, t: EventType) -> bool {
        self.count(t) > 0
    }

    fn count(&self, t: EventType) -> usize {
        self.iter()
            .filter(|e| e.event().event_type() == Some(t))
            .count()
    }

    fn position(&self, t: EventType) -> usize {
        self.iter()
            .position(|e| e.event().event_type() == Some(t))
            .unwrap_or_else(|| panic!("no {} in {}", t.name(), self.names()))
    }

    fn in_order(&self, types: &[EventType]) -> bool {
        let firsts: Option<Vec<usize>> = types
            .iter()
            .map(|t| self.iter().position(|e| e.event().event_type() == Some(*t)))
            .collect();
        firsts.is_some_and(|f| f.windows(2).all(|w| w[0] < w[1]))
    }

    fn time_of(&self, t: EventType) -> SystemTime {
        assert_eq!(self.count(t), 1, "one {}: {}", t.name(), self.names());
        self[self.position(t)]
            .stored_at()
            .unwrap_or_else(|| panic!("{} has no store time", t.name()))
    }

    fn payloads<P: Payload>(&self) -> Vec<P> {
        self.iter()
            .filter_map(|e| P::of_event(e.event()).cloned())
            .collect()
    }

    fn first_payload<P: Payload>(&self) -> Option<P> {
        self.iter().find_map(|e| P::of_event(e.event()).cloned())
    }

    fn the<P: Payload>(&self) -> P {
        let all = self.payloads::<P>();
        assert_eq!(all.len(), 1, "one {}: {}", P::TYPE.name(), self.names());
        all.into_iter().next().unwrap()
    }

    fn released(&self) -> BTreeMap<i32, usize> {
        let mut m = BTreeMap::new();
        for r in self.payloads::<proto::ResourceReleased>() {
            *m.entry(r.kind).or_insert(0) += 1;
        }
        m
    }

    fn prepared(&self) -> Vec<proto::ResourceKind> {
        let mut k: Vec<_> = self.types().into_iter().filter_map(prepared_kind).collect();
        k.sort_by_key(|k| *k as i32);
        k.dedup();
        k
    }
}
