//! The launcher on a real NATS server (testkit), with a real VM: `job.started` → `vm.requested`,
//! the four results faked → `vm.running` → `vm.stopped`; policy refusal, cancellation, the
//! preparation deadline, and a launcher restart that reattaches to a running VM.
//! VM-booting tests are named `vm_*` (see `tests/vm.rs`). Host tests (`wnodes_testkit::host`):
//! they need qemu and the test guest (and some more, listed in `main`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, time::Duration};

use tracing::Instrument;
use wnodes_bus::{Bus, ConsumerTuning, KeyStore, proto::event::Body};
use wnodes_launcher::{
    Launcher, LauncherConfig,
    config::AccelMode,
    policy::{NetworkModeConfig, PolicyConfig},
    usage::{self, CGROUP_ROOT, CgroupHost},
    vm_table::{self, VmState},
};
use wnodes_proto::v1::{ImageReady, JobCancelled, JobRunRef};
use wnodes_runtime::{Config, start::InProcess};
use wnodes_testkit::{host, host_test, nats::NatsServer, wait::wait_until};

mod common;

use wnodes_testkit::{events::ready_bodies, events::vm_id_of, host::guest_dir, vm::vm_lock};

use common::{HOST, LONG, ev, job_started, last_event, last_event_traced, run, wait_event};

struct Env {
    _nats: NatsServer,
    /// The launcher's own identity on HOST (its durable provisioned).
    identity: wnodes_bus::NatsConfig,
    dir: tempfile::TempDir,
    bus: Bus,
    store: KeyStore,
    guest: PathBuf,
}

async fn env() -> Env {
    let nats = NatsServer::start().await.unwrap();
    let bus = wnodes_testkit::bus::connect(&nats.admin(), &format!("launcher@{HOST}"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Each VM's qemu runs as a uid of its own, which must be able to enter the state directory.
    std::fs::set_permissions(
        dir.path(),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
    )
    .unwrap();
    let store = KeyStore::open(&dir.path().join("keys.db")).await.unwrap();
    let identity = nats
        .identity(&wnodes_bus::roles::LAUNCHER, HOST)
        .await
        .unwrap();
    Env {
        _nats: nats,
        identity,
        dir,
        bus,
        store,
        guest: guest_dir(),
    }
}

impl Drop for Env {
    /// A failed test must not leave its VMs running.
    fn drop(&mut self) {
        common::kill_vms_under(&self.dir.path().join("vms"));
    }
}

fn deps(env: &Env, prepare_deadline: Duration) -> Config<LauncherConfig> {
    let config = LauncherConfig {
        accel: AccelMode::Tcg,
        prepare_deadline,
        policy: PolicyConfig {
            vo_images: [("atlas".to_string(), "wnodes-test".to_string())].into(),
            network_mode: NetworkModeConfig::User,
            ..Default::default()
        },
        image_roots: vec![env.guest.clone()],
        scratch_roots: vec![env.dir.path().to_owned()],
        ..Default::default()
    };
    let mut cfg = Config::local(&env.identity, HOST, env.dir.path(), config);
    cfg.common.consumer = ConsumerTuning {
        backoff_base: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(2),
        ..Default::default()
    };
    cfg
}

/// Runs the launcher in this process; returns once it is ready.
async fn start(cfg: Config<LauncherConfig>) -> InProcess {
    tokio::time::timeout(Duration::from_secs(30), InProcess::start::<Launcher>(cfg))
        .await
        .expect("launcher ready in time")
        .unwrap_or_else(|code| panic!("launcher exited with {code}"))
}

async fn publish_ready(env: &Env, run: &JobRunRef, vm_id: &str) {
    for b in ready_bodies(&env.guest, vm_id) {
        env.bus.publish(&common::ev(run, b)).await.unwrap();
    }
}

async fn row_state(store: &KeyStore, vm_id: &str) -> Option<vm_table::VmRow> {
    let mut conn = store.pool().acquire().await.ok()?;
    vm_table::load(&mut conn, vm_id).await.ok().flatten()
}

async fn vm_nats_job_runs_to_vm_stopped_and_refusals_fail() {
    let _lock = vm_lock();
    let env = env().await;
    let mut cfg = deps(&env, Duration::from_secs(6));
    // A known /metrics address (a port the kernel just handed out, released again).
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cfg.common.http_addr = Some(http);
    // Long enough for the checks below to read the VM's files first.
    cfg.service.vm_dir_retention = Duration::from_secs(8);
    let launcher = start(cfg).await;

    // The happy path: a real VM.
    let r1 = run("flow-1");
    env.bus
        .publish(&job_started(&r1, "atlas", "echo hi; exit 3"))
        .await
        .unwrap();
    let requested = wait_event(&env.bus, "vm.requested", &r1).await;
    let vm_id = vm_id_of(&requested);
    assert_eq!(vm_id, wnodes_launcher::policy::vm_id(&r1));
    publish_ready(&env, &r1, &vm_id).await;
    let running = wait_event(&env.bus, "vm.running", &r1).await;
    let Some(Body::VmRunning(running)) = running.body else {
        panic!()
    };
    assert_eq!(running.accel, "tcg");
    assert!(running.pid > 0);
    // The VM's start is in the histogram the slow-start alert reads.
    let metrics = wnodes_testkit::http::get(&http.to_string(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("\nwnodes_launcher_vm_start_seconds_count 1\n"),
        "{metrics}"
    );
    // And each phase of it, once.
    for phase in ["image", "scratch", "network", "storage", "launch"] {
        assert!(
            metrics.contains(&format!(
                "\nwnodes_launcher_vm_phase_seconds_count{{phase=\"{phase}\"}} 1\n"
            )),
            "{phase}: {metrics}"
        );
    }
    let stopped = wait_event(&env.bus, "vm.stopped", &r1).await;
    assert_eq!(
        stopped.id,
        format!("vm.stopped:{}", wnodes_bus::event::run_key(&r1))
    );
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!()
    };
    assert_eq!(stopped.exit_code, 3);
    assert_eq!(stopped.output_tail, "hi\n");
    assert_eq!(stopped.stop_reason, "guest-poweroff");
    assert!(
        stopped
            .output_location
            .ends_with(&format!("{vm_id}/qemu/output.log"))
    );
    let usage = stopped.usage.unwrap();
    assert!(usage.cpu_seconds > 0.1, "{usage:?}");
    assert!(usage.peak_memory_bytes > 10 << 20, "{usage:?}");
    assert_eq!(usage.cores, 1);
    let row = wait_until(LONG, "row stopped with nothing pending", || async {
        row_state(&env.store, &vm_id)
            .await
            .filter(|r| r.state == VmState::Stopped && r.pending.is_none())
    })
    .await
    .unwrap();
    assert_eq!(row.pid, Some(running.pid));
    let job = wnodes_launcher::vm_dir::VmDir::new(&env.dir.path().join("vms"), &vm_id)
        .unwrap()
        .read_job()
        .unwrap();
    assert_eq!(job.vo, "atlas");

    // A result for a VM that already stopped is ignored.
    publish_ready(&env, &r1, &vm_id).await;

    // Policy: a VO without an image.
    let r2 = run("flow-2");
    env.bus
        .publish(&job_started(&r2, "lhcb", "true"))
        .await
        .unwrap();
    let failed = wait_event(&env.bus, "vm.failed", &r2).await;
    let Some(Body::VmFailed(f)) = failed.body else {
        panic!()
    };
    assert_eq!(
        (f.phase.as_str(), f.reason.as_str()),
        ("policy", "no image configured for VO 'lhcb'")
    );

    // Cancelled while preparing.
    let r3 = run("flow-3");
    env.bus
        .publish(&job_started(&r3, "atlas", "true"))
        .await
        .unwrap();
    wait_event(&env.bus, "vm.requested", &r3).await;
    env.bus
        .publish(&ev(
            &r3,
            Body::JobCancelled(JobCancelled {
                run: Some(r3.clone()),
                reason: "condor_rm by user".into(),
                cancelled_at: None,
            }),
        ))
        .await
        .unwrap();
    let failed = wait_event(&env.bus, "vm.failed", &r3).await;
    let Some(Body::VmFailed(f)) = failed.body else {
        panic!()
    };
    assert_eq!(
        (f.phase.as_str(), f.reason.as_str()),
        ("cancelled", "condor_rm by user")
    );

    // Deadline: only the image arrives.
    let r4 = run("flow-4");
    env.bus
        .publish(&job_started(&r4, "atlas", "true"))
        .await
        .unwrap();
    let vm4 = vm_id_of(&wait_event(&env.bus, "vm.requested", &r4).await);
    env.bus
        .publish(&ev(
            &r4,
            Body::ImageReady(ImageReady {
                vm_id: vm4.clone(),
                path: "/nonexistent".into(),
                ..Default::default()
            }),
        ))
        .await
        .unwrap();
    let failed = wait_event(&env.bus, "vm.failed", &r4).await;
    let Some(Body::VmFailed(f)) = failed.body else {
        panic!()
    };
    assert_eq!(f.phase, "deadline");
    assert!(
        f.reason.ends_with("missing: scratch, network, storage"),
        "{}",
        f.reason
    );

    // Past vm_dir_retention the finished VM's state directory goes; its row stays.
    let dir = env.dir.path().join("vms").join(&vm_id);
    wait_until(
        Duration::from_secs(40),
        "the finished VM's state directory removed",
        || async { (!dir.exists()).then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(
        row_state(&env.store, &vm_id).await.map(|r| r.state),
        Some(VmState::Stopped)
    );

    assert_eq!(launcher.stop().await, 0);
}

async fn vm_nats_launcher_restart_reattaches_to_a_running_vm() {
    let _lock = vm_lock();
    let env = env().await;
    // Spans with real ids and the W3C propagator, as the service runtime installs them.
    let _telemetry =
        wnodes_runtime::Telemetry::init("launcher-test", &wnodes_runtime::CommonConfig::default())
            .unwrap();
    let launcher = start(deps(&env, Duration::from_secs(120))).await;
    let r = run("restart-1");
    let submit = tracing::info_span!("test.submit");
    let trace_id = {
        let _e = submit.enter();
        wnodes_bus::propagation::current_trace_id()
    };
    assert_ne!(trace_id, "0".repeat(32));
    env.bus
        .publish(&job_started(&r, "atlas", "sleep 3; echo late; exit 4"))
        .instrument(submit)
        .await
        .unwrap();
    let vm_id = vm_id_of(&wait_event(&env.bus, "vm.requested", &r).await);
    publish_ready(&env, &r, &vm_id).await;
    let running = wait_event(&env.bus, "vm.running", &r).await;
    let Some(Body::VmRunning(running)) = running.body else {
        panic!()
    };

    // SIGTERM-like stop of the launcher: the VM keeps running.
    assert_eq!(launcher.stop().await, 0);
    let vm = wnodes_launcher::vm_dir::VmDir::new(&env.dir.path().join("vms"), &vm_id).unwrap();
    assert!(vm.qemu_alive(running.pid), "qemu survives the launcher");
    assert!(last_event(&env.bus, "vm.stopped").await.is_none());

    // The VM's own cgroup(s) (this host: v1, see tests/vm.rs) hold qemu and are recorded.
    let host = CgroupHost::detect(std::path::Path::new(CGROUP_ROOT)).expect("usable cgroups");
    let source = vm.read_running().unwrap().unwrap().usage;
    assert_eq!(source, host.source_for(&vm_id));
    assert!(usage::contains(&source, running.pid));
    // Leftovers of a VM this launcher does not know: removed when it starts.
    let stale = host.create("vm-fffffffffff1", None).unwrap();

    // A new launcher reattaches and reports the end.
    let launcher = start(deps(&env, Duration::from_secs(120))).await;
    let stopped = wait_event(&env.bus, "vm.stopped", &r).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!()
    };
    assert_eq!(stopped.exit_code, 4);
    assert_eq!(stopped.output_tail, "late\n");
    assert!(stopped.usage.unwrap().cpu_seconds > 0.1);
    for dir in usage::group_dirs(&stale)
        .into_iter()
        .chain(usage::group_dirs(&source))
    {
        assert!(!dir.exists(), "{dir:?} removed");
    }
    // vm.stopped, published by the second launcher, is in the job's trace (persisted context).
    let (_, traceparent) = last_event_traced(&env.bus, "vm.stopped").await.unwrap();
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(trace_id.as_str()),
        "{traceparent}"
    );
    let job = wnodes_launcher::vm_dir::VmDir::new(&env.dir.path().join("vms"), &vm_id)
        .unwrap()
        .read_job()
        .unwrap();
    assert!(job.trace_context["traceparent"].contains(&trace_id));
    assert_eq!(launcher.stop().await, 0);
}

async fn vm_nats_cancel_stops_a_running_vm() {
    let _lock = vm_lock();
    let env = env().await;
    let launcher = start(deps(&env, Duration::from_secs(120))).await;
    let r = run("cancel-1");
    env.bus
        .publish(&job_started(&r, "atlas", "sleep 600"))
        .await
        .unwrap();
    let vm_id = vm_id_of(&wait_event(&env.bus, "vm.requested", &r).await);
    publish_ready(&env, &r, &vm_id).await;
    wait_event(&env.bus, "vm.running", &r).await;
    env.bus
        .publish(&ev(
            &r,
            Body::JobCancelled(JobCancelled {
                run: Some(r.clone()),
                reason: "condor_rm by user".into(),
                cancelled_at: None,
            }),
        ))
        .await
        .unwrap();
    let stopped = wait_event(&env.bus, "vm.stopped", &r).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!()
    };
    assert_eq!(stopped.stop_reason, "cancelled");
    assert_eq!(stopped.exit_code, -1);
    assert!(last_event(&env.bus, "vm.failed").await.is_none());
    assert_eq!(launcher.stop().await, 0);
}

/// The VM's cgroup enforces its memory: the limit is the spec's memory plus the configured
/// overhead, and a qemu whose limit the test lowers to just above what it uses is killed by
/// the kernel as it grows (the guest booting, then the payload's 100 MiB); the VM stops as
/// `oom`, which the kernel's count of OOM kills in the group tells.
async fn vm_nats_a_vm_over_its_cgroup_memory_limit_is_killed_and_stops_as_oom() {
    let _lock = vm_lock();
    let env = env().await;
    let mut cfg = deps(&env, Duration::from_secs(60));
    cfg.service.memory_overhead_bytes = 512 << 20;
    let launcher = start(cfg).await;
    let r = run("oom-1");
    env.bus
        .publish(&job_started(
            &r,
            "atlas",
            "sleep 2; dd if=/dev/zero of=/tmp/fill bs=1M count=100; echo survived",
        ))
        .await
        .unwrap();
    let requested = wait_event(&env.bus, "vm.requested", &r).await;
    let vm_id = vm_id_of(&requested);
    let Some(Body::VmRequested(req)) = requested.body else {
        panic!()
    };
    let spec_memory = req.spec.unwrap().memory_bytes;
    publish_ready(&env, &r, &vm_id).await;
    wait_event(&env.bus, "vm.running", &r).await;
    let vm = wnodes_launcher::vm_dir::VmDir::new(&env.dir.path().join("vms"), &vm_id).unwrap();
    let source = vm.read_running().unwrap().unwrap().usage;
    let (limit_file, usage_file) = match &source {
        wnodes_launcher::vm_dir::UsageSource::Cgroup { path } => {
            (path.join("memory.max"), path.join("memory.current"))
        }
        wnodes_launcher::vm_dir::UsageSource::CgroupV1 { memory, .. } => (
            memory.join("memory.limit_in_bytes"),
            memory.join("memory.usage_in_bytes"),
        ),
        wnodes_launcher::vm_dir::UsageSource::Proc => panic!("the VM has no cgroup"),
    };
    let read = |f: &std::path::Path| -> u64 {
        std::fs::read_to_string(f).unwrap().trim().parse().unwrap()
    };
    assert_eq!(
        read(&limit_file),
        spec_memory + (512 << 20),
        "the launcher set the spec's memory plus the overhead"
    );
    // Just above what qemu holds now: the payload's 100 MiB cannot fit.
    let tight = read(&usage_file) + (24 << 20);
    std::fs::write(&limit_file, tight.to_string()).unwrap();
    let stopped = wait_event(&env.bus, "vm.stopped", &r).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!()
    };
    assert_eq!(stopped.stop_reason, "oom", "{stopped:?}");
    assert_ne!(stopped.output_tail, "survived\n");
    assert_eq!(
        stopped.exit_code, -1,
        "the guest never reported: {stopped:?}"
    );
    assert_eq!(launcher.stop().await, 0);
}

/// A payload that allocates past the guest's memory is ended by the guest's OOM killer: the
/// job exits non-zero, the VM powers off normally, and qemu (well inside its cgroup limit) is
/// not what gets killed.
async fn vm_nats_a_payload_past_the_guests_memory_ends_by_the_guests_oom_killer() {
    let _lock = vm_lock();
    let env = env().await;
    let launcher = start(deps(&env, Duration::from_secs(60))).await;
    let r = run("guest-oom-1");
    // The guest has 256 MiB: a 300 MiB buffer, allocated (the payload, root in the guest,
    // lets the guest overcommit) and then filled, cannot fit.
    env.bus
        .publish(&job_started(
            &r,
            "atlas",
            "echo 1 > /proc/sys/vm/overcommit_memory; \
             dd if=/dev/zero of=/dev/null bs=300M count=1 && echo survived",
        ))
        .await
        .unwrap();
    let vm_id = vm_id_of(&wait_event(&env.bus, "vm.requested", &r).await);
    publish_ready(&env, &r, &vm_id).await;
    let stopped = wait_event(&env.bus, "vm.stopped", &r).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!()
    };
    // 128 + SIGKILL: the guest's OOM killer, not a failed allocation (dd would exit 1).
    assert_eq!(stopped.exit_code, 137, "{stopped:?}");
    assert!(!stopped.output_tail.contains("survived"), "{stopped:?}");
    assert_eq!(stopped.stop_reason, "guest-poweroff", "{stopped:?}");
    assert_eq!(launcher.stop().await, 0);
}

/// A loop device over `file` (`losetup --find --show`), detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &std::path::Path) -> Self {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        Self(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .output();
    }
}

/// A 64 MiB ext4 file system in `path`.
fn ext4_file(path: &std::path::Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
}

/// The launcher's rule for the `lvm` backend's block devices. A device-mapper node (a node
/// made here, with the kernel's description faked in a sysfs tree of the test's own: this
/// host has no device-mapper) is allowed by its volume group. A real loop device over a file
/// under `scratch_roots` (what the scratch service's metadata-only mode hands over) carries a
/// real VM's scratch: the payload's file is on the device afterwards. A loop device over a
/// file elsewhere is refused and no qemu starts.
async fn vm_nats_scratch_on_a_block_device_and_the_device_rule() {
    use std::os::unix::fs::PermissionsExt;
    use wnodes_launcher::host_paths::check_lvm_device;

    // The device-mapper rule, on a node and a sysfs of the test's own.
    let fake = tempfile::tempdir().unwrap();
    let node = fake.path().join("dm-7");
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(253, 7),
    )
    .unwrap();
    let sys = fake.path().join("sys");
    std::fs::create_dir_all(sys.join("253:7/dm")).unwrap();
    std::fs::write(sys.join("253:7/dm/name"), "vg--scratch-vm--1234\n").unwrap();
    let dev = node.display().to_string();
    let groups = ["vg-scratch".to_string()];
    assert_eq!(
        check_lvm_device(&sys, &dev, &groups, &[]).unwrap(),
        node.canonicalize().unwrap().display().to_string()
    );
    let other = check_lvm_device(&sys, &dev, &["vg_other".to_string()], &[]).unwrap_err();
    assert_eq!(other.rule, "scratch.lvm");
    assert!(
        other
            .reason
            .contains("logical volume \"vm-1234\" of volume group \"vg-scratch\""),
        "{other:?}"
    );
    std::fs::write(sys.join("253:7/dm/name"), "mpatha\n").unwrap();
    assert_eq!(
        check_lvm_device(&sys, &dev, &groups, &[]).unwrap_err().rule,
        "scratch.lvm"
    );
    // A regular file is not a device.
    std::fs::write(fake.path().join("plain"), "x").unwrap();
    let plain = fake.path().join("plain").display().to_string();
    assert_eq!(
        check_lvm_device(&sys, &plain, &groups, &[])
            .unwrap_err()
            .rule,
        "scratch.device"
    );

    let _lock = vm_lock();
    let env = env().await;
    let mut cfg = deps(&env, Duration::from_secs(6));
    cfg.service.scratch_volume_groups = vec!["vg_wnodes_test".into()];
    let launcher = start(cfg).await;

    // A loop device over a file under scratch_roots: the VM writes its scratch there.
    let backing = env.dir.path().join("pv.img");
    ext4_file(&backing);
    let dev = LoopDevice::attach(&backing);
    let r1 = run("blockdev-1");
    env.bus
        .publish(&job_started(
            &r1,
            "atlas",
            "echo on-the-device > /scratch/written; sync; exit 0",
        ))
        .await
        .unwrap();
    let vm_id = vm_id_of(&wait_event(&env.bus, "vm.requested", &r1).await);
    for b in ready_bodies(&env.guest, &vm_id) {
        let b = match b {
            Body::ScratchReady(mut s) => {
                s.path = dev.0.clone();
                s.backend = "lvm".into();
                s.format = "raw".into();
                s.size_bytes = 64 << 20;
                Body::ScratchReady(s)
            }
            b => b,
        };
        env.bus.publish(&common::ev(&r1, b)).await.unwrap();
    }
    let stopped = wait_event(&env.bus, "vm.stopped", &r1).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!()
    };
    assert_eq!(stopped.exit_code, 0, "{stopped:?}");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /written", &dev.0])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "on-the-device\n",
        "{out:?}"
    );
    // Given back to root once the VM ended.
    let meta = std::fs::metadata(&dev.0).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            meta.permissions().mode() & 0o777
        ),
        (0, 0o600)
    );

    // A loop device over a file outside scratch_roots: refused, nothing started.
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("other.img");
    ext4_file(&outside);
    let dev2 = LoopDevice::attach(&outside);
    let r2 = run("blockdev-2");
    env.bus
        .publish(&job_started(&r2, "atlas", "true"))
        .await
        .unwrap();
    let vm_id = vm_id_of(&wait_event(&env.bus, "vm.requested", &r2).await);
    for b in ready_bodies(&env.guest, &vm_id) {
        let b = match b {
            Body::ScratchReady(mut s) => {
                s.path = dev2.0.clone();
                s.backend = "lvm".into();
                s.format = "raw".into();
                Body::ScratchReady(s)
            }
            b => b,
        };
        env.bus.publish(&common::ev(&r2, b)).await.unwrap();
    }
    let failed = wait_event(&env.bus, "vm.failed", &r2).await;
    let Some(Body::VmFailed(f)) = failed.body else {
        panic!()
    };
    assert_eq!(f.phase, "policy", "{f:?}");
    assert!(
        f.reason.starts_with("host policy scratch.lvm:") && f.reason.contains("loop device over"),
        "{f:?}"
    );
    assert_eq!(launcher.stop().await, 0);
}

/// Two CPUs to pin to, and `taskset`.
const PIN_NEEDS: &[host::Precondition] = &[
    host::Precondition::Qemu,
    host::Precondition::TestGuest,
    host::Precondition::Root,
    host::Precondition::Setpriv,
    host::Precondition::Other("taskset and CPUs 0 and 1", || {
        let cpus = wnodes_launcher::cores::own_cpus();
        if !std::path::Path::new("/usr/bin/taskset").exists() {
            Err("/usr/bin/taskset (util-linux)".into())
        } else if !(cpus.contains(&0) && cpus.contains(&1)) {
            Err(format!("CPUs 0 and 1 (this process may use {cpus:?})"))
        } else {
            Ok(())
        }
    }),
];

/// `taskset -p` of each vCPU thread of the VM's qemu (from QMP `query-cpus-fast`), as masks.
async fn vcpu_masks(env: &Env, vm_id: &str) -> Vec<u64> {
    let vm = wnodes_launcher::vm_dir::VmDir::new(&env.dir.path().join("vms"), vm_id).unwrap();
    let mut q = wnodes_launcher::qmp::Qmp::connect(&vm.qmp_socket())
        .await
        .unwrap();
    let cpus = q.execute("query-cpus-fast").await.unwrap();
    cpus.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let tid = c["thread-id"].as_i64().unwrap().to_string();
            let out = std::process::Command::new("/usr/bin/taskset")
                .args(["-p", &tid])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mask = text.trim().rsplit_once(": ").unwrap().1.to_owned();
            u64::from_str_radix(&mask, 16).unwrap_or_else(|_| panic!("taskset: {text}"))
        })
        .collect()
}

/// The launcher with `[launcher.tuning]`: VMs pinned by VO over cores 0-1, a queue's own
/// profile on qemu's command line, and the cores rebuilt from the VM table by a restarted
/// launcher (a VM of cms lands next to cms's VM, not on atlas's core).
async fn vm_nats_pinned_vms_are_grouped_by_vo_across_a_restart() {
    use wnodes_launcher::tuning::{TuningConfig, TuningProfile};
    let _lock = vm_lock();
    let env = env().await;
    let config = |env: &Env| {
        let mut cfg = deps(env, Duration::from_secs(120));
        cfg.service
            .policy
            .vo_images
            .insert("cms".into(), "wnodes-test".into());
        cfg.service.tuning = TuningConfig {
            host_cores: Some("0-1".into()),
            vo_grouping: true,
            default: TuningProfile {
                pin_vcpus: Some(true),
                ..Default::default()
            },
            queues: [(
                "hpc".to_string(),
                TuningProfile {
                    mem_merge: Some(false),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        cfg
    };
    let launcher = start(config(&env)).await;
    let start_vm = |r: JobRunRef, vo: &'static str, queue: &'static str| {
        let env = &env;
        async move {
            let mut started = wnodes_testkit::events::job_started(&r, HOST, vo, "sleep 600");
            started.job.as_mut().unwrap().queue = queue.into();
            env.bus
                .publish(&ev(&r, Body::JobStarted(started)))
                .await
                .unwrap();
            let vm_id = vm_id_of(&wait_event(&env.bus, "vm.requested", &r).await);
            publish_ready(env, &r, &vm_id).await;
            wait_event(&env.bus, "vm.running", &r).await;
            let row = row_state(&env.store, &vm_id).await.unwrap();
            (vm_id, row)
        }
    };
    let (a, row_a) = start_vm(run("pin-a"), "atlas", "short").await;
    assert_eq!(row_a.host_cores, vec![0]);
    assert_eq!(vcpu_masks(&env, &a).await, vec![0b01]);
    let (b, row_b) = start_vm(run("pin-b"), "cms", "hpc").await;
    assert_eq!(row_b.host_cores, vec![1]);
    assert_eq!(vcpu_masks(&env, &b).await, vec![0b10]);
    // The queue's profile: KSM off for cms's VM from queue hpc only.
    let cmdline = |vm_id: &str| {
        let vm = wnodes_launcher::vm_dir::VmDir::new(&env.dir.path().join("vms"), vm_id).unwrap();
        let pid = vm.read_running().unwrap().unwrap().pid;
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
            .replace('\0', " ")
    };
    assert!(
        cmdline(&b).contains(" -M pc,mem-merge=off "),
        "{}",
        cmdline(&b)
    );
    assert!(cmdline(&a).contains(" -M pc "), "{}", cmdline(&a));

    // A restarted launcher knows the cores only from the table: both are taken, and cms's
    // next VM shares cms's core (a forgetful or ungrouped allocator would pick core 0).
    assert_eq!(launcher.stop().await, 0);
    let launcher = start(config(&env)).await;
    let (c, row_c) = start_vm(run("pin-c"), "cms", "short").await;
    assert_eq!(row_c.host_cores, vec![1]);
    assert_eq!(vcpu_masks(&env, &c).await, vec![0b10]);

    for (name, vm_id) in [("pin-a", &a), ("pin-b", &b), ("pin-c", &c)] {
        let r = run(name);
        env.bus
            .publish(&ev(
                &r,
                Body::JobCancelled(JobCancelled {
                    run: Some(r.clone()),
                    reason: "test over".into(),
                    cancelled_at: None,
                }),
            ))
            .await
            .unwrap();
        wait_event(&env.bus, "vm.stopped", &r).await;
        let row = row_state(&env.store, vm_id).await.unwrap();
        assert_eq!(row.state, VmState::Stopped);
    }
    // Nothing holds a core any more: the next allocation starts from an empty host.
    let mut conn = env.store.pool().acquire().await.unwrap();
    assert!(
        vm_table::live_core_uses(&mut conn, "")
            .await
            .unwrap()
            .is_empty()
    );
    drop(conn);
    assert_eq!(launcher.stop().await, 0);
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(multi_thread vm_nats_a_payload_past_the_guests_memory_ends_by_the_guests_oom_killer needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(multi_thread vm_nats_a_vm_over_its_cgroup_memory_limit_is_killed_and_stops_as_oom needs [Qemu, TestGuest, Root, Setpriv, Cgroups]),
        host_test!(multi_thread vm_nats_job_runs_to_vm_stopped_and_refusals_fail needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(multi_thread vm_nats_launcher_restart_reattaches_to_a_running_vm needs [Qemu, TestGuest, Root, Setpriv, Cgroups]),
        host_test!(multi_thread vm_nats_cancel_stops_a_running_vm needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(multi_thread vm_nats_scratch_on_a_block_device_and_the_device_rule needs [Qemu, TestGuest, Root, Setpriv, LoopDevices]),
        host_test!(multi_thread vm_nats_pinned_vms_are_grouped_by_vo_across_a_restart needs PIN_NEEDS),
    ])
}
