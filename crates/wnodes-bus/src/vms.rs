//! The VMs the events stream knows of, each folded from its `vm.*` events (`vm.requested`,
//! `vm.running`, `vm.stopped`, `vm.failed`): what `wnodesctl vms` shows. Reads like
//! [`crate::runs`] (direct gets; the `monitor` identity's rights), so it covers the stream's
//! retention, not more.

use std::time::SystemTime;

use async_nats::jetstream;
use wnodes_proto::v1::event::Body;

use crate::{
    error::BusError,
    event::run_key,
    runs::{RunEvent, read_subjects},
    subject,
};

/// Where a VM is, by its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Requested; its image, scratch, network and storage are being prepared.
    Preparing,
    /// qemu runs.
    Running,
    /// It ran and stopped.
    Stopped,
    /// It failed before it ran.
    Failed,
}

impl VmState {
    /// `preparing`, `running`, `stopped`, `failed`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// Stopped or failed.
    pub fn ended(self) -> bool {
        matches!(self, Self::Stopped | Self::Failed)
    }
}

/// One VM as its events tell it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmView {
    pub vm_id: String,
    pub host: String,
    /// The run key (`SITE/lrms/JOB/ATTEMPT`).
    pub run: String,
    pub state: VmState,
    /// From `vm.requested` (empty when its request is older than the stream).
    pub image: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub scratch_bytes: u64,
    /// When its first event was stored.
    pub since: SystemTime,
    /// When its last event was stored.
    pub last: SystemTime,
    /// `vm.stopped`: the payload's exit status.
    pub exit_code: Option<i32>,
    /// `vm.failed`: the phase and the reason.
    pub failure: Option<(String, String)>,
}

/// The VMs in `events` (as [`read`] returns them: stream order), ordered by their first event.
pub fn fold(events: &[RunEvent]) -> Vec<VmView> {
    let mut vms: Vec<VmView> = Vec::new();
    for e in events {
        let vm_id = match &e.event.body {
            Some(Body::VmRequested(r)) => r.spec.as_ref().map(|s| s.vm_id.as_str()),
            Some(Body::VmRunning(r)) => Some(r.vm_id.as_str()),
            Some(Body::VmStopped(r)) => Some(r.vm_id.as_str()),
            Some(Body::VmFailed(r)) => Some(r.vm_id.as_str()),
            _ => None,
        };
        let Some(vm_id) = vm_id.filter(|v| !v.is_empty()) else {
            continue;
        };
        let at = match vms.iter().position(|v| v.vm_id == vm_id) {
            Some(i) => i,
            None => {
                vms.push(VmView {
                    vm_id: vm_id.to_owned(),
                    host: e.event.host.clone(),
                    run: e.event.run.as_ref().map(run_key).unwrap_or_default(),
                    state: VmState::Preparing,
                    image: String::new(),
                    cores: 0,
                    memory_bytes: 0,
                    scratch_bytes: 0,
                    since: e.time,
                    last: e.time,
                    exit_code: None,
                    failure: None,
                });
                vms.len() - 1
            }
        };
        let vm = &mut vms[at];
        vm.last = vm.last.max(e.time);
        match &e.event.body {
            Some(Body::VmRequested(r)) => {
                let spec = r.spec.clone().unwrap_or_default();
                vm.image = spec.image;
                vm.cores = spec.cores;
                vm.memory_bytes = spec.memory_bytes;
                vm.scratch_bytes = spec.scratch_bytes;
            }
            // An end is final whatever comes after it (a redelivered vm.running).
            Some(Body::VmRunning(_)) if !vm.state.ended() => vm.state = VmState::Running,
            Some(Body::VmStopped(s)) => {
                vm.state = VmState::Stopped;
                vm.exit_code = Some(s.exit_code);
            }
            Some(Body::VmFailed(f)) if vm.state != VmState::Stopped => {
                vm.state = VmState::Failed;
                vm.failure = Some((f.phase.clone(), f.reason.clone()));
            }
            _ => {}
        }
    }
    vms
}

/// Every VM in the events stream, or `host`'s only.
pub async fn read(js: &jetstream::Context, host: Option<&str>) -> Result<Vec<VmView>, BusError> {
    // `vm.requested`, `vm.running`, `vm.stopped`, `vm.failed`: every `vm.*` type, one walk.
    let filters = vec![subject::event_filter(host, "vm.*")?];
    let what = match host {
        Some(h) => format!("the VMs of {h}"),
        None => "the VMs".to_owned(),
    };
    let events = read_subjects(js, &what, filters, |_| true).await?;
    Ok(fold(&events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventExt;
    use std::time::Duration;
    use wnodes_proto::v1 as proto;

    fn at(secs: u64, body: Body, job: &str, host: &str) -> RunEvent {
        let event = proto::Event::build(
            proto::JobRunRef {
                site: "T1".into(),
                job_id: job.into(),
                run_attempt: 1,
                ..Default::default()
            },
            host,
            "test",
            body,
        );
        RunEvent {
            event_type: event.event_type().unwrap(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            trace_id: None,
            sequence: secs,
            event,
        }
    }

    fn requested(vm: &str) -> Body {
        Body::VmRequested(proto::VmRequested {
            spec: Some(proto::VmSpec {
                vm_id: vm.into(),
                image: "el9".into(),
                cores: 2,
                memory_bytes: 2 << 30,
                scratch_bytes: 10 << 30,
                ..Default::default()
            }),
        })
    }

    #[test]
    fn each_vm_ends_in_the_state_of_its_last_event_and_an_end_is_final() {
        let events = vec![
            at(1, requested("vm-a"), "1", "hv1"),
            at(2, requested("vm-b"), "2", "hv2"),
            at(3, requested("vm-c"), "3", "hv1"),
            at(
                4,
                Body::VmRunning(proto::VmRunning {
                    vm_id: "vm-a".into(),
                    ..Default::default()
                }),
                "1",
                "hv1",
            ),
            at(
                5,
                Body::VmRunning(proto::VmRunning {
                    vm_id: "vm-b".into(),
                    ..Default::default()
                }),
                "2",
                "hv2",
            ),
            at(
                6,
                Body::VmStopped(proto::VmStopped {
                    vm_id: "vm-b".into(),
                    exit_code: 3,
                    ..Default::default()
                }),
                "2",
                "hv2",
            ),
            at(
                7,
                Body::VmFailed(proto::VmFailed {
                    vm_id: "vm-c".into(),
                    phase: "image".into(),
                    reason: "no such image".into(),
                }),
                "3",
                "hv1",
            ),
            // A vm.running redelivered after the stop changes nothing.
            at(
                8,
                Body::VmRunning(proto::VmRunning {
                    vm_id: "vm-b".into(),
                    ..Default::default()
                }),
                "2",
                "hv2",
            ),
            // A VM whose request expired from the stream: known from its later events.
            at(
                9,
                Body::VmRunning(proto::VmRunning {
                    vm_id: "vm-d".into(),
                    ..Default::default()
                }),
                "4",
                "hv2",
            ),
        ];
        let vms = fold(&events);
        let states: Vec<(&str, VmState)> =
            vms.iter().map(|v| (v.vm_id.as_str(), v.state)).collect();
        assert_eq!(
            states,
            [
                ("vm-a", VmState::Running),
                ("vm-b", VmState::Stopped),
                ("vm-c", VmState::Failed),
                ("vm-d", VmState::Running),
            ]
        );
        assert_eq!(vms[0].host, "hv1");
        assert_eq!(vms[0].run, "T1/unknown/1/1");
        assert_eq!((vms[0].image.as_str(), vms[0].cores), ("el9", 2));
        assert_eq!(vms[1].exit_code, Some(3));
        assert_eq!(vms[1].last, SystemTime::UNIX_EPOCH + Duration::from_secs(8));
        assert_eq!(
            vms[2].failure,
            Some(("image".to_owned(), "no such image".to_owned()))
        );
        assert_eq!(vms[3].image, "", "its request is gone");
    }
}
