//! The whole WNoDeS stack on one machine: a private `nats-server` and the seven services as
//! separate processes (`wnodes-<name>` binaries, one shared config file), booting real qemu VMs
//! from the test guest (`guest/build.sh`). Used by `wnodes-dev demo` (`scripts/demo.sh`), the
//! end-to-end tests (`integration-tests/tests/job_flow.rs`) and the vm-start benchmark.
//!
//! | module | what it gives |
//! |---|---|
//! | [`options`] | [`StackOptions`]: work dir, network mode (tap in a private netns, or qemu user mode), OTLP endpoint (and the namespace it is reached from), where binaries and the guest are, the VO, the job's uid/gid, how the image is served, policy maxima, whether the storage export is configured. |
//! | [`netns`] | [`enter_private_netns`]: `unshare(CLONE_NEWNET)` + `lo` up, for tap mode; call it before any thread or async runtime exists. It returns the [`HostNetns`] it left. |
//! | [`otlp_relay`] | [`OtlpRelay`]: `127.0.0.1:<port>` in the stack's namespace relayed over TCP to an OTLP endpoint on the host (a socket made by a thread that `setns`es into the [`HostNetns`]), so the demo's spans reach a receiver on the host's loopback. |
//! | [`stack`] | [`Stack`]: writes the config, starts nats-server and the services, waits for `/readyz`, stops/kills/restarts single services, tears everything down on drop. |
//! | [`submit`] | [`Stack::submit`] (`wnodes-bridge submit` as a process; [`Stack::spawn_submit`] to signal it while it runs) and [`Stack::grpc_submit`] (the bridge's gRPC API): [`SubmitArgs`] in, [`SubmitOutcome`] out. |
//! | [`events`] | [`Stack::run_events`] (a run's events with their JetStream publish times) and [`timeline`] (per-phase durations). |
//! | [`usage`] | [`Stack::usage_records`] / [`Stack::usage_record`] (via `wnodes-accounting records --json`). |
//! | [`slurm`] | [`Stack::sbatch`]: a batch script through a real Slurm (`SLURM_CONF`, `scripts/slurm-cluster.sh`) whose `job_submit.lua` runs it in a VM of this stack; [`slurm::sacct_final`]: `sacct`'s final line for the job. |
//! | [`leftovers`] | [`Stack::leftovers`]: scratch files, taps, nft chains, gateway listeners, `sftp-server` and qemu processes that outlive a job. |
//!
//! Binaries: `wnodes-dev` (`demo`, `up`, `down`) and `wnodes-trace-sink` (an OTLP/gRPC receiver
//! with a Jaeger-shaped query API: the compose stack's trace backend where no Jaeger image can be
//! pulled, `compose/docker-compose.build.yml`).
//!
//! Everything the stack starts logs into `<work_dir>/logs/<service>.log`; state lives in
//! `<work_dir>/state/<service>`; the export every VM mounts on `/shared` is `<work_dir>/export`.

pub mod events;
pub mod leftovers;
pub mod netns;
pub mod options;
pub mod otlp_relay;
pub mod slurm;
pub mod stack;
pub mod submit;
pub mod usage;

pub use events::{Phase, RunEvent, timeline};
pub use leftovers::Leftovers;
pub use netns::{HostNetns, enter_private_netns};
pub use options::{ExtraImage, ImageServing, NetworkChoice, PolicyLimits, StackOptions};
pub use otlp_relay::OtlpRelay;
pub use slurm::SlurmJob;
pub use stack::{SERVICES, Stack};
pub use submit::{Payload, RunningSubmit, SubmitArgs, SubmitOutcome};
pub use usage::UsageRecord;
