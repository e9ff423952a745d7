//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::ApelError;

wnodes_testkit::error_rule! {
    ApelError {
        ApelError::Unexportable { .. } => ApelError::Unexportable {
            run_key: "INFN-T1/htcondor/1234567.0/1".into(),
            reason: "no end time",
        },
        ApelError::RecordTooLarge { .. } => ApelError::RecordTooLarge {
            kind: "job",
            bytes: 2_000_000,
            limit: 500_000,
        },
        ApelError::LineBreak { .. } => ApelError::LineBreak { kind: "job", field: "Queue" },
        ApelError::Parse { .. } => ApelError::Parse { line: 3, reason: "no `Key: value`".into() },
        ApelError::Config(_) => ApelError::Config("benchmark per_core 0 must be a positive number".into()),
        ApelError::Queue { .. } => ApelError::Queue {
            op: "create",
            path: "/var/spool/apel/outgoing/.wnodes-staging".into(),
            source: io_source(),
        },
    }
}
