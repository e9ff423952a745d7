//! Boots real VMs (qemu, TCG, the test guest from `guest/build.sh`, user-mode networking; no
//! NATS). Every VM-booting test is named `vm_*` so a runner can group them (e.g. a nextest
//! test group with `max-threads = 1` on `test(/^vm_/)`); they also take a host-wide file lock,
//! so they boot one VM at a time even without that. Host tests (`wnodes_testkit::host`): they
//! need qemu and the test guest (and some more, listed in `main`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use wnodes_testkit::{host::guest_dir, vm::vm_lock};

use std::{path::Path, time::Duration};

use wnodes_launcher::{
    config::Accel,
    qemu::{self, LaunchInputs},
    qmp,
    usage::{self, CGROUP_ROOT, CgroupHost},
    vm_dir::{RunningRecord, UsageSource, VmDir},
    watch::{self, STOP_GUEST_POWEROFF, WatchOptions},
};
use wnodes_proto::v1::{
    ImageReady, JobPayload, NetworkMode, NetworkReady, ScratchReady, StorageReady, VmSpec,
    job_payload,
};
use wnodes_testkit::{host, host_test};

struct Fixture {
    _lock: nix::fcntl::Flock<std::fs::File>,
    _dir: tempfile::TempDir,
    vm: VmDir,
    spec: VmSpec,
    image: ImageReady,
    network: NetworkReady,
}

impl Drop for Fixture {
    /// A failed test must not leave its VM running (nor its cgroups behind).
    fn drop(&mut self) {
        common::kill_vms_under(self.vm.dir().parent().unwrap_or(Path::new("/nonexistent")));
        // A qemu started without running.json (spawn_detached alone).
        if let Some(pid) = self.vm.read_pid_file()
            && self.vm.qemu_alive(pid)
            && let Ok(raw) = i32::try_from(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(host) = CgroupHost::detect(Path::new(CGROUP_ROOT)) {
            let source = host.source_for(self.vm.vm_id());
            for _ in 0..20 {
                if usage::group_dirs(&source).iter().all(|d| !d.exists()) {
                    break;
                }
                usage::remove_groups(self.vm.vm_id(), &source);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn fixture(script: &str) -> Fixture {
    let lock = vm_lock();
    let guest = guest_dir();
    let dir = tempfile::tempdir().unwrap();
    let vm = VmDir::new(dir.path(), "vm-00000000a0b1").unwrap();
    let spec = VmSpec {
        vm_id: vm.vm_id().into(),
        cores: 1,
        memory_bytes: 256 * 1024 * 1024,
        walltime: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        payload: Some(JobPayload {
            kind: Some(job_payload::Kind::InlineScript(script.as_bytes().to_vec())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let image = ImageReady {
        vm_id: vm.vm_id().into(),
        path: guest.join("rootfs.ext4").display().to_string(),
        format: "raw".into(),
        kernel_path: guest.join("vmlinux").display().to_string(),
        initrd_path: guest.join("initrd.img").display().to_string(),
        ..Default::default()
    };
    let network = NetworkReady {
        vm_id: vm.vm_id().into(),
        mode: NetworkMode::User as i32,
        mac: "52:54:00:00:a0:b1".into(),
        address: "10.0.2.15/24".into(),
        gateway: "10.0.2.2".into(),
        ..Default::default()
    };
    Fixture {
        _lock: lock,
        _dir: dir,
        vm,
        spec,
        image,
        network,
    }
}

impl Fixture {
    /// What qemu is launched with: this fixture's VM, spec and image (TCG), and the given
    /// preparation results.
    fn inputs<'a>(
        &'a self,
        scratch: Option<&'a ScratchReady>,
        network: Option<&'a NetworkReady>,
        storage: Option<&'a StorageReady>,
    ) -> LaunchInputs<'a> {
        LaunchInputs {
            accel: Accel::Tcg,
            vm: &self.vm,
            spec: &self.spec,
            image: &self.image,
            scratch,
            network,
            storage,
        }
    }
}

async fn boot(f: &Fixture) -> RunningRecord {
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), Some(&f.network), Some(&storage));
    let running = qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None, 0)
        .await
        .expect("qemu starts");
    assert_eq!(running.usage, UsageSource::Proc);
    assert!(f.vm.qemu_alive(running.pid), "qemu runs detached");
    running
}

fn opts() -> WatchOptions {
    WatchOptions {
        poll: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn watch_to_end(vm: &VmDir) -> watch::VmExit {
    tokio::time::timeout(Duration::from_secs(120), watch::watch(vm, &opts()))
        .await
        .expect("the VM stops within 2 minutes")
        .expect("watch")
}

fn console(vm: &VmDir) -> String {
    String::from_utf8_lossy(&std::fs::read(vm.console_log()).unwrap_or_default()).into_owned()
}

async fn vm_payload_exit_code_output_and_usage_are_read_back() {
    let f = fixture("echo hi; exit 3");
    let running = boot(&f).await;
    let exit = watch_to_end(&f.vm).await;
    assert!(!f.vm.qemu_alive(running.pid));
    assert_eq!(exit.exit_code, 3, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "hi\n");
    assert_eq!(exit.stop_reason, STOP_GUEST_POWEROFF);
    assert!(
        exit.guest.phases.contains(&"network".to_string()),
        "{:?}",
        exit.guest
    );
    assert!(exit.observed_exit);
    assert!(exit.usage.cpu_seconds > 0.1, "{:?}", exit.usage);
    // CPU and wall cover the same interval (qemu's start-up before vm.running is left out).
    assert!(
        exit.usage.cpu_seconds <= exit.wall().as_secs_f64() * f64::from(exit.cores),
        "{:?} over {:?}",
        exit.usage,
        exit.wall()
    );
    assert!(exit.usage.peak_memory_bytes > 10 << 20, "{:?}", exit.usage);
    assert!(
        exit.wall() > Duration::from_millis(500),
        "{:?}",
        exit.wall()
    );
    assert_eq!(exit.cores, 1);
    // The samples were persisted for a launcher that restarts.
    let persisted = wnodes_launcher::usage::read_usage_file(&f.vm);
    assert!(persisted.cpu_seconds > 0.1);
}

async fn vm_a_guest_power_off_is_seen_through_the_qmp_event_monitor() {
    // The payload powers the guest off itself, before the guest's init can write an exit code:
    // only qemu's SHUTDOWN event (guest-initiated) on the event monitor tells a power-off from
    // a qemu that died.
    let f = fixture("poweroff -f");
    let running = boot(&f).await;
    let exit = watch_to_end(&f.vm).await;
    assert!(!f.vm.qemu_alive(running.pid));
    assert_eq!(exit.guest.exit_code, None, "no exit code was written");
    assert_eq!(exit.exit_code, -1);
    assert_eq!(
        exit.stop_reason,
        STOP_GUEST_POWEROFF,
        "console:\n{}",
        console(&f.vm)
    );
}

async fn vm_reattach_from_state_dir_after_the_watcher_is_dropped() {
    let f = fixture("sleep 2; echo done; exit 7");
    let running = boot(&f).await;
    // First watcher (as in a launcher that then crashes): dropped while the VM runs.
    let first =
        tokio::time::timeout(Duration::from_millis(1500), watch::watch(&f.vm, &opts())).await;
    assert!(first.is_err(), "the VM was still running");
    assert!(
        f.vm.qemu_alive(running.pid),
        "dropping the watcher leaves qemu running"
    );
    // A new watcher, from nothing but the state directory.
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 7, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "done\n");
    assert!(exit.observed_exit);
    assert!(exit.usage.cpu_seconds > 0.1, "{:?}", exit.usage);
}

async fn vm_finished_while_nobody_watched_is_finished_from_the_state_dir() {
    let f = fixture("echo bye; exit 5");
    let running = boot(&f).await;
    // A watcher samples for a moment, then "the launcher dies".
    let _ = tokio::time::timeout(Duration::from_millis(800), watch::watch(&f.vm, &opts())).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while f.vm.qemu_alive(running.pid) {
        assert!(tokio::time::Instant::now() < deadline, "VM did not stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 5, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "bye\n");
    assert!(!exit.observed_exit);
    assert!(exit.usage.peak_memory_bytes > 10 << 20, "{:?}", exit.usage);
    assert!(exit.stopped_at >= exit.started_at);
}

async fn vm_is_stopped_through_qmp() {
    let f = fixture("sleep 600");
    let running = boot(&f).await;
    // Let the guest get going, then stop it (powerdown, then quit after the grace).
    tokio::time::sleep(Duration::from_secs(1)).await;
    qmp::stop_vm(&f.vm.qmp_socket(), Duration::from_secs(2), || {
        f.vm.qemu_alive(running.pid)
    })
    .await
    .expect("QMP stop");
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, -1, "no exit line: the guest did not finish");
    assert_eq!(exit.stop_reason, watch::STOP_QEMU_EXITED);
}

async fn vm_walltime_is_enforced() {
    let mut f = fixture("sleep 600");
    f.spec.walltime = Some(prost_types::Duration {
        seconds: 3,
        nanos: 0,
    });
    boot(&f).await;
    let opts = WatchOptions {
        poll: Duration::from_millis(100),
        powerdown_grace: Duration::from_secs(1),
        ..Default::default()
    };
    let exit = tokio::time::timeout(Duration::from_secs(60), watch::watch(&f.vm, &opts))
        .await
        .expect("stopped in time")
        .expect("watch");
    assert_eq!(exit.stop_reason, watch::STOP_WALLTIME);
    assert_eq!(exit.exit_code, -1);
    assert!(exit.wall() >= Duration::from_secs(3), "{:?}", exit.wall());
}

async fn vm_scratch_disk_and_owner_uid_reach_the_guest() {
    let mut f = fixture("id -u; id -g; echo data > /scratch/f && cat /scratch/f; pwd");
    f.spec.owner = Some(wnodes_proto::v1::JobOwner {
        user: "alice".into(),
        uid: 1000,
        gid: 1001,
    });
    // What the scratch service would hand over: a raw ext4 file.
    let disk = f.vm.dir().with_file_name("scratch.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mkfs.success());
    let scratch = ScratchReady {
        path: disk.display().to_string(),
        format: "raw".into(),
        ..Default::default()
    };
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), None, Some(&storage));
    qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None, 0)
        .await
        .unwrap();
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 0, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "1000\n1001\ndata\n/scratch\n");
    assert!(exit.guest.phases.contains(&"scratch".to_string()));
}

async fn vm_launch_failure_reports_why() {
    let mut f = fixture("true");
    f.image.path = "/nonexistent/rootfs.ext4".into();
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), None, Some(&storage));
    let err = qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None, 0)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/rootfs.ext4"),
        "{err}"
    );
    let err = qemu::launch(Path::new("/nonexistent/qemu"), &inputs, None, 0)
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("cannot run /nonexistent/qemu"),
        "{err}"
    );
    assert!(f.vm.read_running().unwrap().is_none());
}

async fn vm_user_mode_storage_is_mounted_from_the_host() {
    let f = fixture("cat hello.txt; echo out > written; pwd");
    // The storage gateway's part, as in guest/README.md: SFTP over plain TCP on 127.0.0.1.
    let export = tempfile::tempdir().unwrap();
    std::fs::write(export.path().join("hello.txt"), "from host\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _gateway = tokio::process::Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg("EXEC:/usr/lib/openssh/sftp-server")
        .kill_on_drop(true)
        .spawn()
        .expect("socat");
    wnodes_testkit::wait::wait_until(Duration::from_secs(10), "socat listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await
    .unwrap();
    let scratch = ScratchReady::default();
    let storage = StorageReady {
        address: "127.0.0.1".into(),
        port: u32::from(port),
        remote_path: export.path().display().to_string(),
        guest_path: "/shared".into(),
        ..Default::default()
    };
    let inputs = f.inputs(Some(&scratch), Some(&f.network), Some(&storage));
    qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None, 0)
        .await
        .unwrap();
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 0, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "from host\n/shared\n");
    assert_eq!(
        std::fs::read_to_string(export.path().join("written")).unwrap(),
        "out\n"
    );
}

/// The cgroup layout this host offers; these machines (tmpfs `/sys/fs/cgroup` with v1
/// hierarchies, root) must get cgroup v1.
fn cgroup_host() -> CgroupHost {
    let root = Path::new(CGROUP_ROOT);
    let host = CgroupHost::detect(root).expect("a usable cgroup v1 or v2 layout on this host");
    if !usage::cgroup2_usable(root) {
        assert!(matches!(host, CgroupHost::V1 { .. }), "{host:?}");
    }
    host
}

async fn wait_gone(vm: &VmDir, pid: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while vm.qemu_alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "VM did not stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn vm_cgroup_the_qemu_daemon_inherits_the_foreground_group() {
    let f = fixture("sleep 600");
    let host = cgroup_host();
    f.vm.create().unwrap();
    let args = qemu::build_args(&f.inputs(None, None, None)).unwrap();
    let spawned = qemu::spawn_detached(
        Path::new("qemu-system-x86_64"),
        &f.vm,
        f.spec.payload.as_ref().unwrap(),
        &args,
        Some(&host),
        None,
    )
    .await
    .expect("qemu starts");
    assert_eq!(spawned.usage, host.source_for(f.vm.vm_id()));
    // Moved in as the foreground process, before daemonizing: the daemon (pid file) is in
    // every group without having been moved there itself.
    assert!(spawned.daemon_inherited, "{spawned:?}");
    for dir in usage::group_dirs(&spawned.usage) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(usage::parse_pids(&procs), vec![spawned.pid], "{dir:?}");
        if matches!(host, CgroupHost::V1 { .. }) {
            let tasks = std::fs::read_to_string(dir.join("tasks")).unwrap();
            assert!(usage::parse_pids(&tasks).contains(&spawned.pid), "{dir:?}");
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(spawned.pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_gone(&f.vm, spawned.pid).await;
    usage::remove_groups(f.vm.vm_id(), &spawned.usage);
    for dir in usage::group_dirs(&spawned.usage) {
        assert!(!dir.exists(), "{dir:?} removed");
    }
}

async fn vm_cgroup_cpu_time_after_the_last_watch_is_counted() {
    // ~2 s of guest CPU after the watcher is gone.
    let f = fixture(
        "end=$(( $(date +%s) + 3 )); while [ $(date +%s) -lt $end ]; do :; done; echo spun; exit 0",
    );
    let host = cgroup_host();
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), None, Some(&storage));
    let running = qemu::launch(
        Path::new("qemu-system-x86_64"),
        &inputs,
        Some(&host),
        1 << 30,
    )
    .await
    .expect("qemu starts");
    // running.json records the source and its paths.
    assert_eq!(running.usage, host.source_for(f.vm.vm_id()));
    assert_eq!(f.vm.read_running().unwrap().unwrap().usage, running.usage);
    assert!(usage::contains(&running.usage, running.pid));
    // A watcher looks for a moment, then "the launcher dies" while the guest spins.
    let _ = tokio::time::timeout(Duration::from_millis(300), watch::watch(&f.vm, &opts())).await;
    wait_gone(&f.vm, running.pid).await;
    let dirs: Vec<std::path::PathBuf> = usage::group_dirs(&running.usage)
        .iter()
        .map(|d| d.to_path_buf())
        .collect();
    assert!(dirs.iter().all(|d| d.exists()), "the group outlives qemu");
    // Finished from the state directory, as a restarted launcher does.
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 0, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "spun\n");
    assert!(!exit.observed_exit);
    eprintln!("usage from the cgroup: {:?}", exit.usage);
    assert!(exit.usage.cpu_seconds >= 1.0, "{:?}", exit.usage);
    assert!(exit.usage.peak_memory_bytes >= 10 << 20, "{:?}", exit.usage);
    // Nothing came from /proc samples.
    assert_eq!(usage::read_usage_file(&f.vm), usage::UsageSample::default());
    for d in &dirs {
        assert!(!d.exists(), "{d:?} removed after the final read");
    }
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(current_thread vm_payload_exit_code_output_and_usage_are_read_back needs [Qemu, TestGuest]),
        host_test!(current_thread vm_a_guest_power_off_is_seen_through_the_qmp_event_monitor needs [Qemu, TestGuest]),
        host_test!(current_thread vm_reattach_from_state_dir_after_the_watcher_is_dropped needs [Qemu, TestGuest]),
        host_test!(current_thread vm_finished_while_nobody_watched_is_finished_from_the_state_dir needs [Qemu, TestGuest]),
        host_test!(current_thread vm_is_stopped_through_qmp needs [Qemu, TestGuest]),
        host_test!(current_thread vm_walltime_is_enforced needs [Qemu, TestGuest]),
        host_test!(current_thread vm_scratch_disk_and_owner_uid_reach_the_guest needs [Qemu, TestGuest]),
        host_test!(current_thread vm_launch_failure_reports_why needs [Qemu, TestGuest]),
        host_test!(current_thread vm_user_mode_storage_is_mounted_from_the_host needs [Qemu, TestGuest, Socat, SftpServer]),
        host_test!(current_thread vm_cgroup_the_qemu_daemon_inherits_the_foreground_group needs [Qemu, TestGuest, Cgroups]),
        host_test!(current_thread vm_cgroup_cpu_time_after_the_last_watch_is_counted needs [Qemu, TestGuest, Cgroups]),
    ])
}
