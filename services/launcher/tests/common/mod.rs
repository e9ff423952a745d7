//! Helpers shared by the launcher's integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use prost::Message;
use wnodes_bus::{Bus, EventExt, proto::event::Body, subject};
use wnodes_proto::v1::{
    Event, ImageReady, JobDescription, JobPayload, JobRunRef, JobStarted, Lrms, NetworkMode,
    NetworkReady, ScratchReady, StorageReady, job_payload,
};
use wnodes_testkit::wait::wait_until;

pub const HOST: &str = "hv1.test";
pub const LONG: Duration = Duration::from_secs(120);

/// The test guest (`guest/build.sh`, run by `scripts/test.sh`); the tests that boot it list
/// `Precondition::TestGuest`.
pub fn guest_dir() -> PathBuf {
    wnodes_testkit::host::guest_dir()
}

/// A host-wide lock: one VM-booting test at a time, whatever runs them.
pub fn vm_lock() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("wnodes-launcher-vm-tests.lock");
    // Read-only is enough for flock(2): a lock file another user made stays usable.
    let f = std::fs::File::open(&path)
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        })
        .unwrap();
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap()
}

/// SIGKILLs the qemu of every VM directory under `vms_dir` that still runs (test cleanup).
pub fn kill_vms_under(vms_dir: &Path) {
    for vm in wnodes_launcher::vm_dir::list(vms_dir).unwrap_or_default() {
        if let Ok(Some(r)) = vm.read_running()
            && vm.qemu_alive(r.pid)
            && let Ok(pid) = i32::try_from(r.pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub fn run(job_id: &str) -> JobRunRef {
    JobRunRef {
        site: "INFN-T1".into(),
        lrms: Lrms::Htcondor as i32,
        job_id: job_id.into(),
        run_attempt: 1,
    }
}

pub fn ev(run: &JobRunRef, body: Body) -> Event {
    Event::build(run.clone(), HOST, "test@local", body)
}

pub fn job_started(run: &JobRunRef, vo: &str, script: &str) -> Event {
    ev(
        run,
        Body::JobStarted(JobStarted {
            job: Some(JobDescription {
                run: Some(run.clone()),
                vo: vo.into(),
                host: HOST.into(),
                payload: Some(JobPayload {
                    kind: Some(job_payload::Kind::InlineScript(script.as_bytes().to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            started_at: None,
        }),
    )
}

/// The last event of `event_type` in the stream, with its `traceparent` header.
pub async fn last_event_traced(bus: &Bus, event_type: &str) -> Option<(Event, String)> {
    let stream = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .ok()?;
    let subj = subject::event_subject(HOST, event_type).ok()?;
    let msg = stream.get_last_raw_message_by_subject(&subj).await.ok()?;
    let traceparent = msg
        .headers
        .get("traceparent")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some((Event::decode(msg.payload.as_ref()).ok()?, traceparent))
}

/// The last event of `event_type` in the stream.
pub async fn last_event(bus: &Bus, event_type: &str) -> Option<Event> {
    last_event_traced(bus, event_type).await.map(|(e, _)| e)
}

pub async fn wait_event(bus: &Bus, event_type: &str, run: &JobRunRef) -> Event {
    let key = wnodes_bus::event::run_key(run);
    wait_until(LONG, &format!("{event_type} for {key}"), || async {
        last_event(bus, event_type)
            .await
            .filter(|e| e.run_key() == key)
    })
    .await
    .unwrap()
}

pub fn vm_id_of(requested: &Event) -> String {
    match &requested.body {
        Some(Body::VmRequested(r)) => r.spec.as_ref().unwrap().vm_id.clone(),
        other => panic!("not a vm.requested: {other:?}"),
    }
}

/// The four preparation results for a VM booting the test guest in `g` (user-mode network,
/// no scratch disk, no storage).
pub fn ready_bodies(g: &Path, vm_id: &str) -> [Body; 4] {
    [
        Body::ImageReady(ImageReady {
            vm_id: vm_id.into(),
            image: "wnodes-test".into(),
            path: g.join("rootfs.ext4").display().to_string(),
            format: "raw".into(),
            kernel_path: g.join("vmlinux").display().to_string(),
            initrd_path: g.join("initrd.img").display().to_string(),
            ..Default::default()
        }),
        Body::ScratchReady(ScratchReady {
            vm_id: vm_id.into(),
            ..Default::default()
        }),
        // What the network service answers in user mode (it owns the MAC and addresses).
        Body::NetworkReady(NetworkReady {
            vm_id: vm_id.into(),
            mode: NetworkMode::User as i32,
            mac: "52:54:00:00:a0:b1".into(),
            address: "10.0.2.15/24".into(),
            gateway: "10.0.2.2".into(),
            ..Default::default()
        }),
        Body::StorageReady(StorageReady {
            vm_id: vm_id.into(),
            ..Default::default()
        }),
    ]
}
