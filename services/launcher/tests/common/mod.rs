//! What only the launcher's tests share: their host, their runs and events on it (over
//! `wnodes_testkit::events` and `wnodes_testkit::bus`), and killing the VMs a failed test left
//! running (the launcher's own VM directories).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, time::Duration};

use wnodes_bus::{Bus, proto::event::Body};
use wnodes_proto::v1::{Event, JobRunRef};
use wnodes_testkit::{
    bus,
    events::{self, Events, RunRefExt},
};

pub const HOST: &str = "hv1.test";
pub const LONG: Duration = Duration::from_secs(120);

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

/// A run of job `job_id` at the launcher tests' site.
pub fn run(job_id: &str) -> JobRunRef {
    events::run(job_id).site("INFN-T1")
}

/// An event of `run` on [`HOST`], as the tests publish it.
pub fn ev(run: &JobRunRef, body: Body) -> Event {
    Events::new(HOST, "test@local").build(run, body)
}

/// `job.started` of `run` for `vo`, running `script` inline.
pub fn job_started(run: &JobRunRef, vo: &str, script: &str) -> Event {
    ev(
        run,
        Body::JobStarted(events::job_started(run, HOST, vo, script)),
    )
}

/// The last event of `event_type` on [`HOST`], with its `traceparent` header.
pub async fn last_event_traced(bus: &Bus, event_type: &str) -> Option<(Event, String)> {
    bus::last_event_traced(bus, HOST, event_type).await
}

/// The last event of `event_type` on [`HOST`].
pub async fn last_event(bus: &Bus, event_type: &str) -> Option<Event> {
    bus::last_event(bus, HOST, event_type).await
}

/// Waits (up to [`LONG`]) for `event_type` of `run` on [`HOST`].
pub async fn wait_event(bus: &Bus, event_type: &str, run: &JobRunRef) -> Event {
    bus::wait_event(bus, HOST, event_type, run, LONG)
        .await
        .unwrap()
}
