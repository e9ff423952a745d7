//! The fixed start-up order every service runs through, and its graceful stop:
//!
//! 1. telemetry (logs, spans) — [`serve`] only; in-process runs share the caller's;
//! 2. NATS: connect (exit 69 when unreachable);
//! 3. the idempotency store `<state_dir>/keys.db` and its hourly pruning;
//! 4. `/healthz`, `/readyz`, `/metrics` (exit 78 when the address cannot be bound);
//! 5. wait until the streams and its durable consumer are provisioned as expected
//!    ([`wnodes_bus::layout`]); meanwhile `/readyz` says what differs, and the log says it once;
//! 6. [`Service::build`]: the handler and the tasks (exit 78, 69 or 70 by [`StartError`]);
//!    [`Service::validate`] runs first of all, before NATS, so a bad value exits 78;
//! 7. the durable consumer on [`Service::CONSUMES`], the tasks; then ready;
//! 8. until SIGTERM/SIGINT (or a task fails): cancel, let the consumer drain and the tasks end
//!    (bounded), run the stop hooks, flush, exit 0 (70 when something failed).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wnodes_bus::{Bus, BusMetrics, Consumer, ErrorChain, KeyStore};

use crate::{
    Readiness, Telemetry,
    config::Config,
    exit, http,
    service::{Service, ServiceCtx, StartError, consumer_spec},
    shutdown,
};

/// Runs service `S` as its process: telemetry, signals, then [`run`]. Returns the exit code.
pub async fn serve<S: Service>(cfg: Config<S::Config>) -> u8 {
    let common = cfg.common.clone();
    with_telemetry(S::NAME, &common, async move {
        let token = CancellationToken::new();
        shutdown::cancel_on_signal(token.clone());
        run::<S>(cfg, token).await
    })
    .await
}

/// Runs `work` as process `name` with its telemetry (the TLS provider, logs, spans) installed,
/// then exports the last spans. 78 when telemetry cannot start.
pub(crate) async fn with_telemetry(
    name: &str,
    common: &crate::config::CommonConfig,
    work: impl Future<Output = u8>,
) -> u8 {
    wnodes_bus::connect::install_crypto_provider();
    let telemetry = match Telemetry::init(name, common) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wnodes-{name}: telemetry: {}", ErrorChain(&e));
            return exit::CONFIG;
        }
    };
    let code = work.await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

/// Runs service `S` until `shutdown` is cancelled (or it fails), through the same start-up
/// order as the binary, inside the caller's Tokio runtime and telemetry (tests run services
/// in-process this way). Returns the exit code.
pub async fn run<S: Service>(cfg: Config<S::Config>, shutdown: CancellationToken) -> u8 {
    run_with::<S>(cfg, shutdown, Readiness::default()).await
}

async fn run_with<S: Service>(
    cfg: Config<S::Config>,
    shutdown: CancellationToken,
    ready: Readiness,
) -> u8 {
    match start_and_run::<S>(cfg, shutdown.clone(), ready).await {
        Ok(code) => code,
        Err(e) => {
            shutdown.cancel();
            tracing::error!(service = S::NAME, error = %ErrorChain(&e), "Cannot start.");
            eprintln!("wnodes-{}: {}", S::NAME, ErrorChain(&e));
            e.exit_code()
        }
    }
}

async fn start_and_run<S: Service>(
    cfg: Config<S::Config>,
    shutdown: CancellationToken,
    ready: Readiness,
) -> Result<u8, StartError> {
    let Config { common, service } = cfg;
    // Before anything connects: a value the service cannot use exits 78, not 69.
    S::validate(&service)?;
    let source = format!("{}@{}", S::NAME, common.host);
    let mut registry = Registry::default();
    let bus_metrics = BusMetrics::register(&mut registry);
    registry.register(
        "wnodes_service_ready",
        "1 when the service is ready (its /readyz answers 200), 0 while it is not",
        ready.gauge(),
    );
    let registry = Arc::new(Mutex::new(registry));

    let identity = S::ROLE.identity(&common.host)?;
    let bus = Bus::connect(&common.nats.for_identity(&identity), &source, bus_metrics).await?;

    let state_dir = common.state_dir_of(S::NAME);
    let store = KeyStore::open(&state_dir.join("keys.db"))
        .await
        .map_err(|e| StartError::config("state_dir", e))?;
    let prune = tokio::spawn(prune_keys(
        store.clone().into(),
        common.consumer.key_retention,
        shutdown.clone(),
    ));

    let addr = common
        .http_addr
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let http_addr = http::serve(
        addr,
        registry.clone(),
        ready.clone(),
        bus.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| StartError::config("http_addr", HttpBind { addr, source: e }))?;
    tracing::info!(
        service = S::NAME,
        %http_addr,
        host = %common.host,
        site = %common.site,
        nats = %common.nats.url,
        "Service starting."
    );

    let beating = crate::heartbeat::Beating::start(
        bus.clone(),
        crate::heartbeat::Who {
            service: S::NAME,
            host: S::ROLE.host_of(&common.host).map(str::to_owned),
            identity: identity.clone(),
            http_addr,
            interval: common.heartbeat_interval,
        },
        ready.clone(),
    );

    let spec = if S::CONSUMES.is_empty() {
        None
    } else {
        Some(consumer_spec::<S>(&common.host, common.consumer.clone())?)
    };
    if !wait_provisioned(&bus, spec.as_ref(), &ready, &shutdown).await {
        beating.finish().await;
        return Ok(exit::OK);
    }

    let ctx = ServiceCtx {
        service: S::NAME,
        common,
        config: service,
        bus: bus.clone(),
        store,
        state_dir,
        registry,
        ready: ready.clone(),
        shutdown: shutdown.clone(),
        http_addr,
    };
    let parts = S::build(&ctx).await?;

    let mut tasks = JoinSet::new();
    let mut names = HashMap::new();
    // A service's own store (accounting's) is pruned too, on the same schedule.
    let own_prune = parts.store.clone().map(|own| {
        tokio::spawn(prune_keys(
            own,
            ctx.common.consumer.key_retention,
            shutdown.clone(),
        ))
    });
    if let (Some(handler), Some(spec)) = (parts.handler, spec) {
        let store = parts.store.unwrap_or_else(|| ctx.store.clone().into());
        let consumer = Consumer::bind(bus.clone(), store, spec, handler).await?;
        let token = shutdown.clone();
        let h = tasks.spawn(async move { consumer.run(token).await.map_err(Into::into) });
        names.insert(h.id(), "consumer");
    }
    for (name, task) in parts.tasks {
        let h = tasks.spawn(task);
        names.insert(h.id(), name);
    }
    ready.set_ready();
    tracing::info!(service = S::NAME, "Service ready.");

    let grace = ctx.common.consumer.shutdown_grace + Duration::from_secs(5);
    let failed = supervise(&mut tasks, &names, &shutdown, grace).await;
    shutdown.cancel();
    for hook in parts.on_stop {
        hook.await;
    }
    prune.abort();
    if let Some(p) = own_prune {
        p.abort();
    }
    beating.finish().await;
    bus.flush().await;
    if failed {
        tracing::error!(service = S::NAME, "Service stopped after a failure.");
        Ok(exit::SOFTWARE)
    } else {
        tracing::info!(service = S::NAME, "Service stopped.");
        Ok(exit::OK)
    }
}

/// How often a service that is not provisioned as it expects checks again.
const PROVISIONING_RECHECK: Duration = Duration::from_secs(3);

/// Checks the streams and the durable (never creating or changing them) until they are as
/// this service expects: meanwhile `/readyz` answers 503 with the difference, and each new
/// difference is logged once. False when shutdown came first.
async fn wait_provisioned(
    bus: &Bus,
    spec: Option<&wnodes_bus::ConsumerSpec>,
    ready: &Readiness,
    shutdown: &CancellationToken,
) -> bool {
    let mut last: Option<String> = None;
    loop {
        let checked = async {
            bus.check_streams().await?;
            if let Some(spec) = spec {
                wnodes_bus::layout::check_consumer(bus.jetstream(), &spec.expected()).await?;
            }
            Ok::<_, wnodes_bus::BusError>(())
        }
        .await;
        match checked {
            Ok(()) => {
                if last.is_some() {
                    tracing::info!("Streams and consumer are now provisioned as expected.");
                }
                return true;
            }
            Err(e) => {
                let why = ErrorChain(&e).to_string();
                if last.as_deref() != Some(why.as_str()) {
                    tracing::warn!(error = %why, "Not ready: the streams or the consumer are not provisioned as this service expects; checking again every 3 s (`wnodesctl provision` makes them).");
                }
                ready.set_not_ready(why.clone());
                last = Some(why);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(PROVISIONING_RECHECK) => {}
        }
    }
}

/// Waits for the tasks: the first failure (error or panic) cancels the service; after
/// cancellation the rest get `grace` to end, then are aborted. Returns whether any failed.
async fn supervise(
    tasks: &mut JoinSet<Result<(), crate::service::BoxError>>,
    names: &HashMap<tokio::task::Id, &'static str>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> bool {
    let mut failed = false;
    loop {
        let next = tokio::select! {
            n = tasks.join_next_with_id() => n,
            () = shutdown.cancelled() => break,
        };
        let Some(res) = next else {
            // Every task ended on its own: nothing left to run.
            return failed;
        };
        failed |= report(res, names, shutdown);
    }
    let drained = tokio::time::timeout(grace, async {
        let mut failed = false;
        while let Some(res) = tasks.join_next_with_id().await {
            failed |= report(res, names, shutdown);
        }
        failed
    })
    .await;
    match drained {
        Ok(f) => failed | f,
        Err(_) => {
            tracing::warn!(
                grace_s = grace.as_secs(),
                left = tasks.len(),
                "Tasks did not stop in time; aborting them."
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            failed
        }
    }
}

/// Logs how a task ended; returns true (and cancels the service) when it failed.
fn report(
    res: Result<(tokio::task::Id, Result<(), crate::service::BoxError>), tokio::task::JoinError>,
    names: &HashMap<tokio::task::Id, &'static str>,
    shutdown: &CancellationToken,
) -> bool {
    match res {
        Ok((id, Ok(()))) => {
            let task = names.get(&id).copied().unwrap_or("?");
            if !shutdown.is_cancelled() {
                tracing::info!(task, "Task finished.");
            }
            false
        }
        Ok((id, Err(e))) => {
            let task = names.get(&id).copied().unwrap_or("?");
            tracing::error!(task, error = %ErrorChain(e.as_ref()), "Task failed; stopping the service.");
            shutdown.cancel();
            true
        }
        Err(e) if e.is_cancelled() => false,
        Err(e) => {
            let task = names.get(&e.id()).copied().unwrap_or("?");
            tracing::error!(task, error = %e, "Task panicked; stopping the service.");
            shutdown.cancel();
            true
        }
    }
}

async fn prune_keys(store: wnodes_bus::Store, retention: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = store.prune(retention).await {
            tracing::warn!(error = %ErrorChain(&e), "Pruning idempotency keys failed.");
        }
    }
}

/// The HTTP endpoint's address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the HTTP endpoint {addr}")]
pub struct HttpBind {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A service running in this process through [`run`] (tests and benchmarks): the same start-up
/// order and shutdown as the binary, without telemetry or signal handlers of its own.
#[derive(Debug)]
pub struct InProcess {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<u8>,
    ready: Readiness,
}

impl InProcess {
    /// Starts service `S` on the current Tokio runtime and returns at once.
    pub fn spawn<S: Service>(cfg: Config<S::Config>) -> Self {
        let shutdown = CancellationToken::new();
        let ready = Readiness::default();
        let handle = tokio::spawn(run_with::<S>(cfg, shutdown.clone(), ready.clone()));
        Self {
            shutdown,
            handle,
            ready,
        }
    }

    /// Starts service `S` and waits until it is ready (its build done, its consumer created).
    /// `Err(exit code)` when it stopped before that.
    pub async fn start<S: Service>(cfg: Config<S::Config>) -> Result<Self, u8> {
        let running = Self::spawn::<S>(cfg);
        while !running.ready.is_ready() {
            if running.handle.is_finished() {
                return Err(running.handle.await.unwrap_or(exit::SOFTWARE));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(running)
    }

    /// Stops the service as SIGTERM would and returns its exit code (70 if it panicked).
    pub async fn stop(self) -> u8 {
        self.shutdown.cancel();
        self.handle.await.unwrap_or(exit::SOFTWARE)
    }
}
