//! What every WNoDeS service binary shares: one way to start, run and stop.
//!
//! A service is a type implementing [`Service`] (its name, config section, the events it
//! consumes, and how it builds its handler and tasks); its `main.rs` is
//! `wnodes_runtime::main::<MyService>()`. The runtime then does the same for every service:
//!
//! | module | what it holds |
//! |---|---|
//! | [`entry`] | the command line (`--config`, `--check-config`, `serve`, the service's subcommands), exit codes |
//! | [`config`] | typed config (defaults < TOML < `WNODES_*`), unknown keys named with their source (exit 78) |
//! | [`service`] | the [`Service`] trait, [`Parts`] (handler, tasks, stop hooks), [`StartError`] |
//! | [`start`] | the fixed start-up order and graceful stop (below) |
//! | [`telemetry`] | logs + OpenTelemetry (OTLP export when configured) |
//! | [`http`] | `/healthz`, `/readyz`, `/metrics` |
//! | [`host_paths`] | host policy on a path an event names: resolved, under a configured root |
//! | `heartbeat` | the service's heartbeat in the hosts bucket (`wnodesctl hosts`), and its last one at stop |
//! | [`grpc`] | a gRPC server's TLS settings (`tls_cert`, `tls_key`, `client_ca`), shared by the bridge and accounting |
//! | [`shutdown`] | SIGTERM/SIGINT → a cancelled token |
//!
//! Start-up order (model: linkerd2-proxy's fixed order): config → telemetry → NATS and streams
//! (exit 69 when unreachable) → idempotency store → health/metrics → [`Service::build`] →
//! consumer and tasks → ready → until SIGTERM/SIGINT → drain → stop hooks → flush → exit 0.
//!
//! The configuration sections other programs own are registered in `wnodes-sections`, not here.

pub mod config;
pub mod entry;
#[cfg(test)]
mod error_rule;
pub mod grpc;
mod heartbeat;
pub mod host_paths;
pub mod http;
pub mod service;
pub mod shutdown;
pub mod start;
pub mod telemetry;

pub use config::{CommonConfig, Config, ConfigError};
pub use entry::main;
pub use http::Readiness;
pub use service::{
    BoxError, NoCommand, NoHandler, Parts, Role, Scope, Service, ServiceCtx, StartError, Task,
    consumer_spec,
};
pub use telemetry::Telemetry;

/// Process exit codes (sysexits.h), the same in every service.
pub mod exit {
    /// Clean shutdown.
    pub const OK: u8 = 0;
    /// Bad command line (or, for `wnodes-bridge submit`, a bad job description).
    pub const USAGE: u8 = 64;
    /// An input file cannot be read (`wnodes-bridge replay`).
    pub const NO_INPUT: u8 = 66;
    /// NATS (or another dependency) unreachable at start-up.
    pub const UNAVAILABLE: u8 = 69;
    /// The service failed while running.
    pub const SOFTWARE: u8 = 70;
    /// Bad configuration.
    pub const CONFIG: u8 = 78;
}
