//! The launcher's shared state ([`LauncherState`]): config, host facts, the store, the bus,
//! the starter's queue and the set of watched VMs; building events about a VM's run.

use std::{collections::HashSet, path::PathBuf, sync::Arc};

use parking_lot::Mutex;
use prometheus_client::metrics::{family::Family, histogram::Histogram};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wnodes_bus::{Bus, EventExt, KeyStore, proto::event::Body};
use wnodes_proto::v1::Event;
use wnodes_runtime::ServiceCtx;

use crate::{
    config::{Accel, LauncherConfig},
    usage::{CGROUP_ROOT, CgroupHost},
    vm_dir::StateError,
    vm_table::{self, VmRow, VmTableError},
    watch::WatchOptions,
};

/// A launcher problem outside a handler.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error(transparent)]
    Table(#[from] VmTableError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("launcher store")]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Bus(#[from] wnodes_bus::BusError),
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
}

/// State shared by the handler and the background tasks.
#[derive(Debug)]
pub struct LauncherState {
    pub config: LauncherConfig,
    pub accel: Accel,
    pub vms_dir: PathBuf,
    pub host: String,
    pub source: String,
    pub store: KeyStore,
    pub bus: Bus,
    /// The host's usable cgroups (`None`: usage from `/proc` samples).
    pub cgroups: Option<CgroupHost>,
    pub watch: WatchOptions,
    /// The host cores pinned vCPUs are placed on (`[launcher.tuning] host_cores`, else the
    /// launcher's own CPUs).
    pub host_cores: Vec<u32>,
    pub shutdown: CancellationToken,
    pub(crate) starter: mpsc::UnboundedSender<String>,
    pub(crate) watching: Mutex<HashSet<String>>,
    /// `wnodes_launcher_vm_start_seconds`: from `vm.requested` to `vm.running` (the four
    /// preparations and qemu's start), per VM that reached running.
    pub(crate) vm_start_seconds: Histogram,
    /// `wnodes_launcher_vm_phase_seconds{phase}`: per VM, from `vm.requested` to each
    /// preparation result (`image`, `scratch`, `network`, `storage`) as the launcher records
    /// it, and qemu's own start (`launch`).
    pub(crate) vm_phase_seconds: Family<Vec<(&'static str, &'static str)>, Histogram>,
}

/// Buckets of `vm_start_seconds` (seconds).
const START_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// Buckets of `vm_phase_seconds` (seconds): a cached image is ready in milliseconds, a fetch
/// can take minutes.
const PHASE_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

impl LauncherState {
    /// Counts `seconds` of `phase` in `wnodes_launcher_vm_phase_seconds`.
    pub(crate) fn observe_phase(&self, phase: &'static str, seconds: f64) {
        self.vm_phase_seconds
            .get_or_create(&vec![("phase", phase)])
            .observe(seconds.max(0.0));
    }

    /// Builds the shared state; the receiver feeds [`LauncherState::run_starter`].
    pub fn new(ctx: &ServiceCtx<LauncherConfig>) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let shutdown = ctx.shutdown.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let cgroups = CgroupHost::detect(std::path::Path::new(CGROUP_ROOT));
        let vm_start_seconds = Histogram::new(START_BUCKETS);
        let vm_phase_seconds: Family<Vec<(&'static str, &'static str)>, Histogram> =
            Family::new_with_constructor(|| Histogram::new(PHASE_BUCKETS));
        {
            let mut registry = ctx.registry.lock();
            let launcher = registry.sub_registry_with_prefix("wnodes_launcher");
            launcher.register(
                "vm_start_seconds",
                "Time from vm.requested to vm.running (preparations and qemu's start)",
                vm_start_seconds.clone(),
            );
            launcher.register(
                "vm_phase_seconds",
                "Per VM: time from vm.requested to each preparation result as the launcher records it (phase image, scratch, network, storage), and qemu's start (phase launch)",
                vm_phase_seconds.clone(),
            );
        }
        let launcher = Self {
            accel: ctx.config.accel.resolve_here(),
            // qemu's command line must name absolute paths (and liveness checks look for them).
            vms_dir: {
                let d = ctx.config.vms_dir(&ctx.state_dir);
                std::path::absolute(&d).unwrap_or(d)
            },
            config: ctx.config.clone(),
            host: ctx.common.host.clone(),
            source: ctx.source(),
            store: ctx.store.clone(),
            bus: ctx.bus.clone(),
            cgroups,
            watch: WatchOptions {
                output_limit_bytes: ctx.config.output_limit_bytes,
                ..WatchOptions::default()
            },
            // Checked by `Service::validate`; an unreadable list falls back to our CPUs.
            host_cores: ctx
                .config
                .tuning
                .host_cores()
                .ok()
                .flatten()
                .unwrap_or_else(crate::cores::own_cpus),
            shutdown,
            starter: tx,
            watching: Mutex::new(HashSet::new()),
            vm_start_seconds,
            vm_phase_seconds,
        };
        (Arc::new(launcher), rx)
    }

    /// Builds an event about `row`'s run.
    pub fn event(&self, row: &VmRow, body: Body) -> Event {
        let host = if row.host.is_empty() {
            &self.host
        } else {
            &row.host
        };
        Event::build(row.run.clone(), host, &self.source, body)
    }

    /// Asks the starter to start `vm_id` (it re-reads the row once the caller's transaction
    /// has committed: the store has a single write connection).
    pub fn request_start(&self, vm_id: &str) {
        if self.starter.send(vm_id.to_owned()).is_err() {
            tracing::warn!(
                vm_id,
                "Starter gone; the VM starts at the next launcher start."
            );
        }
    }

    pub(crate) async fn load(&self, vm_id: &str) -> Result<Option<VmRow>, LauncherError> {
        let mut conn = self.store.pool().acquire().await?;
        Ok(vm_table::load(&mut conn, vm_id).await?)
    }
}
