//! Typed configuration: defaults in code < TOML file < `WNODES_*` environment.
//!
//! One file (or one environment file) serves every service: keys shared by all services sit at
//! the top level (`site`, `host`, `nats.*`, `otlp_endpoint`, ...; env `WNODES_SITE`,
//! `WNODES_NATS__URL`), and each service reads its own section (`[launcher]`, env
//! `WNODES_LAUNCHER__ACCEL`). The other services' sections are accepted unread when they are
//! registered in [`wnodes_sections`]; any other top-level key, and any unknown key inside the
//! common tables or the service's own section, is an error that names the key and where it came
//! from (the file, or the environment variable).

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    Figment, Metadata,
    providers::{Env, Format, Serialized, Toml},
    value::Value,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use wnodes_bus::{BusError, ConsumerTuning, NatsConfig};

/// Keys every service shares. Unknown keys inside its tables (`[nats]`, `[consumer]`) are
/// rejected by their types; unknown top-level keys by [`load_from`] (they may be other
/// programs' sections).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
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
    /// How often the service puts its heartbeat into the hosts bucket (`wnodesctl hosts`);
    /// past three intervals without one it shows as stale. Env `WNODES_HEARTBEAT_INTERVAL`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: std::time::Duration,
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
            heartbeat_interval: std::time::Duration::from_secs(15),
        }
    }
}

impl CommonConfig {
    /// The state directory: `state_dir`, or `/var/lib/wnodes/<service>`.
    pub fn state_dir_of(&self, service: &str) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/wnodes/{service}")))
    }
}

/// A service's whole configuration.
#[derive(Debug, Clone)]
pub struct Config<S> {
    pub common: CommonConfig,
    pub service: S,
}

impl<S> Config<S> {
    /// The configuration of a service connecting with `nats` (URL and credentials), keeping its
    /// state in `state_dir`, with defaults otherwise (tests, benchmarks, the dev stack). The
    /// HTTP endpoint binds an ephemeral port.
    pub fn local(nats: &NatsConfig, host: &str, state_dir: &std::path::Path, service: S) -> Self {
        Self {
            common: CommonConfig {
                site: "local".into(),
                host: host.into(),
                nats: nats.clone(),
                state_dir: Some(state_dir.to_path_buf()),
                http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..Default::default()
            },
            service,
        }
    }
}

/// Configuration that cannot be used. Every variant names the key and, where it knows it, the
/// file or environment variable it came from. Exit code 78.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value of the wrong type, an unknown key inside a table, an unreadable file: figment's
    /// messages (all of them), each naming the key and its source.
    #[error("{0}")]
    Value(String),
    #[error(
        "unknown top-level key `{key}` {origin}: not a common key and not a registered section ({sections})"
    )]
    UnknownKey {
        key: String,
        origin: String,
        sections: String,
    },
    #[error("`{0}` is not a registered configuration section (crates/wnodes-sections)")]
    UnregisteredSection(&'static str),
    #[error("host: invalid host name (set `host` in the config file or WNODES_HOST)")]
    Host(#[source] BusError),
    #[error("site: must not be empty (WNODES_SITE)")]
    EmptySite,
    #[error("[consumer]: invalid settings")]
    Consumer(#[source] BusError),
    #[error("heartbeat_interval: {0:?} is shorter than the shortest allowed, 1s")]
    HeartbeatInterval(std::time::Duration),
    /// A value of the service's own section that its type accepts but the service cannot use
    /// (the source names the key).
    #[error("[{section}]: invalid value")]
    Section {
        section: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConfigError {
    /// A semantic error in `section` (its source should name the key).
    pub fn section(
        section: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Section {
            section,
            source: source.into(),
        }
    }
}

fn kernel_host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
}

/// The layered sources: defaults, then the TOML file (if any), then `WNODES_*` variables
/// (except `WNODES_CONFIG`, the file path, `WNODES_HOST_TESTS`, and the test-only
/// `WNODES_FAILPOINT*`).
pub fn figment<S: Serialize + Default>(service: &str, file: Option<&std::path::Path>) -> Figment {
    let mut f = Figment::from(Serialized::defaults(CommonConfig::default()))
        .merge(Serialized::default(service, S::default()));
    if let Some(path) = file {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed("WNODES_").split("__").ignore(&[
        "config",
        "host_tests",
        "failpoint",
        "failpoint_marker",
    ]))
}

/// Loads and validates the configuration of `service`.
pub fn load<S>(
    service: &'static str,
    file: Option<&std::path::Path>,
) -> Result<Config<S>, ConfigError>
where
    S: Serialize + DeserializeOwned + Default,
{
    load_from(service, figment::<S>(service, file))
}

fn render(e: figment::Error) -> ConfigError {
    ConfigError::Value(
        e.into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Where a top-level key came from, in words.
fn origin(md: Option<&Metadata>, key: &str) -> String {
    let Some(md) = md else {
        return "(source unknown)".into();
    };
    match &md.source {
        Some(figment::Source::File(path)) => format!("in {}", path.display()),
        _ if md.name.contains("environment") => {
            format!(
                "from the environment (WNODES_{}...)",
                key.to_ascii_uppercase()
            )
        }
        _ => format!("from {}", md.name),
    }
}

/// The top-level keys that are neither [`CommonConfig`] keys nor the name of a registered
/// section, with where each came from.
fn unknown_top_level_keys(f: &Figment) -> Result<Vec<ConfigError>, ConfigError> {
    let root: Value = f.extract().map_err(render)?;
    let mut ignored = Vec::new();
    let _: CommonConfig = serde_ignored::deserialize(&root, |path| {
        if let serde_ignored::Path::Map { parent, key } = path
            && matches!(parent, serde_ignored::Path::Root)
        {
            ignored.push(key.clone());
        }
    })
    .map_err(render)?;
    Ok(ignored
        .into_iter()
        .filter(|k| wnodes_sections::find(k).is_none())
        .map(|key| ConfigError::UnknownKey {
            origin: origin(f.find_metadata(&key), &key),
            key,
            sections: wnodes_sections::names(),
        })
        .collect())
}

/// Loads from an explicit figment (tests inject sources here instead of mutating the process
/// environment). `service` must be a registered section.
pub fn load_from<S>(service: &'static str, f: Figment) -> Result<Config<S>, ConfigError>
where
    S: Serialize + DeserializeOwned + Default,
{
    if wnodes_sections::find(service).is_none() {
        return Err(ConfigError::UnregisteredSection(service));
    }
    let mut common: CommonConfig = f.extract().map_err(render)?;
    if let Some(e) = unknown_top_level_keys(&f)?.into_iter().next() {
        return Err(e);
    }
    let service_cfg: S = f.extract_inner(service).map_err(render)?;
    if common.host.is_empty() {
        common.host = kernel_host_name().unwrap_or_default();
    }
    wnodes_bus::subject::validate_host(&common.host).map_err(ConfigError::Host)?;
    if common.site.is_empty() {
        return Err(ConfigError::EmptySite);
    }
    common.consumer.validate().map_err(ConfigError::Consumer)?;
    if common.heartbeat_interval < std::time::Duration::from_secs(1) {
        return Err(ConfigError::HeartbeatInterval(common.heartbeat_interval));
    }
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

    fn load_toml(s: &str) -> Result<Config<Demo>, String> {
        let f = Figment::from(Serialized::defaults(CommonConfig::default()))
            .merge(Serialized::default("node", Demo::default()))
            .merge(Toml::string(s));
        load_from("node", f).map_err(|e| wnodes_bus::ErrorChain(&e).to_string())
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
        let e = load_toml("host = \"h\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = load_toml("host = \"h\"\n[nats]\nurll = \"x\"\n").unwrap_err();
        assert!(e.contains("urll"), "{e}");
        let e = load_toml("host = \"h\"\n[node]\nanswer = \"many\"\n").unwrap_err();
        assert!(e.contains("answer"), "{e}");
        let e = load_toml("host = \"Bad_Host\"\n").unwrap_err();
        assert!(e.contains("host"), "{e}");
        let e = load_toml("host = \"h\"\n[lancher]\naccel = \"tcg\"\n").unwrap_err();
        assert!(e.contains("unknown top-level key `lancher`"), "{e}");
        let e = load_toml("host = \"h\"\n[nats]\nconnect_timeout = \"soon\"\n").unwrap_err();
        assert!(e.contains("connect_timeout"), "{e}");
    }
}
