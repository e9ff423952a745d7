//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_bus::BusError;
use wnodes_testkit::error_rule::{SOURCE_TEXT, boxed_source, io_source};

use crate::{
    config::ConfigError, grpc::GrpcTlsError, service::StartError, start::HttpBind,
    telemetry::TelemetryError,
};

wnodes_testkit::error_rule! {
    ConfigError {
        ConfigError::Value(_) => ConfigError::Value(
            "invalid type: found string \"many\", expected u32 for key \"node.answer\"".into(),
        ),
        ConfigError::UnknownKey { .. } => ConfigError::UnknownKey {
            key: "lancher".into(),
            origin: "in /etc/wnodes/wnodes.toml".into(),
            sections: "bridge, launcher".into(),
        },
        ConfigError::UnregisteredSection(_) => ConfigError::UnregisteredSection("lancher"),
        ConfigError::Host(_) => ConfigError::Host(BusError::InvalidName(SOURCE_TEXT.into())),
        ConfigError::EmptySite => ConfigError::EmptySite,
        ConfigError::Consumer(_) => ConfigError::Consumer(BusError::Config(SOURCE_TEXT.into())),
        ConfigError::HeartbeatInterval(_) => ConfigError::HeartbeatInterval(std::time::Duration::from_millis(200)),
        ConfigError::Section { .. } => ConfigError::section("network", boxed_source()),
    }
    GrpcTlsError {
        GrpcTlsError::Config(_) => GrpcTlsError::Config(
            "accounting.tls_key: required with accounting.tls_cert".into(),
        ),
        GrpcTlsError::Read { .. } => GrpcTlsError::Read {
            path: "/etc/wnodes/tls/accounting.key".into(),
            source: io_source(),
        },
    }
    StartError {
        StartError::Config(_) => StartError::Config(ConfigError::section("network", boxed_source())),
        StartError::Unavailable { .. } => StartError::unavailable("NATS", boxed_source()),
        StartError::Failed { .. } => StartError::failed("open the image cache", boxed_source()),
    }
    HttpBind {
        HttpBind { .. } => HttpBind {
            addr: "127.0.0.1:9602".parse().unwrap(),
            source: io_source(),
        },
    }
    TelemetryError {
        TelemetryError::Exporter { .. } => TelemetryError::Exporter {
            endpoint: "http://127.0.0.1:4317".into(),
            source: opentelemetry_otlp::ExporterBuildError::InternalFailure(SOURCE_TEXT.into()),
        },
        TelemetryError::AlreadyInstalled => TelemetryError::AlreadyInstalled,
    }
}
