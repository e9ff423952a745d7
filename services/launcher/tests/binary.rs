//! The `wnodes-launcher` binary itself (runtime config from `WNODES_*`, NATS, SIGTERM): a
//! SIGTERM leaves the VM running (its qemu as the VM's own uid, sandboxed) and the next launcher
//! reports its end and gives the VM's files back to root. Boots a VM, so it is
//! named `vm_*` (see `tests/vm.rs`). A host test (`wnodes_testkit::host`): needs qemu and the
//! test guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use wnodes_testkit::{events::ready_bodies, events::vm_id_of, host::guest_dir, vm::vm_lock};

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use common::{HOST, ev, job_started, run, wait_event};
use wnodes_bus::proto::event::Body;
use wnodes_launcher::{confine::ConfinementConfig, vm_dir::VmDir};
use wnodes_testkit::{ServiceProcess, host, host_test, nats::NatsServer, process::ProcessBuilder};

/// The launcher binary configured by environment alone; both launchers of the test append
/// to one log.
fn launcher(nats: &wnodes_bus::NatsConfig, dir: &Path) -> ProcessBuilder {
    launcher_with_roots(nats, dir, &guest_dir(), &dir.join("volumes"))
}

/// The same, with the host policy's image and scratch roots.
fn launcher_with_roots(
    nats: &wnodes_bus::NatsConfig,
    dir: &Path,
    image_root: &Path,
    scratch_root: &Path,
) -> ProcessBuilder {
    let list = |p: &Path| format!("[\"{}\"]", p.display());
    ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-launcher"), dir)
        .env_clear()
        .runtime_env(nats, "INFN-T1", HOST, &dir.join("state"))
        .wnodes_env("LOG_LEVEL", "info")
        .wnodes_env("LAUNCHER__ACCEL", "auto")
        .wnodes_env("LAUNCHER__PREPARE_DEADLINE", "60s")
        .wnodes_env("LAUNCHER__POLICY__NETWORK_MODE", "user")
        .wnodes_env("LAUNCHER__POLICY__VO_IMAGES__ATLAS", "wnodes-test")
        .wnodes_env("LAUNCHER__IMAGE_ROOTS", list(image_root))
        .wnodes_env("LAUNCHER__SCRATCH_ROOTS", list(scratch_root))
        .stderr_to(&dir.join("launcher.log"))
}

/// SIGTERM; the launcher exits 0. Only the launcher: qemu detaches itself and must survive it.
async fn sigterm_and_wait(launcher: &mut ServiceProcess) {
    let status = launcher
        .terminate(Duration::from_secs(30))
        .await
        .expect("the launcher exits after SIGTERM");
    assert!(status.success(), "{status}: {}", launcher.stderr());
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::kill_vms_under(&self.0);
    }
}

async fn vm_binary_sigterm_leaves_the_vm_running_and_the_next_launcher_reports_it() {
    let _lock = vm_lock();
    let guest = guest_dir();
    let nats = NatsServer::start().await.unwrap();
    let bus = wnodes_testkit::bus::connect(&nats.admin(), "test@local")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Each VM's qemu runs as a uid of its own, which must be able to enter the state directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = dir.path().join("state");
    let _cleanup = Cleanup(state.join("vms"));
    let launcher = launcher(
        &nats
            .identity(&wnodes_bus::roles::LAUNCHER, HOST)
            .await
            .unwrap(),
        dir.path(),
    );

    let log = dir.path().join("launcher.log");
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut first = launcher.spawn().unwrap();
    let r = run("bin-1");
    bus.publish(&job_started(&r, "atlas", "sleep 3; echo bin; exit 6"))
        .await
        .unwrap();
    let requested = wait_event(&bus, "vm.requested", &r).await;
    let vm_id = vm_id_of(&requested);
    let Some(Body::VmRequested(req)) = requested.body else {
        panic!("{}", dump())
    };
    // The VM's own host user, from the default range.
    let user = req.spec.and_then(|s| s.vm_user).expect("a VM user");
    let range = ConfinementConfig::default().range().unwrap();
    assert!(
        range.contains(&user.uid) && user.gid == user.uid,
        "{user:?}"
    );
    for b in ready_bodies(&guest, &vm_id) {
        bus.publish(&ev(&r, b)).await.unwrap();
    }
    let running = wait_event(&bus, "vm.running", &r).await;
    let Some(Body::VmRunning(running)) = running.body else {
        panic!("{}", dump())
    };
    assert_eq!(running.accel, "tcg", "auto resolves to TCG on this host");
    let status = std::fs::read_to_string(format!("/proc/{}/status", running.pid)).unwrap();
    assert_eq!(
        wnodes_launcher::confine::parse_status_uids(&status),
        [user.uid, user.uid],
        "qemu runs as the VM's user"
    );
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");

    sigterm_and_wait(&mut first).await;
    let vm = VmDir::new(&state.join("vms"), &vm_id).unwrap();
    assert!(
        vm.qemu_alive(running.pid),
        "qemu survives SIGTERM of the launcher"
    );

    let mut second = launcher.spawn().unwrap();
    let stopped = wait_event(&bus, "vm.stopped", &r).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!("{}", dump())
    };
    assert_eq!(stopped.exit_code, 6, "{}", dump());
    assert_eq!(stopped.output_tail, "bin\n");
    // Finished: the VM's files are root's again, its uid free for the next VM.
    let qemu_dir = std::fs::metadata(vm.qemu_dir()).unwrap();
    assert_eq!((qemu_dir.uid(), qemu_dir.gid()), (0, 0), "{}", dump());
    sigterm_and_wait(&mut second).await;
    assert!(dump().contains("Reattaching to a running VM"), "{}", dump());
}

/// Processes whose command line names `needle` (a qemu started for a VM names its id).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push(cmdline);
        }
    }
    out
}

/// Preparation results that break the host policy, as real events to the launcher binary:
/// each VM fails in phase `policy` with the rule, an error line names it, and no qemu runs.
async fn binary_refuses_images_and_volumes_outside_their_roots() {
    let nats = NatsServer::start().await.unwrap();
    let bus = wnodes_testkit::bus::connect(&nats.admin(), "test@local")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cache, volumes) = (dir.path().join("cache"), dir.path().join("volumes"));
    for d in [&cache, &volumes] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(cache.join("disk.img"), "not a disk").unwrap();
    std::os::unix::fs::symlink("/root", cache.join("to-root")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", volumes.join("vm.img")).unwrap();
    let mut launcher = launcher_with_roots(
        &nats
            .identity(&wnodes_bus::roles::LAUNCHER, HOST)
            .await
            .unwrap(),
        dir.path(),
        &cache,
        &volumes,
    )
    .spawn()
    .unwrap();
    let _cleanup = Cleanup(dir.path().join("state/vms"));
    let log = dir.path().join("launcher.log");
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();

    let disk = cache.join("disk.img").display().to_string();
    // A qcow2 image in the cache whose backing file is a host secret (qemu would open it).
    let evil_qcow2 = cache.join("evil.qcow2").display().to_string();
    let made = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/shadow",
            "-F",
            "raw",
        ])
        .arg(&evil_qcow2)
        .arg("1M")
        .status()
        .unwrap();
    assert!(made.success());
    // (job, image path, kernel path, scratch path, rule); a .qcow2 is declared qcow2.
    let attacks = [
        (
            "pol-1",
            "/etc/shadow".to_owned(),
            String::new(),
            String::new(),
            "image.roots",
        ),
        (
            "pol-2",
            format!("{}/.bashrc", cache.join("to-root").display()),
            String::new(),
            String::new(),
            "image.roots",
        ),
        (
            "pol-3",
            disk.clone(),
            "/etc/shadow".into(),
            String::new(),
            "image.roots",
        ),
        (
            "pol-4",
            format!("{}/../../../etc/passwd", cache.display()),
            String::new(),
            String::new(),
            "image.roots",
        ),
        (
            "pol-5",
            disk.clone(),
            String::new(),
            "/etc/passwd".into(),
            "scratch.roots",
        ),
        (
            "pol-6",
            disk.clone(),
            String::new(),
            volumes.join("vm.img").display().to_string(),
            "scratch.roots",
        ),
        (
            "pol-7",
            evil_qcow2.clone(),
            String::new(),
            String::new(),
            "image.backing_file",
        ),
    ];
    for (job, image, kernel, scratch, rule) in &attacks {
        let r = run(job);
        bus.publish(&job_started(&r, "atlas", "true"))
            .await
            .unwrap();
        let vm_id = vm_id_of(&wait_event(&bus, "vm.requested", &r).await);
        for mut b in ready_bodies(&guest_dir(), &vm_id) {
            match &mut b {
                Body::ImageReady(i) => {
                    if image.ends_with(".qcow2") {
                        i.format = "qcow2".into();
                    }
                    i.path = image.clone();
                    i.kernel_path = kernel.clone();
                    i.initrd_path = String::new();
                }
                Body::ScratchReady(s) => {
                    s.path = scratch.clone();
                    s.backend = "file".into();
                }
                _ => {}
            }
            bus.publish(&ev(&r, b)).await.unwrap();
        }
        let failed = wait_event(&bus, "vm.failed", &r).await;
        let Some(Body::VmFailed(f)) = failed.body else {
            panic!("{}", dump())
        };
        assert_eq!(f.phase, "policy", "{job}: {}", f.reason);
        assert!(
            f.reason.starts_with(&format!("host policy {rule}: ")),
            "{job}: {}",
            f.reason
        );
        let text = dump();
        assert!(
            text.lines().any(|l| l.contains("ERROR")
                && l.contains("Refused by host policy")
                && l.contains(&vm_id)
                && l.contains(rule)),
            "{job}: no error line:\n{text}"
        );
        assert_eq!(
            processes_naming(&vm_id),
            Vec::<String>::new(),
            "{job}: a process for the VM"
        );
    }
    sigterm_and_wait(&mut launcher).await;
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(multi_thread vm_binary_sigterm_leaves_the_vm_running_and_the_next_launcher_reports_it needs [Qemu, TestGuest, Root, Setpriv]),
        host_test!(multi_thread binary_refuses_images_and_volumes_outside_their_roots needs [Qemu, TestGuest]),
    ])
}
