//! The `wnodes-launcher` binary itself (runtime config from `WNODES_*`, NATS, SIGTERM): a
//! SIGTERM leaves the VM running and the next launcher reports its end. Boots a VM, so it is
//! named `vm_*` (see `tests/vm.rs`). A host test (`wnodes_testkit::host`): needs qemu and the
//! test guest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{HOST, ev, job_started, run, vm_id_of, wait_event};
use wnodes_bus::{Bus, BusMetrics, NatsConfig, proto::event::Body};
use wnodes_launcher::vm_dir::VmDir;
use wnodes_testkit::{host, host_test, nats::NatsServer};

fn launcher(nats_url: &str, state: &Path, log: &Path) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-launcher"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("WNODES_SITE", "INFN-T1")
        .env("WNODES_HOST", HOST)
        .env("WNODES_NATS__URL", nats_url)
        .env("WNODES_STATE_DIR", state)
        .env("WNODES_LOG_LEVEL", "info")
        .env("WNODES_LAUNCHER__ACCEL", "auto")
        .env("WNODES_LAUNCHER__PREPARE_DEADLINE", "60s")
        .env("WNODES_LAUNCHER__POLICY__NETWORK_MODE", "user")
        .env("WNODES_LAUNCHER__POLICY__VO_IMAGES__ATLAS", "wnodes-test")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // The launcher only: qemu detaches itself and must survive it.
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn sigterm_and_wait(child: &mut tokio::process::Child) {
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the launcher exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::kill_vms_under(&self.0);
    }
}

async fn vm_binary_sigterm_leaves_the_vm_running_and_the_next_launcher_reports_it() {
    let _lock = common::vm_lock();
    let guest = common::guest_dir();
    let nats = NatsServer::start().await.unwrap();
    wnodes_bus::connect::install_crypto_provider();
    let bus = Bus::connect(
        &NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        "test@local",
        BusMetrics::unregistered(),
    )
    .await
    .unwrap();
    bus.ensure_streams().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("launcher.log");
    let _cleanup = Cleanup(state.join("vms"));
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut first = launcher(&nats.url(), &state, &log);
    let r = run("bin-1");
    bus.publish(&job_started(&r, "atlas", "sleep 3; echo bin; exit 6"))
        .await
        .unwrap();
    let vm_id = vm_id_of(&wait_event(&bus, "vm.requested", &r).await);
    for b in common::ready_bodies(&guest, &vm_id) {
        bus.publish(&ev(&r, b)).await.unwrap();
    }
    let running = wait_event(&bus, "vm.running", &r).await;
    let Some(Body::VmRunning(running)) = running.body else {
        panic!("{}", dump())
    };
    assert_eq!(running.accel, "tcg", "auto resolves to TCG on this host");

    sigterm_and_wait(&mut first).await;
    let vm = VmDir::new(&state.join("vms"), &vm_id).unwrap();
    assert!(
        vm.qemu_alive(running.pid),
        "qemu survives SIGTERM of the launcher"
    );

    let mut second = launcher(&nats.url(), &state, &log);
    let stopped = wait_event(&bus, "vm.stopped", &r).await;
    let Some(Body::VmStopped(stopped)) = stopped.body else {
        panic!("{}", dump())
    };
    assert_eq!(stopped.exit_code, 6, "{}", dump());
    assert_eq!(stopped.output_tail, "bin\n");
    sigterm_and_wait(&mut second).await;
    assert!(dump().contains("Reattaching to a running VM"), "{}", dump());
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(multi_thread vm_binary_sigterm_leaves_the_vm_running_and_the_next_launcher_reports_it needs [Qemu, TestGuest]),
    ])
}
