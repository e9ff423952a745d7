//! Boots real VMs (qemu, TCG, the test guest from `guest/build.sh`, user-mode networking; no
//! NATS). Every VM-booting test is named `vm_*` so a runner can group them (e.g. a nextest
//! test group with `max-threads = 1` on `test(/^vm_/)`); they also take a host-wide file lock,
//! so they boot one VM at a time even without that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::Path, time::Duration};

use wnodes_launcher::{
    config::Accel,
    qemu::{self, LaunchInputs},
    qmp,
    vmstate::{RunningRecord, UsageSource, VmDir},
    watch::{self, STOP_GUEST_POWEROFF, WatchOptions},
};
use wnodes_proto::v1::{
    ImageReady, JobPayload, NetworkMode, NetworkReady, ScratchReady, StorageReady, VmSpec,
    job_payload,
};

struct Fixture {
    _lock: nix::fcntl::Flock<std::fs::File>,
    _dir: tempfile::TempDir,
    vm: VmDir,
    spec: VmSpec,
    image: ImageReady,
    network: NetworkReady,
}

impl Drop for Fixture {
    /// A failed test must not leave its VM running.
    fn drop(&mut self) {
        common::kill_vms_under(self.vm.dir().parent().unwrap_or(Path::new("/nonexistent")));
    }
}

fn fixture(script: &str) -> Fixture {
    let lock = common::vm_lock();
    let guest = common::guest_dir();
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

async fn boot(f: &Fixture) -> RunningRecord {
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = LaunchInputs {
        accel: Accel::Tcg,
        vm: &f.vm,
        spec: &f.spec,
        image: &f.image,
        scratch: Some(&scratch),
        network: Some(&f.network),
        storage: Some(&storage),
    };
    let running = qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None)
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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
    let inputs = LaunchInputs {
        accel: Accel::Tcg,
        vm: &f.vm,
        spec: &f.spec,
        image: &f.image,
        scratch: Some(&scratch),
        network: None,
        storage: Some(&storage),
    };
    qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None)
        .await
        .unwrap();
    let exit = watch_to_end(&f.vm).await;
    assert_eq!(exit.exit_code, 0, "console:\n{}", console(&f.vm));
    assert_eq!(exit.output_tail, "1000\n1001\ndata\n/scratch\n");
    assert!(exit.guest.phases.contains(&"scratch".to_string()));
}

#[tokio::test]
async fn vm_launch_failure_reports_why() {
    let mut f = fixture("true");
    f.image.path = "/nonexistent/rootfs.ext4".into();
    let scratch = ScratchReady::default();
    let storage = StorageReady::default();
    let inputs = LaunchInputs {
        accel: Accel::Tcg,
        vm: &f.vm,
        spec: &f.spec,
        image: &f.image,
        scratch: Some(&scratch),
        network: None,
        storage: Some(&storage),
    };
    let err = qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/rootfs.ext4"),
        "{err}"
    );
    let err = qemu::launch(Path::new("/nonexistent/qemu"), &inputs, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("cannot run /nonexistent/qemu"),
        "{err}"
    );
    assert!(f.vm.read_running().unwrap().is_none());
}

#[tokio::test]
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
    let inputs = LaunchInputs {
        accel: Accel::Tcg,
        vm: &f.vm,
        spec: &f.spec,
        image: &f.image,
        scratch: Some(&scratch),
        network: Some(&f.network),
        storage: Some(&storage),
    };
    qemu::launch(Path::new("qemu-system-x86_64"), &inputs, None)
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
