//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::{SOURCE_TEXT, io_source};

use crate::{Kind, ReconcileError, TableError};

fn sqlx_source() -> sqlx::Error {
    sqlx::Error::Protocol(SOURCE_TEXT.into())
}

fn row_error() -> TableError {
    TableError::Row {
        op: "mark prepared",
        kind: Kind::Scratch,
        vm_id: "vm-0123456789ab".into(),
        source: sqlx_source(),
    }
}

wnodes_testkit::error_rule! {
    TableError {
        TableError::Table { .. } => TableError::Table {
            op: "create the table",
            kind: Kind::Network,
            source: sqlx_source(),
        },
        TableError::Row { .. } => row_error(),
        TableError::Detail { .. } => TableError::Detail {
            op: "decode",
            kind: Kind::Storage,
            vm_id: "vm-0123456789ab".into(),
            source: serde_json::from_str::<u32>(SOURCE_TEXT).unwrap_err(),
        },
        TableError::State { .. } => TableError::State {
            kind: Kind::Scratch,
            vm_id: "vm-0123456789ab".into(),
            state: "serving".into(),
        },
    }
    ReconcileError<std::io::Error> {
        ReconcileError::Table(_) => ReconcileError::Table(row_error()),
        ReconcileError::Host(_) => ReconcileError::Host(io_source()),
    }
}
