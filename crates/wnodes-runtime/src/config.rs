//! Typed configuration: defaults in code < TOML file < `WNODES_*` environment.
//!
//! One file (or one environment file) serves every service: keys shared by all services sit at
//! the top level (`site`, `host`, `nats.*`, `otlp_endpoint`, ...; env `WNODES_SITE`,
//! `WNODES_NATS__URL`), and each service reads its own section (`[launcher]`, env
//! `WNODES_LAUNCHER__ACCEL`) and ignores the other services' sections. Any other unknown key is
//! an error that names the key.

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned, de::IgnoredAny};
use wnodes_bus::{ConsumerTuning, NatsConfig};

/// Names of the sections services own; a service ignores the others'.
pub const SERVICE_SECTIONS: &[&str] = &[
    "bridge",
    "launcher",
    "image",
    "scratch",
    "network",
    "gateway",
    "accounting",
    "node",
    "bench",
];

/// Keys every service shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommonConfig {
    /// Site name (accounting, APEL). Env `WNODES_SITE`.
    pub site: String,
    /// This machine's host name (FQDN, lowercase); defaults to the kernel's host name.
    /// Env `WNODES_HOST`.
    pub host: String,
    /// NATS connection. Env `WNODES_NATS__URL`, `WNODES_NATS__CREDS_FILE`, ...
    pub nats: NatsConfig,
    /// OTLP/gRPC endpoint for traces, e.g. `http://collector:4317`. Falls back to the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; unset = spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// Address of `/healthz`, `/readyz`, `/metrics`; default `127.0.0.1:<service port>`.
    pub http_addr: Option<SocketAddr>,
    /// Where the service keeps state (idempotency keys, VM state); default
    /// `/var/lib/wnodes/<service>`.
    pub state_dir: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// `tracing` filter, e.g. `info` or `wnodes_bus=debug,info`; `RUST_LOG` wins when set.
    pub log_level: String,
    /// Retry, concurrency and shutdown settings of every durable consumer.
    pub consumer: ConsumerTuning,

    // The services' own sections, skipped here (each service reads its own).
    #[allow(dead_code)]
    #[serde(default, skip_serializing)]
    bridge: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    launcher: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    image: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    scratch: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    network: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    gateway: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    accounting: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    node: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    bench: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for CommonConfig {
    fn default() -> Self {
        Self {
            site: "local".into(),
            host: String::new(),
            nats: NatsConfig::default(),
            otlp_endpoint: None,
            http_addr: None,
            state_dir: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            consumer: ConsumerTuning::default(),
            bridge: None,
            launcher: None,
            image: None,
            scratch: None,
            network: None,
            gateway: None,
            accounting: None,
            node: None,
            bench: None,
        }
    }
}

/// A service's whole configuration.
#[derive(Debug, Clone)]
pub struct Config<S> {
    pub common: CommonConfig,
    pub service: S,
}

/// Configuration that cannot be used; the message names the key and the source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn kernel_host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
}

/// The layered sources: defaults, then the TOML file (if any), then `WNODES_*` variables
/// (except `WNODES_CONFIG`, the file path, and the test-only `WNODES_FAILPOINT*`).
pub fn figment<S: Serialize + Default>(service: &str, file: Option<&std::path::Path>) -> Figment {
    let mut f = Figment::from(Serialized::defaults(CommonConfig::default()))
        .merge(Serialized::default(service, S::default()));
    if let Some(path) = file {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed("WNODES_").split("__").ignore(&[
        "config",
        "failpoint",
        "failpoint_marker",
    ]))
}

/// Loads and validates the configuration of `service`.
pub fn load<S>(service: &str, file: Option<&std::path::Path>) -> Result<Config<S>, ConfigError>
where
    S: Serialize + DeserializeOwned + Default,
{
    load_from(service, figment::<S>(service, file))
}

/// Loads from an explicit figment (tests inject sources here instead of mutating the process
/// environment).
pub fn load_from<S>(service: &str, f: Figment) -> Result<Config<S>, ConfigError>
where
    S: Serialize + DeserializeOwned + Default,
{
    let render = |e: figment::Error| {
        ConfigError(
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    let mut common: CommonConfig = f.extract().map_err(render)?;
    let service_cfg: S = f.extract_inner(service).map_err(render)?;
    if common.host.is_empty() {
        common.host = kernel_host_name().unwrap_or_default();
    }
    wnodes_bus::subject::validate_host(&common.host).map_err(|e| {
        ConfigError(format!(
            "host: {e} (set `host` in the config file or WNODES_HOST)"
        ))
    })?;
    if common.site.is_empty() {
        return Err(ConfigError("site: must not be empty (WNODES_SITE)".into()));
    }
    common
        .consumer
        .validate()
        .map_err(|e| ConfigError(format!("consumer: {e}")))?;
    if common.otlp_endpoint.is_none() {
        common.otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty());
    }
    Ok(Config {
        common,
        service: service_cfg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Toml;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        answer: u32,
    }

    fn load_toml(s: &str) -> Result<Config<Demo>, ConfigError> {
        let f = Figment::from(Serialized::defaults(CommonConfig::default()))
            .merge(Serialized::default("node", Demo::default()))
            .merge(Toml::string(s));
        load_from("node", f)
    }

    #[test]
    fn reads_common_and_own_section_and_ignores_other_services() {
        let c = load_toml(
            "site = \"T1\"\nhost = \"hv1.example.org\"\n[nats]\nurl = \"nats://x:1\"\n\
             [node]\nanswer = 42\n[launcher]\naccel = \"tcg\"\n",
        )
        .unwrap();
        assert_eq!(c.common.site, "T1");
        assert_eq!(c.common.nats.url, "nats://x:1");
        assert_eq!(c.service.answer, 42);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = load_toml("host = \"h\"\nbogus = 1\n").unwrap_err().0;
        assert!(e.contains("bogus"), "{e}");
        let e = load_toml("host = \"h\"\n[nats]\nurll = \"x\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("urll"), "{e}");
        let e = load_toml("host = \"h\"\n[node]\nanswer = \"many\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("answer"), "{e}");
        let e = load_toml("host = \"Bad_Host\"\n").unwrap_err().0;
        assert!(e.contains("host"), "{e}");
        let e = load_toml("host = \"h\"\n[nats]\nconnect_timeout = \"soon\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("connect_timeout"), "{e}");
    }
}
