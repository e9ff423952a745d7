//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_bus::BusError;
use wnodes_testkit::error_rule::{SOURCE_TEXT, io_source};

use crate::{
    AccountingError, apel::ApelExportError, report::ReportError, service::ReportBind,
    store::StoreUrlError,
};

wnodes_testkit::error_rule! {
    AccountingError {
        AccountingError::Database { .. } => AccountingError::Database {
            store: "sqlite:///var/lib/wnodes/accounting.db".into(),
            source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
        },
        AccountingError::Sql(_) => AccountingError::Sql(sqlx::Error::Protocol(SOURCE_TEXT.into())),
        AccountingError::Bus(_) => AccountingError::Bus(BusError::NotProvisioned {
            what: "stream `WNODES_EVENTS`".into(),
            source: Box::new(io_source()),
        }),
        AccountingError::Migrate(_) => AccountingError::Migrate(
            sqlx::migrate::MigrateError::VersionMissing(1),
        ),
        AccountingError::StoreUrl(_) => AccountingError::StoreUrl(store_url_error()),
    }
    StoreUrlError {
        StoreUrlError { .. } => store_url_error(),
    }
    ReportBind {
        ReportBind { .. } => ReportBind {
            addr: "127.0.0.1:9651".parse().unwrap(),
            source: io_source(),
        },
    }
    ReportError {
        ReportError::Period { .. } => ReportError::Period { from_ms: 10, to_ms: 5 },
        ReportError::Missing(_) => ReportError::Missing("from"),
        ReportError::Key(_) => ReportError::Key(42),
        ReportError::Repeated(_) => ReportError::Repeated(wnodes_proto::v1::ReportKey::Vo),
        ReportError::Sql(_) => ReportError::Sql(sqlx::Error::Protocol(SOURCE_TEXT.into())),
    }
    ApelExportError {
        ApelExportError::Date { .. } => ApelExportError::Date { value: "2026-13-01".into() },
        ApelExportError::EmptyPeriod { .. } => ApelExportError::EmptyPeriod {
            from: "2026-11-02".into(),
            to: "2026-11-01".into(),
        },
        ApelExportError::Store(_) => ApelExportError::Store(store_url_error()),
        ApelExportError::Migrate { .. } => ApelExportError::Migrate {
            store: "postgres://acct@db.example.org:5432/wnodes".into(),
            source: AccountingError::Sql(sqlx::Error::Protocol(SOURCE_TEXT.into())),
        },
        ApelExportError::Open { .. } => ApelExportError::Open {
            store: "sqlite:///var/lib/wnodes/accounting.db".into(),
            source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
        },
        ApelExportError::Sql { .. } => ApelExportError::Sql {
            op: "record an export",
            source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
        },
        ApelExportError::Apel { .. } => ApelExportError::Apel {
            kind: "job",
            source: wnodes_apel::ApelError::Queue {
                op: "create",
                path: "/var/spool/apel/outgoing".into(),
                source: io_source(),
            },
        },
        ApelExportError::Locked { .. } => ApelExportError::Locked {
            path: "/var/spool/apel/outgoing/.wnodes-staging/lock".into(),
        },
        ApelExportError::Pending { .. } => ApelExportError::Pending {
            staged: "6565f2c00000a1.tmp".into(),
            source: serde_json::from_str::<u8>(SOURCE_TEXT).unwrap_err(),
        },
    }
}

fn store_url_error() -> crate::store::StoreUrlError {
    crate::store::StoreUrlError {
        given: "mysql://db/acct".into(),
        why: "unknown scheme",
    }
}
