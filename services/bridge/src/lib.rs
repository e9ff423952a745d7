//! WNoDeS bridge: where the batch system (LRMS) meets the event bus.
//!
//! - [`server`]: `wnodes-bridge serve`, the gRPC service `wnodes.v1.Bridge`
//!   (`proto/wnodes/v1/bridge.proto`) on `[bridge] grpc_addr` (default `127.0.0.1:9650`),
//!   optionally over TLS (`tls_cert`, `tls_key`) with client certificates (`client_ca`). Each
//!   call validates its input (`InvalidArgument` naming the field) and publishes `job.started`,
//!   `job.finished` or `job.cancelled`; `WaitJob` returns how the run's VM ended.
//! - [`submit`]: `wnodes-bridge submit`, the operator's and developer's job starter: it needs the
//!   agent role's NATS credentials (never given to job users) and takes the job's identity from
//!   flags. It publishes `JobStarted`, prints progress to stderr, waits for the VM, prints the
//!   payload's output to stdout, publishes `JobFinished`, and exits with the payload's exit code.
//! - [`watch`]: following one run's events (an ephemeral ordered consumer).
//! - [`slurm_queue`]: Slurm's pending jobs polled with `squeue` into `job.queued`
//!   (`[bridge.slurm_queue]`); their ends come from Slurm's jobcomp hook
//!   (`slurm/wnodes-slurm-jobcomp`) through a followed source.
//! - [`job_starter`]: `wnodes-bridge job-starter`, the job starter every LRMS runs as the job's
//!   user: it holds no NATS credentials and sends the payload to the host agent
//!   (`services/agent`, `wnodes-agent`) over its unix socket ([`agent_wire`] frames the messages
//!   of `proto/wnodes/v1/agent.proto`); who the job is, the agent finds out itself.
//!
//! `JobStarted` opens the job's trace: the bridge's span `bridge.job_started` is its root (its
//! parent is the caller's `traceparent` when a gRPC caller sends one).
//!
//! # Exit codes of `wnodes-bridge submit`
//!
//! | code | meaning |
//! |---|---|
//! | 0–255 | the payload's exit code (the VM ran and stopped); codes outside 0–255 become 255 |
//! | 125 | the VM failed before the payload ran (`VmFailed`; its reason is printed on stderr) |
//! | 130 | cancelled by SIGINT (Ctrl-C): `JobCancelled` was published and the VM torn down |
//! | 143 | cancelled by SIGTERM: `JobCancelled` was published and the VM torn down |
//! | 64 | bad command line or job description (the field is named) |
//! | 69 | NATS unreachable, or the bus failed while waiting |
//! | 70 | internal error (e.g. signal handlers could not be installed) |
//! | 78 | bad configuration |
//!
//! A payload can itself exit with 125, 130 or 143; stderr says which case it was.

pub mod agent_wire;
#[cfg(test)]
mod error_rule;
pub mod job_starter;
pub mod server;
pub mod slurm_queue;
pub mod submit;
pub mod validate;
pub mod watch;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// Default gRPC listen address.
pub const DEFAULT_GRPC_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9650));

/// `[bridge]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the gRPC service (default `127.0.0.1:9650`). Env `WNODES_BRIDGE__GRPC_ADDR`.
    pub grpc_addr: SocketAddr,
    /// PEM server certificate chain; with `tls_key`, the service speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Image hints for queued jobs read from LRMS files whose record names no image
    /// (`[bridge.image_hints.by_queue]`, `[bridge.image_hints.by_group]`): the image services
    /// prefetch the hinted image when the `job.queued` arrives.
    pub image_hints: wnodes_lrms::ImageHints,
    /// LRMS files `serve` follows as they grow and rotate, publishing their job events
    /// (`[[bridge.sources]]`); each one's read position is kept in
    /// `<state_dir>/lrms-cursors/`, stored after the events it covers are acknowledged.
    pub sources: Vec<Source>,
    /// Slurm's pending jobs, polled into `job.queued` (`[bridge.slurm_queue]`, off by default).
    pub slurm_queue: slurm_queue::SlurmQueueConfig,
    /// Grid credentials of `JobStarted` calls, verified offline (`[bridge.identity]`).
    pub identity: wnodes_identity::IdentityConfig,
    /// With client certificates (`client_ca`): what each may do (`[[bridge.clients]]`); required
    /// then, and a certificate no rule names may do nothing.
    pub clients: Vec<ClientRule>,
}

/// What one compute element's client certificate may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRule {
    /// The certificate's subject in OpenSSL slash form (`/C=IT/O=…/CN=ce01.example.org`).
    pub subject: String,
    /// The hypervisor hosts its calls may name (`"*"`: any).
    pub hosts: Vec<String>,
    /// `job_started`, `job_finished`, `job_cancelled`, `wait_job`.
    pub operations: Vec<String>,
}

/// One followed LRMS file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// `htcondor`, `slurm`, `pbs` or `lsf`.
    pub lrms: wnodes_lrms::LrmsKind,
    /// The file (an absolute path): HTCondor's job event log, a PBS/Torque accounting file,
    /// LSF's `lsb.events`, a Slurm jobcomp file.
    pub path: PathBuf,
    /// Without a stored cursor, start at the file's end (only new records) instead of its start.
    #[serde(default)]
    pub start_at_end: bool,
}

impl Source {
    /// The cursor file of this source under `state_dir` (named after the path, so two sources
    /// never share one).
    pub fn cursor_path(&self, state_dir: &std::path::Path) -> PathBuf {
        let name: String = self
            .path
            .to_string_lossy()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        state_dir.join("lrms-cursors").join(format!("{name}.json"))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: DEFAULT_GRPC_ADDR,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            image_hints: wnodes_lrms::ImageHints::default(),
            sources: Vec::new(),
            slurm_queue: slurm_queue::SlurmQueueConfig::default(),
            identity: wnodes_identity::IdentityConfig::default(),
            clients: Vec::new(),
        }
    }
}

/// What can go wrong in the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Bus(#[from] wnodes_bus::BusError),
    #[error("JetStream request failed")]
    JetStream(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the event stream ended before the run's VM stopped or failed")]
    WatchEnded,
    #[error(transparent)]
    Invalid(#[from] validate::InvalidInput),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bridge service: the gRPC API (`serve`, the default) and the job starter (`submit`).
#[derive(Debug)]
pub struct Bridge;

/// The bridge's subcommands besides `serve`.
#[derive(Debug, clap::Subcommand)]
pub enum BridgeCommand {
    /// Start a job in a VM on this host and wait for it: the minimal job starter.
    Submit(Box<submit::SubmitArgs>),
    /// Read whole LRMS files (job event logs, accounting records) into job events: publish
    /// them, or with --dry-run print one JSON object per event. A summary goes to stderr.
    Replay(wnodes_lrms::cli::ReplayArgs),
}

impl wnodes_runtime::Service for Bridge {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::BRIDGE;
    const ABOUT: &'static str = "WNoDeS bridge: the LRMS side of the event bus";
    type Config = Config;
    type Handler = wnodes_runtime::NoHandler;
    type Command = BridgeCommand;

    fn validate(config: &Config) -> Result<(), wnodes_runtime::ConfigError> {
        if let Some(s) = config.sources.iter().find(|s| !s.path.is_absolute()) {
            return Err(wnodes_runtime::ConfigError::section(
                Self::NAME,
                format!("sources: path {:?} must be absolute", s.path),
            ));
        }
        if config.client_ca.is_some() && config.clients.is_empty() {
            return Err(wnodes_runtime::ConfigError::section(
                Self::NAME,
                "clients: with client_ca, each client certificate's subject, hosts and operations \
                 must be listed ([[bridge.clients]]); none are",
            ));
        }
        const OPS: [&str; 4] = ["job_started", "job_finished", "job_cancelled", "wait_job"];
        if let Some((c, op)) = config.clients.iter().find_map(|c| {
            c.operations
                .iter()
                .find(|o| !OPS.contains(&o.as_str()))
                .map(|o| (c, o))
        }) {
            return Err(wnodes_runtime::ConfigError::section(
                Self::NAME,
                format!(
                    "clients: {:?}: operation {op:?} is none of {OPS:?}",
                    c.subject
                ),
            ));
        }
        server::tls_config(config)
            .map(drop)
            .map_err(|e| wnodes_runtime::ConfigError::section(Self::NAME, e))
    }

    /// Binds the gRPC address; the server runs as the service's one task.
    async fn build(
        ctx: &wnodes_runtime::ServiceCtx<Config>,
    ) -> Result<wnodes_runtime::Parts<wnodes_runtime::NoHandler>, wnodes_runtime::StartError> {
        use wnodes_runtime::StartError;
        let tls = server::tls_config(&ctx.config).map_err(|e| StartError::config(Self::NAME, e))?;
        let listener = server::bind(ctx.config.grpc_addr)
            .await
            .map_err(|e| StartError::config(Self::NAME, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::failed("read the gRPC listener's address", e))?;
        let verifier = wnodes_identity::Verifier::new(&ctx.config.identity)
            .map_err(|e| StartError::config(Self::NAME, wnodes_bus::ErrorChain(&e).to_string()))?;
        let mut service =
            server::BridgeService::new(ctx.bus.clone(), ctx.source(), ctx.shutdown.clone())
                .with_identity(verifier);
        if ctx.config.client_ca.is_some() {
            service = service.with_clients(ctx.config.clients.clone());
        }
        tracing::info!(%addr, tls = tls.is_some(), "Bridge gRPC service listening.");
        let shutdown = ctx.shutdown.clone();
        let mut parts = wnodes_runtime::Parts::tasks_only().task("grpc", async move {
            server::serve(listener, service, tls, shutdown).await?;
            Ok(())
        });
        if !ctx.config.sources.is_empty() {
            let dir = ctx.state_dir.join("lrms-cursors");
            std::fs::create_dir_all(&dir)
                .map_err(|e| StartError::failed("create the LRMS cursor directory", e))?;
        }
        let publisher = wnodes_lrms::Publisher::new(ctx.bus.clone(), ctx.common.site.clone(), 256)
            .with_image_hints(ctx.config.image_hints.clone());
        if ctx.config.slurm_queue.enabled {
            let (config, publisher, shutdown) = (
                ctx.config.slurm_queue.clone(),
                publisher.clone(),
                ctx.shutdown.clone(),
            );
            tracing::info!(every = ?config.every, "Polling Slurm's pending jobs.");
            parts = parts.task("slurm-queue", async move {
                slurm_queue::run(config, publisher, shutdown).await?;
                Ok(())
            });
        }
        for source in &ctx.config.sources {
            let store = wnodes_lrms::CursorFile::new(source.cursor_path(&ctx.state_dir));
            let resume = store
                .load()
                .map_err(|e| StartError::failed("read an LRMS source's cursor", e))?;
            let mut opts = wnodes_lrms::FollowOptions::new(source.lrms, Default::default());
            opts.start_at_end = source.start_at_end;
            let follower = wnodes_lrms::Follower::open(&source.path, opts, resume)
                .map_err(|e| StartError::failed("open an LRMS source", e))?;
            tracing::info!(lrms = source.lrms.name(), path = %source.path.display(), "Following an LRMS source.");
            let (publisher, shutdown) = (publisher.clone(), ctx.shutdown.clone());
            parts = parts.task("lrms-source", async move {
                let stats = wnodes_lrms::follow_to_bus(
                    &publisher,
                    follower,
                    store,
                    &wnodes_lrms::FollowLoopOptions::default(),
                    shutdown,
                )
                .await?;
                tracing::info!(
                    published = stats.published,
                    malformed = stats.malformed,
                    "LRMS source stopped."
                );
                Ok(())
            });
        }
        Ok(parts)
    }

    async fn run_command(command: BridgeCommand, config: wnodes_runtime::Config<Config>) -> u8 {
        match command {
            BridgeCommand::Submit(args) => Box::pin(submit::run(*args, &config.common)).await,
            BridgeCommand::Replay(args) => replay(args, &config).await,
        }
    }

    fn command_log_level(command: &BridgeCommand) -> Option<String> {
        match command {
            BridgeCommand::Submit(args) => Some(args.log_level.clone()),
            BridgeCommand::Replay(_) => None,
        }
    }
}

/// `wnodes-bridge replay`: exit 0 when every file was read (malformed records are counted,
/// logged with file and line, and skipped), 66 when a file cannot be read, 69 when NATS is
/// unreachable or stops acknowledging.
async fn replay(args: wnodes_lrms::cli::ReplayArgs, config: &wnodes_runtime::Config<Config>) -> u8 {
    use wnodes_bus::ErrorChain;
    use wnodes_runtime::exit;
    let common = &config.common;
    let mut opts = args.options();
    opts.image_hints = config.service.image_hints.clone();
    if args.dry_run {
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        return match wnodes_lrms::cli::dry_run(&args, &opts, out) {
            Ok(summary) => {
                eprintln!("wnodes-bridge: replay: {summary}");
                exit::OK
            }
            Err(e) => {
                eprintln!("wnodes-bridge: replay: {}", ErrorChain(&e));
                wnodes_runtime::exit::NO_INPUT
            }
        };
    }
    let source = format!("bridge@{}", common.host);
    let bus = match wnodes_bus::Bus::connect(
        &common.nats.for_identity(wnodes_bus::roles::BRIDGE.name),
        &source,
        wnodes_bus::BusMetrics::unregistered(),
    )
    .await
    {
        Ok(bus) => bus,
        Err(e) => {
            eprintln!("wnodes-bridge: replay: {}", ErrorChain(&e));
            return exit::UNAVAILABLE;
        }
    };
    if let Err(e) = bus.check_streams().await {
        eprintln!("wnodes-bridge: replay: {}", ErrorChain(&e));
        return exit::UNAVAILABLE;
    }
    let publisher = wnodes_lrms::Publisher::new(bus.clone(), common.site.clone(), args.window);
    let result = wnodes_lrms::replay_to_bus(&publisher, &opts, &args.files, args.batch).await;
    bus.flush().await;
    match result {
        Ok(summary) => {
            eprintln!("wnodes-bridge: replay: {summary}");
            exit::OK
        }
        Err(e @ wnodes_lrms::publish::PublishReplayError::Read(_)) => {
            eprintln!("wnodes-bridge: replay: {}", ErrorChain(&e));
            wnodes_runtime::exit::NO_INPUT
        }
        Err(e) => {
            eprintln!("wnodes-bridge: replay: {}", ErrorChain(&e));
            exit::UNAVAILABLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        std::fs::write(
            &path,
            format!("site = \"T1\"\nhost = \"c.example.org\"\n{toml}"),
        )
        .unwrap();
        wnodes_runtime::config::load::<Config>("bridge", Some(&path))
            .map(|c| c.service)
            .map_err(|e| wnodes_bus::ErrorChain(&e).to_string())
    }

    #[test]
    fn reads_the_bridge_section_and_names_unknown_keys() {
        assert_eq!(load("").unwrap().grpc_addr, DEFAULT_GRPC_ADDR);
        let c = load(
            "[bridge]\ngrpc_addr = \"0.0.0.0:9999\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.grpc_addr.port(), 9999);
        assert_eq!(c.tls_cert.as_deref(), Some(std::path::Path::new("/c.pem")));
        let e = load("[bridge]\ngrpc_adr = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(e.contains("grpc_adr"), "{e}");
        let e = load("[bridge]\ngrpc_addr = \"nowhere\"\n").unwrap_err();
        assert!(e.contains("grpc_addr"), "{e}");
    }
}
