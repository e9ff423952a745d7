//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_bus::BusError;
use wnodes_testkit::error_rule::{SOURCE_TEXT, io_source};

use crate::AccountingError;

wnodes_testkit::error_rule! {
    AccountingError {
        AccountingError::Database { .. } => AccountingError::Database {
            path: "/var/lib/wnodes/accounting.db".into(),
            source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
        },
        AccountingError::Sql(_) => AccountingError::Sql(sqlx::Error::Protocol(SOURCE_TEXT.into())),
        AccountingError::Bus(_) => AccountingError::Bus(BusError::Stream {
            stream: "WNODES_EVENTS".into(),
            source: Box::new(io_source()),
        }),
    }
}
