//! The events a preparer reads ([`Incoming`]: a VM requested, a VM ended) and answers with,
//! keyed by its resource kind ([`Events`]): `<kind>.ready`, `<kind>.failed` and
//! `resource.released` (with the kind). Each answer is derived from the event that caused it
//! ([`EventExt::derive`]): same run, same host, a deterministic id, so a redelivered cause yields
//! the same event.

use std::{fmt, marker::PhantomData};

use serde::{Serialize, de::DeserializeOwned};
use wnodes_bus::{
    EventExt, HandlerCtx, HandlerError,
    proto::{self, event::Body},
};

use crate::{
    row::{Kind, Released},
    table::Table,
};

/// An incoming event, as a preparer sees it.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'a> {
    /// `vm.requested`: prepare for this spec.
    Requested(&'a proto::VmSpec),
    /// `vm.stopped` or `vm.failed`: release what the VM holds. The id may be empty (the
    /// service then derives it from the run, or has nothing to release).
    Ended { vm_id: &'a str },
    /// Any other body (the gateway's `network.ready`), or none.
    Other(Option<&'a Body>),
}

impl<'a> Incoming<'a> {
    /// Sorts `event`; a `vm.requested` without a spec is rejected (it can never be handled).
    pub fn of(event: &'a proto::Event) -> Result<Self, HandlerError> {
        Ok(match &event.body {
            Some(Body::VmRequested(r)) => Self::Requested(
                r.spec
                    .as_ref()
                    .ok_or_else(|| HandlerError::reject("vm.requested without a VmSpec"))?,
            ),
            Some(Body::VmStopped(s)) => Self::Ended { vm_id: &s.vm_id },
            Some(Body::VmFailed(f)) => Self::Ended { vm_id: &f.vm_id },
            other => Self::Other(other.as_ref()),
        })
    }
}

/// The ready body of a kind: `ScratchReady`, `NetworkReady` or `StorageReady`.
pub trait ReadyBody {
    /// The kind this body announces.
    const KIND: Kind;
    /// The body of the envelope.
    fn into_body(self) -> Body;
}

impl ReadyBody for proto::ScratchReady {
    const KIND: Kind = Kind::Scratch;
    fn into_body(self) -> Body {
        Body::ScratchReady(self)
    }
}

impl ReadyBody for proto::NetworkReady {
    const KIND: Kind = Kind::Network;
    fn into_body(self) -> Body {
        Body::NetworkReady(self)
    }
}

impl ReadyBody for proto::StorageReady {
    const KIND: Kind = Kind::Storage;
    fn into_body(self) -> Body {
        Body::StorageReady(self)
    }
}

/// The failed body of a kind.
fn failed_body(kind: Kind, vm_id: String, reason: String) -> Body {
    match kind {
        Kind::Scratch => Body::ScratchFailed(proto::ScratchFailed { vm_id, reason }),
        Kind::Network => Body::NetworkFailed(proto::NetworkFailed { vm_id, reason }),
        Kind::Storage => Body::StorageFailed(proto::StorageFailed { vm_id, reason }),
    }
}

/// The builders of one preparer: the kind comes from its ready body `R`, `source` is
/// `"<service>@<host>"`.
pub struct Events<'a, R> {
    source: &'a str,
    _ready: PhantomData<fn(R)>,
}

impl<R> fmt::Debug for Events<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("source", &self.source)
            .finish()
    }
}

impl<R> Clone for Events<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Events<'_, R> {}

impl<'a, R: ReadyBody> Events<'a, R> {
    /// Builders that sign events with `source`.
    pub fn new(source: &'a str) -> Self {
        Self {
            source,
            _ready: PhantomData,
        }
    }

    /// The kind these events are about.
    pub fn kind(&self) -> Kind {
        R::KIND
    }

    /// `<kind>.ready`.
    pub fn ready(&self, cause: &proto::Event, ready: R) -> proto::Event {
        cause.derive(self.source, ready.into_body())
    }

    /// `<kind>.failed`, saying why.
    pub fn failed(&self, cause: &proto::Event, vm_id: &str, reason: String) -> proto::Event {
        cause.derive(self.source, failed_body(R::KIND, vm_id.to_owned(), reason))
    }

    /// `resource.released` of this kind, saying what was removed.
    pub fn released(&self, cause: &proto::Event, vm_id: &str, detail: String) -> proto::Event {
        self.released_counted(cause, vm_id, detail, None)
    }

    /// [`Events::released`] with what the storage gateway carried, when it counted it all.
    pub fn released_counted(
        &self,
        cause: &proto::Event,
        vm_id: &str,
        detail: String,
        traffic: Option<proto::GatewayTraffic>,
    ) -> proto::Event {
        cause.derive(
            self.source,
            Body::ResourceReleased(proto::ResourceReleased {
                vm_id: vm_id.to_owned(),
                kind: R::KIND.proto() as i32,
                detail,
                traffic,
            }),
        )
    }

    /// The end of a release, once the host resource is gone: the row of `vm_id` in `table`
    /// says released, in the handler's transaction (a tombstone of `tombstone` when there was
    /// no row), and `resource.released` saying `detail` is staged, to go out when the key
    /// commits. A store error is retried.
    pub async fn release<D: Serialize + DeserializeOwned>(
        &self,
        ctx: &mut HandlerCtx,
        table: &Table<D>,
        cause: &proto::Event,
        vm_id: &str,
        tombstone: &D,
        detail: String,
    ) -> Result<Released<D>, HandlerError> {
        self.release_counted(ctx, table, cause, vm_id, tombstone, detail, None)
            .await
    }

    /// [`Events::release`] whose event carries what the storage gateway carried.
    #[allow(clippy::too_many_arguments)]
    pub async fn release_counted<D: Serialize + DeserializeOwned>(
        &self,
        ctx: &mut HandlerCtx,
        table: &Table<D>,
        cause: &proto::Event,
        vm_id: &str,
        tombstone: &D,
        detail: String,
        traffic: Option<proto::GatewayTraffic>,
    ) -> Result<Released<D>, HandlerError> {
        debug_assert_eq!(
            table.kind(),
            R::KIND,
            "the table and the events of one kind"
        );
        let conn = ctx.tx().await?;
        let released = table
            .release(conn, vm_id, &cause.run_key(), tombstone)
            .await
            .map_err(HandlerError::retry)?;
        tracing::info!(vm_id, kind = %R::KIND, %detail, "Resource released.");
        ctx.publish(self.released_counted(cause, vm_id, detail, traffic));
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_bus::EventType;

    fn cause() -> proto::Event {
        proto::Event::build(
            proto::JobRunRef {
                site: "T1".into(),
                job_id: "7".into(),
                run_attempt: 1,
                ..Default::default()
            },
            "hv1",
            "launcher@hv1",
            Body::VmStopped(proto::VmStopped {
                vm_id: "vm-a".into(),
                ..Default::default()
            }),
        )
    }

    fn check<R: ReadyBody>(ready: R, types: [EventType; 2], kind: proto::ResourceKind) {
        let ev = Events::<R>::new("svc@hv1");
        let c = cause();
        let r = ev.ready(&c, ready);
        let f = ev.failed(&c, "vm-a", "no room".into());
        let rel = ev.released(&c, "vm-a", "removed it".into());
        assert_eq!([r.event_type(), f.event_type()], types.map(Some));
        for e in [&r, &f, &rel] {
            assert_eq!((e.source.as_str(), e.host.as_str()), ("svc@hv1", "hv1"));
            assert_eq!(e.run, c.run);
        }
        match (&f.body, &rel.body) {
            (
                Some(Body::ScratchFailed(proto::ScratchFailed { vm_id, reason }))
                | Some(Body::NetworkFailed(proto::NetworkFailed { vm_id, reason }))
                | Some(Body::StorageFailed(proto::StorageFailed { vm_id, reason })),
                Some(Body::ResourceReleased(rr)),
            ) => {
                assert_eq!((vm_id.as_str(), reason.as_str()), ("vm-a", "no room"));
                assert_eq!(
                    (rr.vm_id.as_str(), rr.kind, rr.detail.as_str()),
                    ("vm-a", kind as i32, "removed it")
                );
            }
            other => panic!("unexpected bodies {other:?}"),
        }
        // A redelivered cause yields the same ids; the kinds' releases differ.
        assert_eq!(ev.released(&c, "vm-a", "again".into()).id, rel.id);
        assert!(rel.id.contains(R::KIND.as_str()), "{}", rel.id);
    }

    #[test]
    fn incoming_events_are_sorted_and_a_request_without_spec_is_rejected() {
        let mut ev = cause();
        assert!(matches!(
            Incoming::of(&ev),
            Ok(Incoming::Ended { vm_id: "vm-a" })
        ));
        ev.body = Some(Body::VmFailed(proto::VmFailed {
            vm_id: "vm-b".into(),
            ..Default::default()
        }));
        assert!(matches!(
            Incoming::of(&ev),
            Ok(Incoming::Ended { vm_id: "vm-b" })
        ));
        let spec = proto::VmSpec {
            vm_id: "vm-c".into(),
            ..Default::default()
        };
        ev.body = Some(Body::VmRequested(proto::VmRequested {
            spec: Some(spec.clone()),
        }));
        assert!(matches!(Incoming::of(&ev), Ok(Incoming::Requested(s)) if *s == spec));
        ev.body = Some(Body::VmRequested(proto::VmRequested { spec: None }));
        assert!(Incoming::of(&ev).is_err());
        ev.body = Some(Body::NetworkReady(proto::NetworkReady::default()));
        assert!(matches!(
            Incoming::of(&ev),
            Ok(Incoming::Other(Some(Body::NetworkReady(_))))
        ));
        ev.body = None;
        assert!(matches!(Incoming::of(&ev), Ok(Incoming::Other(None))));
    }

    #[test]
    fn each_kind_builds_its_own_bodies() {
        check(
            proto::ScratchReady::default(),
            [EventType::ScratchReady, EventType::ScratchFailed],
            proto::ResourceKind::Scratch,
        );
        check(
            proto::NetworkReady::default(),
            [EventType::NetworkReady, EventType::NetworkFailed],
            proto::ResourceKind::Network,
        );
        check(
            proto::StorageReady::default(),
            [EventType::StorageReady, EventType::StorageFailed],
            proto::ResourceKind::Storage,
        );
    }
}
