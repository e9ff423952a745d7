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
use wnodes_testkit::{host, host_test};

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
    ])
}
