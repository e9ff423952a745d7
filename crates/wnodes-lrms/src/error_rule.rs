//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_bus::BusError;
use wnodes_testkit::error_rule::{boxed_source, io_source};

use crate::{
    follow::FollowError,
    publish::{FollowToBusError, PublishReplayError},
    replay::{ReplayError, SinkError},
};

/// A `JoinError` (a cancelled task), for the variants that wrap one.
fn join_error() -> tokio::task::JoinError {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let h = tokio::spawn(std::future::pending::<()>());
        h.abort();
        h.await.expect_err("aborted")
    })
}

fn bus_error() -> BusError {
    BusError::Publish {
        subject: "wnodes.evt._queued.job.queued".into(),
        attempts: 3,
        elapsed_ms: 60_000,
        source: boxed_source(),
    }
}

wnodes_testkit::error_rule! {
    ReplayError {
        ReplayError::Open { .. } => ReplayError::Open {
            path: "/var/log/condor/EventLog".into(),
            source: io_source(),
        },
        ReplayError::Read { .. } => ReplayError::Read {
            path: "/var/log/condor/EventLog".into(),
            line: 12,
            source: io_source(),
        },
        ReplayError::Write { .. } => ReplayError::Write { source: io_source() },
        ReplayError::Sink { .. } => ReplayError::Sink {
            path: "/var/log/condor/EventLog".into(),
            line: 12,
            source: SinkError(boxed_source()),
        },
    }
    SinkError {
        SinkError(_) => SinkError(boxed_source()),
    }
    FollowError {
        FollowError::Io { .. } => FollowError::Io {
            path: "/var/spool/pbs/server_priv/accounting/20250301".into(),
            source: io_source(),
        },
        FollowError::WrongCursor { .. } => FollowError::WrongCursor {
            cursor_path: "/a".into(),
            path: "/b".into(),
        },
    }
    PublishReplayError {
        PublishReplayError::Read(_) => PublishReplayError::Read(ReplayError::Open {
            path: "/x".into(),
            source: io_source(),
        }),
        PublishReplayError::Publish { .. } => PublishReplayError::Publish {
            path: "/x".into(),
            line: 3,
            source: bus_error(),
        },
        PublishReplayError::Reader(_) => PublishReplayError::Reader(join_error()),
    }
    FollowToBusError {
        FollowToBusError::Follow(_) => FollowToBusError::Follow(FollowError::Io {
            path: "/x".into(),
            source: io_source(),
        }),
        FollowToBusError::Publish { .. } => FollowToBusError::Publish {
            path: "/x".into(),
            source: bus_error(),
        },
        FollowToBusError::Reader(_) => FollowToBusError::Reader(join_error()),
    }
}
