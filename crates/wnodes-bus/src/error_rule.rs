//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use std::sync::Arc;

use wnodes_testkit::error_rule::{SOURCE_TEXT, boxed_source, io_source};

use crate::{BusError, HandlerError};

wnodes_testkit::error_rule! {
    BusError {
        BusError::Config(_) => BusError::Config("handler_timeout must be below ack_wait".into()),
        BusError::ReadFile { .. } => BusError::ReadFile {
            what: "the NKEY seed",
            path: "/etc/wnodes/seed".into(),
            source: io_source(),
        },
        BusError::Tls(_) => BusError::Tls("no certificate in /etc/wnodes/ca.pem".into()),
        BusError::Connect { .. } => BusError::Connect {
            url: "nats://127.0.0.1:4222".into(),
            source: async_nats::ConnectError::with_source(
                async_nats::ConnectErrorKind::Io,
                io_source(),
            ),
        },
        BusError::Publish { .. } => BusError::Publish {
            subject: "wnodes.evt.hv01.vm.requested".into(),
            attempts: 3,
            elapsed_ms: 60_000,
            source: boxed_source(),
        },
        BusError::Control { .. } => BusError::Control {
            what: "answer on",
            subject: "_INBOX.admin.abc".into(),
            source: boxed_source(),
        },
        BusError::InvalidName(_) => BusError::InvalidName("host `HV 01`".into()),
        BusError::EmptyEvent => BusError::EmptyEvent,
        BusError::Store { .. } => BusError::Store {
            path: "/var/lib/wnodes/keys.db".into(),
            source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
        },
        BusError::NotDurable { .. } => BusError::NotDurable {
            store: "postgres://acct@db.example.org:5432/wnodes".into(),
            reason: "the server runs with fsync = off".into(),
        },
        BusError::KeyCommit { .. } => BusError::KeyCommit {
            path: "/var/lib/wnodes/keys.db".into(),
            source: Arc::new(rusqlite::Error::InvalidParameterName(SOURCE_TEXT.into())),
        },
        BusError::DeadLetterRead(_) => BusError::DeadLetterRead(boxed_source()),
        BusError::Heartbeat { .. } => BusError::Heartbeat {
            identity: "launcher-hv1_example_org".into(),
            source: boxed_source(),
        },
        BusError::EventsRead { .. } => BusError::EventsRead {
            what: "run INFN-T1/htcondor/1001.0/1".into(),
            source: boxed_source(),
        },
        BusError::DeadLetterDelete { .. } => BusError::DeadLetterDelete {
            sequence: 42,
            source: boxed_source(),
        },
        BusError::NotProvisioned { .. } => BusError::NotProvisioned {
            what: "stream `WNODES_EVENTS`".into(),
            source: boxed_source(),
        },
        BusError::Mismatch { .. } => BusError::Mismatch {
            what: "stream `WNODES_EVENTS`".into(),
            differences: "max_age is 1h (expected 7days)".into(),
        },
        BusError::PermissionDenied(_) => BusError::PermissionDenied(
            "Permissions Violation for Publish to \"wnodes.evt.h2.vm.requested\"".into(),
        ),
    }
    HandlerError {
        HandlerError::Retry(_) => HandlerError::retry(io_source()),
        HandlerError::Reject(_) => HandlerError::reject(io_source()),
    }
}
