//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::SOURCE_TEXT;

use crate::{config::ConfigError, telemetry::TelemetryError};

wnodes_testkit::error_rule! {
    ConfigError {
        ConfigError(_) => ConfigError("unknown key `lancher` in /etc/wnodes/wnodes.toml".into()),
    }
    TelemetryError {
        TelemetryError::Exporter { .. } => TelemetryError::Exporter {
            endpoint: "http://127.0.0.1:4317".into(),
            source: opentelemetry_otlp::ExporterBuildError::InternalFailure(SOURCE_TEXT.into()),
        },
        TelemetryError::AlreadyInstalled => TelemetryError::AlreadyInstalled,
    }
}
