//! What every WNoDeS service binary shares, in start-up order:
//!
//! 1. [`config`]: typed config (defaults < TOML < `WNODES_*`), fail fast (exit 78) naming the key;
//! 2. [`telemetry`]: logs + OpenTelemetry (OTLP export when configured);
//! 3. the NATS [`Bus`] (exit 69 when unreachable), streams created/updated, the [`KeyStore`];
//! 4. [`http`]: `/healthz`, `/readyz`, `/metrics`;
//! 5. the service's own future, with a [`CancellationToken`] cancelled on SIGTERM/SIGINT;
//! 6. drain: consumers stop pulling and finish or nack in-flight messages, spans are flushed,
//!    exit 0.
//!
//! ```no_run
//! # #[derive(Default, serde::Serialize, serde::Deserialize)] struct MyConfig {}
//! fn main() -> std::process::ExitCode {
//!     wnodes_runtime::main::<MyConfig, _, _>("scratch", 9604, |ctx| async move {
//!         ctx.ready.set_ready();
//!         ctx.shutdown.cancelled().await;
//!         Ok(())
//!     })
//! }
//! ```

pub mod config;
#[cfg(test)]
mod error_rule;
pub mod http;
pub mod shutdown;
pub mod telemetry;

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use prometheus_client::registry::Registry;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;
use wnodes_bus::{Bus, BusMetrics, ConsumerSpec, ConsumerTuning, ErrorChain, KeyStore};

pub use config::{CommonConfig, Config, ConfigError};
pub use http::Readiness;
pub use telemetry::Telemetry;

/// Process exit codes (sysexits.h).
pub mod exit {
    /// Clean shutdown.
    pub const OK: u8 = 0;
    /// The service failed while running.
    pub const SOFTWARE: u8 = 70;
    /// NATS (or another dependency) unreachable at start-up.
    pub const UNAVAILABLE: u8 = 69;
    /// Bad configuration.
    pub const CONFIG: u8 = 78;
}

/// Everything a service gets from the runtime.
#[derive(Debug)]
pub struct ServiceCtx<S> {
    pub service: &'static str,
    pub common: CommonConfig,
    pub config: S,
    pub bus: Bus,
    pub store: KeyStore,
    pub state_dir: PathBuf,
    pub registry: Arc<Mutex<Registry>>,
    pub ready: Readiness,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// The bound address of the HTTP endpoint.
    pub http_addr: SocketAddr,
}

impl<S> ServiceCtx<S> {
    /// `"<service>@<host>"`.
    pub fn source(&self) -> String {
        format!("{}@{}", self.service, self.common.host)
    }

    /// A consumer spec with the common consumer tuning.
    pub fn consumer_spec(&self, durable: String, filter_subjects: Vec<String>) -> ConsumerSpec {
        ConsumerSpec {
            durable,
            filter_subjects,
            tuning: self.common.consumer.clone(),
        }
    }

    /// The common consumer tuning.
    pub fn tuning(&self) -> &ConsumerTuning {
        &self.common.consumer
    }
}

/// Parses `--config PATH` (or `WNODES_CONFIG`) from the command line.
pub fn config_path_from_args() -> Result<Option<PathBuf>, ConfigError> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var_os("WNODES_CONFIG").map(PathBuf::from);
    while let Some(a) = args.next() {
        if a == "--config" || a == "-c" {
            path = Some(
                args.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| ConfigError("--config needs a file path".into()))?,
            );
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        } else {
            return Err(ConfigError(format!(
                "unknown argument {a:?} (usage: --config FILE)"
            )));
        }
    }
    Ok(path)
}

/// Runs a service binary from `main`: builds the runtime, loads config from `--config`/env,
/// and calls `run`. Returns the process exit code.
pub fn main<S, F, Fut>(service: &'static str, default_port: u16, run: F) -> ExitCode
where
    S: Serialize + DeserializeOwned + Default + Send + 'static,
    F: FnOnce(ServiceCtx<S>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cfg = match config_path_from_args().and_then(|p| config::load::<S>(service, p.as_deref())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wnodes-{service}: configuration error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wnodes-{service}: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = rt.block_on(run_with_config(service, default_port, cfg, run));
    ExitCode::from(code)
}

/// Like [`main`] with an already loaded configuration, inside a Tokio runtime.
pub async fn run_with_config<S, F, Fut>(
    service: &'static str,
    default_port: u16,
    cfg: Config<S>,
    run: F,
) -> u8
where
    F: FnOnce(ServiceCtx<S>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    wnodes_bus::connect::install_crypto_provider();
    let telemetry = match Telemetry::init(service, &cfg.common) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wnodes-{service}: telemetry: {}", ErrorChain(&e));
            return exit::CONFIG;
        }
    };
    let code = start_and_run(service, default_port, cfg, run).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

async fn start_and_run<S, F, Fut>(
    service: &'static str,
    default_port: u16,
    cfg: Config<S>,
    run: F,
) -> u8
where
    F: FnOnce(ServiceCtx<S>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Config {
        common,
        service: config,
    } = cfg;
    let source = format!("{service}@{}", common.host);
    let mut registry = Registry::default();
    let bus_metrics = BusMetrics::register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let bus = match Bus::connect(&common.nats, &source, bus_metrics).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %ErrorChain(&e), "Cannot connect to NATS.");
            eprintln!("wnodes-{service}: {}", ErrorChain(&e));
            return exit::UNAVAILABLE;
        }
    };
    if let Err(e) = bus.ensure_streams().await {
        tracing::error!(error = %ErrorChain(&e), "Cannot set up the streams.");
        eprintln!("wnodes-{service}: {}", ErrorChain(&e));
        return exit::UNAVAILABLE;
    }
    let state_dir = common
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/wnodes/{service}")));
    let store = match KeyStore::open(&state_dir.join("keys.db")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %ErrorChain(&e), "Cannot open the idempotency store.");
            eprintln!("wnodes-{service}: {}", ErrorChain(&e));
            return exit::CONFIG;
        }
    };
    {
        let store = store.clone();
        let retention = common.consumer.key_retention;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                tick.tick().await;
                if let Err(e) = store.prune(retention).await {
                    tracing::warn!(error = %ErrorChain(&e), "Pruning idempotency keys failed.");
                }
            }
        });
    }
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    let ready = Readiness::default();
    let addr = common
        .http_addr
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, default_port)));
    let http_addr = match http::serve(
        addr,
        registry.clone(),
        ready.clone(),
        bus.clone(),
        shutdown.clone(),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(%addr, error = %e, "Cannot bind the HTTP endpoint.");
            eprintln!("wnodes-{service}: cannot bind the HTTP endpoint {addr}: {e}");
            return exit::CONFIG;
        }
    };
    tracing::info!(%http_addr, host = %common.host, site = %common.site, nats = %common.nats.url, "Service started.");
    let ctx = ServiceCtx {
        service,
        common,
        config,
        bus: bus.clone(),
        store,
        state_dir,
        registry,
        ready,
        shutdown: shutdown.clone(),
        http_addr,
    };
    let result = run(ctx).await;
    shutdown.cancel();
    bus.flush().await;
    match result {
        Ok(()) => {
            tracing::info!("Service stopped.");
            exit::OK
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Service failed.");
            eprintln!("wnodes-{service}: {e:#}");
            exit::SOFTWARE
        }
    }
}
