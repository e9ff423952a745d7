//! Boots real VMs (qemu, TCG, the test guest from `guest/build.sh`, user-mode networking; no
//! NATS), each qemu confined as in production (its own uid, `-sandbox`). Every VM-booting
//! test is named `vm_*` so a runner can group them (e.g. a nextest test group with `max-threads = 1` on `test(/^vm_/)`); they also take a host-wide file lock,
//! so they boot one VM at a time even without that. Host tests (`wnodes_testkit::host`): they
//! need qemu and the test guest (and some more, listed in `main`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use wnodes_testkit::{host::guest_dir, vm::vm_lock};

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use wnodes_launcher::{
    config::Accel,
    confine::ConfinementConfig,
    qemu::{self, LaunchInputs},
    qmp,
    usage::{self, CGROUP_ROOT, CgroupHost},
    vm_dir::{RunningRecord, UsageSource, VmDir},
    watch::{self, STOP_GUEST_POWEROFF, WatchOptions},
};
use wnodes_proto::v1::{
    HostUser, ImageReady, JobPayload, NetworkMode, NetworkReady, ScratchReady, StorageReady,
    VmSpec, job_payload,
};
use wnodes_testkit::{
    host::{self, Precondition},
    host_test,
};

struct Fixture {
    _lock: nix::fcntl::Flock<std::fs::File>,
    _dir: tempfile::TempDir,
    vm: VmDir,
    spec: VmSpec,
    image: ImageReady,
    network: NetworkReady,
    confinement: ConfinementConfig,
}

/// The host user the fixture's qemu runs as (one VM at a time: the tests hold the VM lock).
const VM_UID: u32 = 3_999_000_001;

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
    // qemu runs as VM_UID: it must be able to enter the state directory's parents.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
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
        vm_user: Some(HostUser {
            uid: VM_UID,
            gid: VM_UID,
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
        confinement: ConfinementConfig::default(),
    }
}

impl Fixture {
    /// Launches qemu (from `PATH`) on `inputs`, without a cgroup, confined as configured.
    async fn launch(&self, inputs: &LaunchInputs<'_>) -> Result<RunningRecord, qemu::QemuError> {
        qemu::launch(
            Path::new("qemu-system-x86_64"),
            inputs,
            None,
            0,
            &self.confinement,
        )
        .await
    }

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
            sandbox: self.confinement.sandbox,
            tuning: None,
        }
    }
}

async fn boot(f: &Fixture) -> RunningRecord {
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), Some(&f.network), Some(&storage));
    let running = f.launch(&inputs).await.expect("qemu starts");
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

/// What the scratch service would hand over: a raw ext4 file of `mib` MiB next to the VM's
/// directory.
fn ext4_scratch(f: &Fixture, mib: u64) -> ScratchReady {
    let disk = f.vm.dir().with_file_name("scratch.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mkfs.success());
    ScratchReady {
        path: disk.display().to_string(),
        format: "raw".into(),
        ..Default::default()
    }
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
    let scratch = ext4_scratch(&f, 64);
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), None, Some(&storage));
    f.launch(&inputs).await.unwrap();
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
    let err = f.launch(&inputs).await.unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/rootfs.ext4"),
        "{err}"
    );
    // Unconfined, qemu itself refuses the missing image, and says why (from its stderr).
    let unconfined = ConfinementConfig {
        vm_users: false,
        ..ConfinementConfig::default()
    };
    let err = qemu::launch(
        Path::new("qemu-system-x86_64"),
        &inputs,
        None,
        0,
        &unconfined,
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("qemu failed to start") && text.contains("/nonexistent/rootfs.ext4"),
        "{text}"
    );
    // A missing qemu: the wrapper cannot exec it, and says so.
    f.image.path = guest_dir().join("rootfs.ext4").display().to_string();
    let inputs = f.inputs(Some(&scratch), None, Some(&storage));
    let err = qemu::launch(
        Path::new("/nonexistent/qemu"),
        &inputs,
        None,
        0,
        &f.confinement,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
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
    f.launch(&inputs).await.unwrap();
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 0, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "from host\n/shared\n");
    assert_eq!(
        std::fs::read_to_string(export.path().join("written")).unwrap(),
        "out\n"
    );
}

async fn vm_output_past_the_limit_stops_the_vm_and_is_cut_with_a_marker() {
    let f = fixture("head -c 1500000 /dev/zero | tr '\\0' x; echo; sleep 600");
    let running = boot(&f).await;
    let limit = 512 * 1024;
    let opts = WatchOptions {
        poll: Duration::from_millis(100),
        powerdown_grace: Duration::from_secs(1),
        output_limit_bytes: limit,
        ..Default::default()
    };
    let exit = tokio::time::timeout(Duration::from_secs(120), watch::watch(&f.vm, &opts))
        .await
        .expect("stopped in time")
        .expect("watch");
    assert!(!f.vm.qemu_alive(running.pid));
    assert_eq!(
        exit.stop_reason,
        watch::STOP_OUTPUT_LIMIT,
        "console:\n{}",
        console(&f.vm)
    );
    let kept = std::fs::metadata(f.vm.output_log()).unwrap().len();
    assert!(kept <= limit + 256, "{kept} bytes kept");
    assert!(
        exit.output_tail
            .trim_end()
            .ends_with("-byte limit were dropped]"),
        "{:?}",
        &exit.output_tail[exit.output_tail.len().saturating_sub(200)..]
    );
}

/// `/proc/<pid>/status` field `name` (e.g. `"Uid:"`), split into words.
fn status_field(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

async fn vm_qemu_runs_as_its_own_user_sandboxed_and_cannot_spawn() {
    let f = fixture("sleep 600");
    let running = boot(&f).await;
    let pid = running.pid;
    let uid = VM_UID.to_string();
    assert_eq!(status_field(pid, "Uid:"), vec![uid.clone(); 4]);
    assert_eq!(status_field(pid, "Gid:"), vec![uid.clone(); 4]);
    assert!(
        status_field(pid, "Groups:").is_empty(),
        "no supplementary groups"
    );
    assert_eq!(status_field(pid, "Seccomp:"), ["2"], "a seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs:"), ["1"]);
    // Detached: a session of its own (field 6 of /proc/<pid>/stat).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        after_comm[3],
        pid.to_string(),
        "session id = qemu's pid: {stat}"
    );
    // The files: the launcher's records out of qemu's reach, qemu's own in qemu/.
    assert_eq!(owner_and_mode(f.vm.dir()), (0, VM_UID, 0o750));
    assert_eq!(owner_and_mode(&f.vm.qemu_dir()), (VM_UID, 0, 0o2770));
    assert_eq!(owner_and_mode(&f.vm.payload()), (0, VM_UID, 0o640));
    assert_eq!(owner_and_mode(&f.vm.running_json()).0, 0);
    assert_eq!(
        owner_and_mode(&f.vm.running_json()).2 & 0o077,
        0,
        "running.json is root's alone"
    );
    assert_eq!(owner_and_mode(&f.vm.console_log()).0, VM_UID);
    // A QMP command that makes qemu fork a helper fails, and no process ran.
    let marker = f.vm.qemu_dir().join("spawned");
    let mut q = qmp::Qmp::connect(&f.vm.qmp_socket()).await.unwrap();
    let uri = format!("exec:touch {}", marker.display());
    let refused = q
        .execute_with("migrate", Some(serde_json::json!({ "uri": uri })))
        .await;
    let status = q.execute("query-migrate").await.unwrap();
    eprintln!("migrate: {refused:?}; query-migrate: {status}");
    let err = refused.expect_err("migrate to exec: must fail");
    assert!(err.to_string().contains("fork"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!marker.exists(), "the helper process never ran");
    assert!(f.vm.qemu_alive(pid), "qemu survives the refused fork");
    let _ = q.execute("quit").await;
    drop(q);
    wait_gone(&f.vm, pid).await;
    // Given back to root, so that the next VM with this uid finds nothing of this one.
    wnodes_launcher::confine::reclaim(&f.vm, None).unwrap();
    assert_eq!(owner_and_mode(f.vm.dir()), (0, 0, 0o700));
    assert_eq!(owner_and_mode(&f.vm.qemu_dir()), (0, 0, 0o700));
    assert_eq!(owner_and_mode(&f.vm.console_log()).0, 0);
    assert_eq!(owner_and_mode(&f.vm.payload()).1, 0);
}

async fn vm_a_state_directory_the_vm_user_cannot_enter_is_named() {
    let f = fixture("true");
    let parent = f.vm.dir().parent().unwrap().to_path_buf();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = f.inputs(Some(&scratch), None, Some(&storage));
    let err = f.launch(&inputs).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cannot enter") && text.contains(&parent.display().to_string()),
        "{text}"
    );
    assert!(text.contains(&VM_UID.to_string()), "{text}");
    assert!(f.vm.read_running().unwrap().is_none(), "qemu never started");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711)).unwrap();
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
        qemu::Wrapper {
            config: &f.confinement,
            user: f.spec.vm_user.as_ref(),
            kvm_gid: None,
        },
    )
    .await
    .expect("qemu starts");
    assert_eq!(spawned.usage, host.source_for(f.vm.vm_id()));
    // The wrapper joined the groups before it execed qemu: qemu is in every group without
    // having been moved there itself.
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
        &f.confinement,
    )
    .await
    .expect("qemu starts");
    // running.json records the source and its paths.
    assert_eq!(running.usage, host.source_for(f.vm.vm_id()));
    // The spec's one core is enforced as CPU bandwidth (this host: a v1 `cpu` hierarchy).
    let quota = match &running.usage {
        UsageSource::Cgroup { path } => std::fs::read_to_string(path.join("cpu.max")).unwrap(),
        UsageSource::CgroupV1 { cpu: Some(cpu), .. } => {
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap()
        }
        other => panic!("no CPU controller to enforce the cores in: {other:?}"),
    };
    assert!(
        quota.trim() == "100000" || quota.trim() == "100000 100000",
        "{quota}"
    );
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

// ---- Tunings ([launcher.tuning], docs/tuning.md), checked in the running qemu. ----

/// What the tuning tests need beyond a VM: the host facts each one looks at.
const PIN_NEEDS: &[Precondition] = &[
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::Root,
    Precondition::Setpriv,
    Precondition::Other("taskset and two CPUs", pin_host),
];
const HUGEPAGE_NEEDS: &[Precondition] = &[
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::Root,
    Precondition::Setpriv,
    Precondition::Other(
        "2 MiB huge pages (/proc/sys/vm/nr_hugepages)",
        hugepage_host,
    ),
];
const KSM_NEEDS: &[Precondition] = &[
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::Root,
    Precondition::Setpriv,
    Precondition::Other("KSM (/sys/kernel/mm/ksm)", ksm_host),
];

fn pin_host() -> Result<(), String> {
    if !Path::new(TASKSET).exists() {
        return Err(format!("{TASKSET} (util-linux)"));
    }
    let cpus = wnodes_launcher::cores::own_cpus();
    if cpus.len() < 2 {
        return Err(format!(
            "two CPUs to pin to (this process may use {cpus:?})"
        ));
    }
    Ok(())
}

fn hugepage_host() -> Result<(), String> {
    for p in [NR_HUGEPAGES, "/sys/kernel/mm/hugepages/hugepages-2048kB"] {
        if !Path::new(p).exists() {
            return Err(format!("{p} (a kernel with hugetlbfs and 2 MiB pages)"));
        }
    }
    Ok(())
}

fn ksm_host() -> Result<(), String> {
    if Path::new(KSM).join("run").exists() && Path::new("/proc/self/ksm_stat").exists() {
        Ok(())
    } else {
        Err(format!(
            "{KSM}/run and /proc/<pid>/ksm_stat (a kernel with KSM, 6.1 or later)"
        ))
    }
}

const TASKSET: &str = "/usr/bin/taskset";
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const KSM: &str = "/sys/kernel/mm/ksm";

/// Kernel settings a test changed, written back when it ends (also when it fails).
struct Restore(Vec<(String, String)>);

impl Restore {
    fn new() -> Self {
        Self(Vec::new())
    }

    /// Writes `value` to `path`, remembering what was there.
    fn set(&mut self, path: &str, value: &str) {
        let old = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
        if !self.0.iter().any(|(p, _)| p == path) {
            self.0.push((path.to_owned(), old.trim().to_owned()));
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (path, old) in self.0.iter().rev() {
            if let Err(e) = std::fs::write(path, old) {
                eprintln!("could not restore {path} to {old}: {e}");
            }
        }
    }
}

/// A second VM in the fixture's VM directory, with its own id and host user.
fn another_vm(f: &Fixture, id: &str, uid: u32) -> (VmDir, VmSpec) {
    let vm = VmDir::new(f.vm.dir().parent().unwrap(), id).unwrap();
    let spec = VmSpec {
        vm_id: id.into(),
        vm_user: Some(HostUser { uid, gid: uid }),
        ..f.spec.clone()
    };
    (vm, spec)
}

/// One QMP command on a running VM.
async fn qmp_query(
    vm: &VmDir,
    command: &str,
    args: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut q = qmp::Qmp::connect(&vm.qmp_socket()).await.unwrap();
    q.execute_with(command, args).await.unwrap()
}

/// Quits a VM's qemu through QMP and waits until it is gone.
async fn quit(vm: &VmDir, pid: u32) {
    if let Ok(mut q) = qmp::Qmp::connect(&vm.qmp_socket()).await {
        let _ = q.execute("quit").await;
    }
    wait_gone(vm, pid).await;
}

/// `taskset -p TID`'s mask ("pid 42's current affinity mask: 2"), as a number.
fn taskset_mask(tid: i64) -> u64 {
    let out = std::process::Command::new(TASKSET)
        .args(["-p", &tid.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "taskset -p {tid}: {text}");
    let mask = text
        .trim()
        .rsplit_once(": ")
        .unwrap_or_else(|| panic!("taskset said {text:?}"))
        .1;
    u64::from_str_radix(mask, 16).unwrap_or_else(|_| panic!("taskset said {text:?}"))
}

/// `HugePages_Free` in `/proc/meminfo`.
fn hugepages_free() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no HugePages_Free in {text}"))
}

/// Waits (bounded) until `HugePages_Free` is back at `free`: the pages of a qemu that exited
/// are freed as its process goes.
async fn given_back(free: u64) {
    wnodes_testkit::wait::wait_until(Duration::from_secs(20), "the huge pages back", || async {
        (hugepages_free() == free).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: HugePages_Free {}", hugepages_free()));
}

fn read_number(path: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{path}: {text:?}"))
}

/// A line `name value` of `/proc/<pid>/ksm_stat`.
fn ksm_stat(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim_start_matches(':').trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

async fn vm_vcpus_are_pinned_from_outside_qemu() {
    use wnodes_launcher::{
        cores::{self, CoreUse},
        tuning::{Tuning, VmTuning},
    };
    let mut f = fixture("sleep 600");
    f.spec.cores = 2;
    let host = cores::own_cpus();
    let (first, second) = (host[0], host[1]);
    // The allocator's choice with another VO's VM on the first core: the second core for
    // vCPU 0, then the first (what the launcher stores in launcher_vms.host_cores).
    let live = [CoreUse {
        vo: "cms".into(),
        cores: vec![first],
    }];
    let host_cores = cores::allocate(&host[..2], &live, "atlas", 2, true);
    assert_eq!(host_cores, vec![second, first]);
    let tuning = VmTuning {
        tuning: Tuning {
            pin_vcpus: true,
            ..Tuning::default()
        },
        host_cores: host_cores.clone(),
        hugepages_path: None,
    };
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let mut inputs = f.inputs(Some(&scratch), None, Some(&storage));
    inputs.tuning = Some(&tuning);
    let running = f.launch(&inputs).await.expect("qemu starts and is pinned");
    // Under -sandbox ...,resourcecontrol=deny: qemu could not have done this itself.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", running.pid)).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("resourcecontrol=deny"),
        "qemu runs sandboxed"
    );
    let cpus = qmp_query(&f.vm, "query-cpus-fast", None).await;
    eprintln!("query-cpus-fast: {cpus}");
    let threads = cpus.as_array().unwrap();
    assert_eq!(threads.len(), 2);
    let tids: Vec<i64> = threads
        .iter()
        .map(|c| c["thread-id"].as_i64().unwrap())
        .collect();
    assert_ne!(tids[0], tids[1], "a thread per vCPU (multi-threaded TCG)");
    for c in threads {
        let index = c["cpu-index"].as_u64().unwrap() as usize;
        let tid = c["thread-id"].as_i64().unwrap();
        let mask = taskset_mask(tid);
        eprintln!("vCPU {index}: thread {tid}, taskset mask {mask:x}");
        assert_eq!(mask, 1 << host_cores[index], "vCPU {index} (thread {tid})");
        let comm =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", running.pid)).unwrap();
        assert_eq!(
            comm.trim(),
            format!("CPU {index}/TCG"),
            "debug-threads names it"
        );
    }
    // Only the vCPU threads: qemu's main thread keeps the CPUs it started with.
    let all: u64 = host.iter().map(|c| 1_u64 << c).sum();
    assert_eq!(taskset_mask(i64::from(running.pid)), all);
    quit(&f.vm, running.pid).await;
}

async fn vm_guest_ram_is_on_huge_pages() {
    use wnodes_launcher::tuning::{Tuning, VmTuning};
    let mut f = fixture("echo on huge pages; exit 0");
    f.spec.memory_bytes = 128 << 20;
    let pages = 64; // 128 MiB in 2 MiB pages
    let mut restore = Restore::new();
    let before = read_number(NR_HUGEPAGES);
    restore.set(NR_HUGEPAGES, &(before + pages + 8).to_string());
    let free = hugepages_free();
    assert!(
        free >= pages,
        "the kernel reserved only {free} free huge pages"
    );
    let mut tuning = VmTuning {
        tuning: Tuning {
            hugepages: true,
            ..Tuning::default()
        },
        ..VmTuning::default()
    };
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    // An anonymous memfd on the kernel's own hugetlbfs.
    let mut inputs = f.inputs(Some(&scratch), None, Some(&storage));
    inputs.tuning = Some(&tuning);
    let running = f.launch(&inputs).await.expect("qemu starts on huge pages");
    let during = hugepages_free();
    eprintln!("HugePages_Free: {free} before, {during} with the VM");
    assert!(free - during >= pages, "{free} -> {during}");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", running.pid)).unwrap();
    let ram = smaps
        .split("\n")
        .skip_while(|l| !l.contains("memfd:memory-backend-memfd"))
        .take_while(|l| !l.starts_with("VmFlags"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(ram.contains("KernelPageSize:     2048 kB"), "{ram}");
    // The guest runs on them to the end.
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 0, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "on huge pages\n");
    given_back(free).await;

    // A file on a hugetlbfs mount the VM's user owns.
    let mount = f.vm.dir().with_file_name("hugepages");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "hugetlbfs", "-o"])
        .arg(format!("uid={VM_UID},gid={VM_UID},mode=0700,pagesize=2M"))
        .arg("wnodes-test")
        .arg(&mount)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t hugetlbfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    tuning.hugepages_path = Some(mount.clone());
    let mut inputs = f.inputs(Some(&scratch), None, Some(&storage));
    inputs.tuning = Some(&tuning);
    std::fs::remove_file(f.vm.running_json()).unwrap();
    let running = f.launch(&inputs).await.expect("qemu starts on the mount");
    let during = hugepages_free();
    eprintln!(
        "HugePages_Free on {}: {free} before, {during} with the VM",
        mount.display()
    );
    assert!(free - during >= pages, "{free} -> {during}");
    quit(&f.vm, running.pid).await;
    given_back(free).await;
    drop(restore);
    assert_eq!(read_number(NR_HUGEPAGES), before, "nr_hugepages restored");
}

async fn vm_identical_guests_share_pages_through_ksm() {
    use wnodes_launcher::tuning::{Tuning, VmTuning};
    let mut f = fixture("sleep 600");
    f.spec.memory_bytes = 128 << 20;
    let mut restore = Restore::new();
    restore.set(&format!("{KSM}/pages_to_scan"), "5000");
    restore.set(&format!("{KSM}/sleep_millisecs"), "10");
    restore.set(&format!("{KSM}/run"), "1");
    let merge = |on: bool| VmTuning {
        tuning: Tuning {
            mem_merge: Some(on),
            ..Tuning::default()
        },
        ..VmTuning::default()
    };
    let (on, off) = (merge(true), merge(false));
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let mut inputs = f.inputs(Some(&scratch), None, Some(&storage));
    inputs.tuning = Some(&on);
    let a = f.launch(&inputs).await.expect("VM a starts");
    let (vm_b, spec_b) = another_vm(&f, "vm-00000000a0b2", VM_UID + 1);
    let (vm_c, spec_c) = another_vm(&f, "vm-00000000a0b3", VM_UID + 2);
    let b = qemu::launch(
        Path::new("qemu-system-x86_64"),
        &LaunchInputs {
            vm: &vm_b,
            spec: &spec_b,
            ..inputs
        },
        None,
        0,
        &f.confinement,
    )
    .await
    .expect("VM b starts");
    // The control: the same guest with mem-merge=off.
    let c = qemu::launch(
        Path::new("qemu-system-x86_64"),
        &LaunchInputs {
            vm: &vm_c,
            spec: &spec_c,
            tuning: Some(&off),
            ..inputs
        },
        None,
        0,
        &f.confinement,
    )
    .await
    .expect("VM c starts");
    assert_eq!(ksm_stat(a.pid, "ksm_mergeable"), "yes");
    assert_eq!(ksm_stat(b.pid, "ksm_mergeable"), "yes");
    assert_eq!(ksm_stat(c.pid, "ksm_mergeable"), "no", "mem-merge=off");
    let sharing = format!("{KSM}/pages_sharing");
    let started = std::time::Instant::now();
    let (pid_a, pid_b) = (a.pid, b.pid);
    let merged = wnodes_testkit::wait::wait_until(
        Duration::from_secs(90),
        "KSM merging the two guests' pages",
        move || {
            let sharing = sharing.clone();
            async move {
                let a_pages: u64 = ksm_stat(pid_a, "ksm_merging_pages").parse().unwrap();
                let b_pages: u64 = ksm_stat(pid_b, "ksm_merging_pages").parse().unwrap();
                let total = read_number(&sharing);
                (total > 0 && a_pages > 0 && b_pages > 0).then_some((total, a_pages, b_pages))
            }
        },
    )
    .await
    .unwrap();
    eprintln!(
        "after {:?}: pages_sharing {}, VM a {} merged pages, VM b {}",
        started.elapsed(),
        merged.0,
        merged.1,
        merged.2
    );
    assert_eq!(ksm_stat(c.pid, "ksm_merging_pages"), "0", "mem-merge=off");
    for (vm, r) in [(&f.vm, &a), (&vm_b, &b), (&vm_c, &c)] {
        quit(vm, r.pid).await;
    }
}

async fn vm_disk_cache_aio_and_iothread_are_what_qmp_reports() {
    use wnodes_launcher::tuning::{DiskAio, DiskCache, Tuning, VmTuning};
    // The guest mounts the scratch disk and writes to it: I/O on both disks.
    let f = fixture("echo data > /scratch/f && sync && echo wrote; sleep 600");
    let scratch = ext4_scratch(&f, 32);
    let storage = StorageReady::default();
    let image = f.image.path.clone();
    for (cache, aio, iothread) in [
        (DiskCache::None, DiskAio::Native, true),
        (DiskCache::Writethrough, DiskAio::IoUring, false),
    ] {
        let tuning = VmTuning {
            tuning: Tuning {
                disk_cache: Some(cache),
                disk_aio: Some(aio),
                iothread,
                ..Tuning::default()
            },
            ..VmTuning::default()
        };
        let mut inputs = f.inputs(Some(&scratch), None, Some(&storage));
        inputs.tuning = Some(&tuning);
        let _ = std::fs::remove_file(f.vm.running_json());
        let running = f.launch(&inputs).await.expect("qemu starts");
        // The guest has read both disks.
        let output = f.vm.output_log();
        let vm = VmDir::new(f.vm.dir().parent().unwrap(), f.vm.vm_id()).unwrap();
        let pid = running.pid;
        let wrote = wnodes_testkit::wait::wait_until(
            Duration::from_secs(120),
            "the payload's write",
            || {
                let output = output.clone();
                let alive = vm.qemu_alive(pid);
                async move {
                    let text = std::fs::read_to_string(output).unwrap_or_default();
                    if text.contains("wrote") {
                        Some(true)
                    } else if alive {
                        None
                    } else {
                        Some(false)
                    }
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console(&f.vm)));
        assert!(wrote, "the guest stopped; console:\n{}", console(&f.vm));
        let blocks = qmp_query(&f.vm, "query-block", None).await;
        eprintln!("{cache:?}/{aio:?}: query-block: {blocks}");
        // The scratch disk (no -snapshot overlay): its cache flags as the mode sets them.
        let scratch_dev = blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["inserted"]["file"].as_str() == Some(scratch.path.as_str()))
            .unwrap_or_else(|| panic!("no {} in {blocks}", scratch.path));
        let c = &scratch_dev["inserted"]["cache"];
        let (writeback, direct, no_flush) = cache.qmp_flags();
        assert_eq!(c["writeback"], writeback, "{c}");
        assert_eq!(c["direct"], direct, "{c}");
        assert_eq!(c["no-flush"], no_flush, "{c}");
        // The image under -snapshot's overlay: its own node has the mode's O_DIRECT.
        let nodes = qmp_query(
            &f.vm,
            "query-named-block-nodes",
            Some(serde_json::json!({ "flat": true })),
        )
        .await;
        let base = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["drv"] == "raw" && n["file"].as_str() == Some(image.as_str()))
            .unwrap_or_else(|| panic!("no raw node for {image} in {nodes}"));
        assert_eq!(base["cache"]["direct"], direct, "{base}");
        // QMP does not report the AIO mode (qemu 10): what qemu opened for it does.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", running.pid)).unwrap();
        let linux_aio = maps.contains("/[aio]");
        let io_uring = std::fs::read_dir(format!("/proc/{}/fd", running.pid))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|l| l.to_string_lossy().contains("[io_uring]"));
        eprintln!("{aio:?}: Linux AIO ring mapped: {linux_aio}; io_uring fd: {io_uring}");
        assert_eq!(linux_aio, aio == DiskAio::Native);
        assert_eq!(io_uring, aio == DiskAio::IoUring);
        // The I/O thread, and the disks in it.
        let threads = qmp_query(&f.vm, "query-iothreads", None).await;
        let ids: Vec<&str> = threads
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["id"].as_str())
            .collect();
        if iothread {
            assert_eq!(ids, ["io0"], "{threads}");
            for dev in ["vda", "vdb"] {
                let it = qmp_query(
                    &f.vm,
                    "qom-get",
                    Some(serde_json::json!({ "path": format!("/machine/peripheral/{dev}"), "property": "iothread" })),
                )
                .await;
                assert!(
                    it.as_str().is_some_and(|p| p.ends_with("io0")),
                    "{dev}: {it}"
                );
            }
        } else {
            assert!(ids.is_empty(), "{threads}");
        }
        quit(&f.vm, running.pid).await;
    }
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(current_thread vm_payload_exit_code_output_and_usage_are_read_back needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_a_guest_power_off_is_seen_through_the_qmp_event_monitor needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_reattach_from_state_dir_after_the_watcher_is_dropped needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_finished_while_nobody_watched_is_finished_from_the_state_dir needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_is_stopped_through_qmp needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_walltime_is_enforced needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_scratch_disk_and_owner_uid_reach_the_guest needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_output_past_the_limit_stops_the_vm_and_is_cut_with_a_marker needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_launch_failure_reports_why needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_qemu_runs_as_its_own_user_sandboxed_and_cannot_spawn needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_a_state_directory_the_vm_user_cannot_enter_is_named needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(current_thread vm_user_mode_storage_is_mounted_from_the_host needs [Qemu, TestGuest, Root, Setpriv, Socat, SftpServer]),
        host_test!(current_thread vm_cgroup_the_qemu_daemon_inherits_the_foreground_group needs [Qemu, TestGuest, Root, Setpriv, Cgroups]),
        host_test!(current_thread vm_cgroup_cpu_time_after_the_last_watch_is_counted needs [Qemu, TestGuest, Root, Setpriv, Cgroups]),
        host_test!(current_thread vm_vcpus_are_pinned_from_outside_qemu needs PIN_NEEDS),
        host_test!(current_thread vm_guest_ram_is_on_huge_pages needs HUGEPAGE_NEEDS),
        host_test!(current_thread vm_identical_guests_share_pages_through_ksm needs KSM_NEEDS),
        host_test!(current_thread vm_disk_cache_aio_and_iothread_are_what_qmp_reports needs [Qemu, TestGuest, Root, Setpriv]),
    ])
}
