//! What a service declares ([`Service`]) and what it hands the runtime ([`Parts`]).
//!
//! A service is a type: its name (binary `wnodes-<NAME>`, config section `[<NAME>]`, durable
//! consumer `<NAME>[-<host>]`), its typed config section, the [`EventType`]s its consumer
//! receives, and [`Service::build`], which turns a [`ServiceCtx`] into a handler and background
//! tasks. The runtime does everything else the same way for every service (see [`crate::start`]).

use std::{fmt::Debug, future::Future, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc};

use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;
use wnodes_bus::{
    Bus, BusError, ConsumerSpec, ConsumerTuning, EventType, Handler, HandlerCtx, HandlerError,
    KeyStore, proto,
};

use crate::{
    Readiness,
    config::{CommonConfig, Config, ConfigError},
    exit,
};

pub use wnodes_bus::roles::{Role, Scope};

/// A boxed error, for what tasks and hooks return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A background task: runs until the service's shutdown token is cancelled.
pub type Task = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// One WNoDeS service, as the runtime runs it.
pub trait Service: Send + Sync + Sized + 'static {
    /// Its row of [`wnodes_bus::roles`]: what it consumes and publishes, per host or central.
    /// The same row gives provisioning its durable and NATS its permissions.
    const ROLE: &'static Role;
    /// The service's name: binary `wnodes-<NAME>`, config section `[<NAME>]` (registered in
    /// `wnodes-sections`), durable consumer `<NAME>[-<host>]`, event source `<NAME>@<host>`.
    const NAME: &'static str = Self::ROLE.name;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// Per host or central.
    const SCOPE: Scope = Self::ROLE.scope;
    /// The events its durable consumer receives; empty = no consumer (the bridge).
    const CONSUMES: &'static [EventType] = Self::ROLE.consumes;

    /// The `[<NAME>]` section.
    type Config: Serialize + DeserializeOwned + Default + Clone + Debug + Send + Sync + 'static;
    /// The consumer's handler ([`NoHandler`] when [`Self::CONSUMES`] is empty).
    type Handler: Handler;
    /// Subcommands besides `serve` ([`NoCommand`] for none).
    type Command: clap::Subcommand + Debug + Send + 'static;

    /// Checks what the section's types cannot: run by `--check-config` and before
    /// [`Self::build`]. Errors name the key (exit 78).
    fn validate(config: &Self::Config) -> Result<(), ConfigError> {
        let _ = config;
        Ok(())
    }

    /// Opens what the service needs, reconciles host state, and returns its handler and tasks.
    fn build(
        ctx: &ServiceCtx<Self::Config>,
    ) -> impl Future<Output = Result<Parts<Self::Handler>, StartError>> + Send;

    /// Runs one of [`Self::Command`] (after the configuration is loaded and telemetry set up)
    /// and returns the process exit code.
    fn run_command(
        command: Self::Command,
        config: Config<Self::Config>,
    ) -> impl Future<Output = u8> + Send {
        let _ = (command, config);
        async { exit::SOFTWARE }
    }

    /// The log level a command wants instead of the configured one (e.g. a job starter that
    /// prints only warnings).
    fn command_log_level(command: &Self::Command) -> Option<String> {
        let _ = command;
        None
    }
}

/// What [`Service::build`] hands the runtime.
pub struct Parts<H> {
    pub(crate) handler: Option<H>,
    pub(crate) store: Option<wnodes_bus::Store>,
    pub(crate) tasks: Vec<(&'static str, Task)>,
    pub(crate) on_stop: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<H> Debug for Parts<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("handler", &self.handler.is_some())
            .field("own_store", &self.store.is_some())
            .field("tasks", &self.tasks.iter().map(|t| t.0).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<H> Parts<H> {
    /// A consumer running `handler` on [`Service::CONSUMES`].
    pub fn consumer(handler: H) -> Self {
        Self {
            handler: Some(handler),
            store: None,
            tasks: Vec::new(),
            on_stop: Vec::new(),
        }
    }

    /// Commit the consumer's idempotency keys in `store` instead of the runtime's
    /// `<state_dir>/keys.db` (a service whose records must commit with their key).
    pub fn with_store(mut self, store: impl Into<wnodes_bus::Store>) -> Self {
        self.store = Some(store.into());
        self
    }

    /// A background task; it must end when the service's shutdown token is cancelled. An error,
    /// or a panic, stops the service (exit 70).
    pub fn task(
        mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), BoxError>> + Send + 'static,
    ) -> Self {
        self.tasks.push((name, Box::pin(task)));
        self
    }

    /// Runs after the consumer and the tasks have stopped (e.g. closing listeners).
    pub fn on_stop(mut self, hook: impl Future<Output = ()> + Send + 'static) -> Self {
        self.on_stop.push(Box::pin(hook));
        self
    }
}

impl Parts<NoHandler> {
    /// No consumer: the service only runs tasks.
    pub fn tasks_only() -> Self {
        Self {
            handler: None,
            store: None,
            tasks: Vec::new(),
            on_stop: Vec::new(),
        }
    }
}

/// The handler of a service without a consumer. Never runs: the runtime creates no consumer
/// for it.
#[derive(Debug, Clone, Copy)]
pub struct NoHandler;

impl Handler for NoHandler {
    fn name(&self) -> &'static str {
        "none"
    }

    async fn handle(&self, _: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        Err(HandlerError::reject(format!(
            "this service consumes no events (got {})",
            event.id
        )))
    }
}

/// No subcommands besides `serve`.
#[derive(Debug, Clone, Copy)]
pub enum NoCommand {}

impl clap::FromArgMatches for NoCommand {
    fn from_arg_matches(_: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand))
    }
    fn update_from_arg_matches(&mut self, _: &clap::ArgMatches) -> Result<(), clap::Error> {
        match *self {}
    }
}

impl clap::Subcommand for NoCommand {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        cmd
    }
    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }
    fn has_subcommand(_: &str) -> bool {
        false
    }
}

/// Why a service could not start. Each variant has its exit code ([`StartError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration: exit 78.
    #[error("bad configuration")]
    Config(#[from] ConfigError),
    /// A dependency (NATS, a database) is unreachable: exit 69.
    #[error("{what} is unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// Anything else: exit 70.
    #[error("cannot {what}")]
    Failed {
        what: &'static str,
        #[source]
        source: BoxError,
    },
}

impl StartError {
    /// A dependency is unreachable.
    pub fn unavailable(what: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            what,
            source: source.into(),
        }
    }

    /// Start-up failed while doing `what` ("open the image cache").
    pub fn failed(what: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Failed {
            what,
            source: source.into(),
        }
    }

    /// Bad configuration in the service's own `section`.
    pub fn config(section: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Config(ConfigError::section(section, source))
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => exit::CONFIG,
            Self::Unavailable { .. } => exit::UNAVAILABLE,
            Self::Failed { .. } => exit::SOFTWARE,
        }
    }
}

impl From<BusError> for StartError {
    /// A bus error at start-up: NATS (or the stream/consumer on it) is unavailable.
    fn from(e: BusError) -> Self {
        match e {
            BusError::Config(_) | BusError::Tls(_) | BusError::ReadFile { .. } => {
                Self::Config(ConfigError::section("nats", e))
            }
            e => Self::unavailable("NATS", e),
        }
    }
}

/// Everything a service gets from the runtime.
#[derive(Debug)]
pub struct ServiceCtx<S> {
    pub service: &'static str,
    pub common: CommonConfig,
    pub config: S,
    pub bus: Bus,
    /// The idempotency store `<state_dir>/keys.db`.
    pub store: KeyStore,
    pub state_dir: PathBuf,
    pub registry: Arc<Mutex<Registry>>,
    pub ready: Readiness,
    /// Cancelled on SIGTERM/SIGINT, or when a task fails.
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

/// The consumer spec of service `S` on `host`: durable `<NAME>-<host>` (per host) or `<NAME>`
/// (central), one filter per consumed event type.
pub fn consumer_spec<S: Service>(
    host: &str,
    tuning: ConsumerTuning,
) -> Result<ConsumerSpec, BusError> {
    let host = match S::SCOPE {
        Scope::PerHost => Some(host),
        Scope::Central => None,
    };
    Ok(ConsumerSpec {
        durable: wnodes_bus::subject::durable_name(S::NAME, host)?,
        filter_subjects: S::CONSUMES
            .iter()
            .map(|t| wnodes_bus::subject::consumer_filter(*t, host))
            .collect::<Result<_, _>>()?,
        tuning,
    })
}
