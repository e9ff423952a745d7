//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::{
    cache::CacheError,
    config::{CatalogError, ConfigError},
    pins::PinsError,
};

/// A `reqwest::Error` as a request to a malformed URL gives it.
fn reqwest_error() -> reqwest::Error {
    wnodes_bus::connect::install_crypto_provider();
    reqwest::Client::builder()
        .build()
        .unwrap()
        .get("http://[::1")
        .build()
        .unwrap_err()
}

fn catalog_error() -> CatalogError {
    CatalogError {
        image: "el9".into(),
        field: "sha256",
        problem: "not 64 lowercase hex digits".into(),
    }
}

wnodes_testkit::error_rule! {
    CacheError {
        CacheError::BadDigest { .. } => CacheError::BadDigest { digest: "abc".into() },
        CacheError::BadUrl { .. } => CacheError::BadUrl {
            url: "ftp://example.org/el9.qcow2".into(),
            problem: "only http, https and file URLs".into(),
        },
        CacheError::Io { .. } => CacheError::Io {
            op: "create the cache directory",
            path: "/var/cache/wnodes/sha256".into(),
            source: io_source(),
        },
        CacheError::Http { .. } => CacheError::Http {
            url: "http://[::1".into(),
            source: reqwest_error(),
        },
        CacheError::Status { .. } => CacheError::Status {
            url: "http://images.example.org/el9.qcow2".into(),
            status: 404,
        },
        CacheError::Mismatch { .. } => CacheError::Mismatch {
            url: "http://images.example.org/el9.qcow2".into(),
            expected: "0".repeat(64),
            actual: "1".repeat(64),
        },
        CacheError::Task { .. } => CacheError::Task {
            digest: "0".repeat(64),
            detail: "task panicked".into(),
        },
        CacheError::Client(_) => CacheError::Client(reqwest_error()),
    }
    CatalogError {
        CatalogError { .. } => catalog_error(),
    }
    ConfigError {
        ConfigError::Catalog(_) => ConfigError::Catalog(catalog_error()),
        ConfigError::Limits { .. } => ConfigError::Limits {
            key: "low_watermark_percent",
            problem: "95 must be below high_watermark_percent (90)".into(),
        },
    }
    PinsError {
        PinsError { .. } => crate::pins::sample_error(),
    }
}
