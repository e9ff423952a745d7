//! Normalised events → `wnodes.v1.Event`.
//!
//! | state | body |
//! |---|---|
//! | `queued` | `JobQueued` (owner, queue, cores, memory, image hint, `submitted_at`; no host) |
//! | `started` | `JobStartObserved`: an observation the launcher does not consume. Only the job starter's `JobStarted`, which carries identity verified on the hypervisor, makes a VM |
//! | `evicted` | `JobEvicted` |
//! | `finished` | `JobFinished` (`exit_code`; a job ended by signal N gets 128 + N, the shell's convention) |
//! | `cancelled` | `JobCancelled` |
//! | `held` | `JobHeld` (reason, code, subcode) |
//! | `released` | `JobReleased` |
//!
//! **Ids.** The id is the bus's `<type>:<run key>` ([`wnodes_bus::EventExt::build`]), run key
//! `site/lrms/job_id/attempt`; when the event has an LRMS identity (two holds in one run, a
//! Slurm step) it is appended after `#`: `job.held:INFN-T1/htcondor/1001.0/1#t1740823205`.
//! Nothing depends on where the record sits in a file, so the same change read twice — after a
//! restart, in a replay, from a rotated copy — is the same event, and JetStream and the
//! consumers drop the duplicate.
//!
//! `Event.time` is the LRMS's time of the change (not the time of reading), so a re-read event
//! is byte-for-byte the same. `Event.host` is the execution host when the record names a valid
//! host name, else empty.

use prost_types::Timestamp as PbTimestamp;
use wnodes_bus::EventExt;
use wnodes_proto::v1::{
    Event, JobCancelled, JobDescription, JobEvicted, JobFinished, JobHeld, JobOwner, JobQueued,
    JobReleased, JobRunRef, JobStartObserved, ResourceRequest, event::Body,
};

use crate::event::{LrmsEvent, State};

fn ts(t: jiff::Timestamp) -> PbTimestamp {
    PbTimestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// The run this event is about.
pub fn run_ref(ev: &LrmsEvent, site: &str) -> JobRunRef {
    JobRunRef {
        site: site.to_owned(),
        lrms: ev.lrms.proto() as i32,
        job_id: ev.job_id.clone(),
        run_attempt: ev.run_attempt.max(1),
    }
}

/// The exit code the LRMS recorded; a signal N as 128 + N.
fn exit_code(ev: &LrmsEvent) -> i32 {
    match (ev.usage.exit_code, ev.usage.exit_signal) {
        (Some(c), _) => c,
        (None, Some(s)) if s > 0 => 128 + s,
        _ => 0,
    }
}

/// The body of `ev`.
pub fn body(ev: &LrmsEvent, run: JobRunRef) -> Body {
    let u = &ev.usage;
    let at = Some(ts(ev.time));
    let reason = u.reason.clone().unwrap_or_default();
    match ev.state {
        State::Queued => Body::JobQueued(JobQueued {
            job: Some(JobDescription {
                run: Some(run),
                owner: u.user.as_ref().map(|user| JobOwner {
                    user: user.clone(),
                    ..Default::default()
                }),
                queue: u.queue.clone().unwrap_or_default(),
                resources: Some(ResourceRequest {
                    cores: u.cores.unwrap_or(0),
                    memory_bytes: u.memory_request_bytes.unwrap_or(0),
                    ..Default::default()
                }),
                image_hint: u.image_hint.clone().unwrap_or_default(),
                submitted_at: Some(ts(u.submit_time.unwrap_or(ev.time))),
                ..Default::default()
            }),
        }),
        State::Started => Body::JobStartObserved(JobStartObserved {
            run: Some(run),
            exec_host: u.exec_host.clone().unwrap_or_default(),
            started_at: at,
            queue: u.queue.clone().unwrap_or_default(),
            cores: u.cores.unwrap_or(0),
        }),
        State::Evicted => Body::JobEvicted(JobEvicted {
            run: Some(run),
            reason,
            evicted_at: at,
        }),
        State::Finished => Body::JobFinished(JobFinished {
            run: Some(run),
            exit_code: exit_code(ev),
            finished_at: at,
        }),
        State::Cancelled => Body::JobCancelled(JobCancelled {
            run: Some(run),
            reason,
            cancelled_at: at,
        }),
        State::Held => Body::JobHeld(JobHeld {
            run: Some(run),
            reason,
            hold_code: u.hold_code.unwrap_or(0),
            hold_subcode: u.hold_subcode.unwrap_or(0),
            held_at: at,
        }),
        State::Released => Body::JobReleased(JobReleased {
            run: Some(run),
            reason,
            released_at: at,
        }),
    }
}

/// The event id of `ev` (see the module doc).
pub fn event_id(ev: &LrmsEvent, site: &str) -> String {
    to_event(ev, site, "").id
}

/// The `wnodes.v1.Event` for `ev`, from producer `source` (`"<service>@<host>"`).
pub fn to_event(ev: &LrmsEvent, site: &str, source: &str) -> Event {
    let run = run_ref(ev, site);
    let host = match ev.state {
        State::Queued => "",
        _ => ev.usage.host.as_deref().unwrap_or(""),
    };
    let mut e = Event::build(run.clone(), host, source, body(ev, run));
    if let Some(identity) = &ev.identity {
        e.id = format!("{}#{identity}", e.id);
    }
    e.time = Some(ts(ev.time));
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::LrmsKind;

    fn ev(state: State) -> LrmsEvent {
        LrmsEvent::new(
            LrmsKind::Htcondor,
            "1001.0",
            state,
            "2025-03-01T10:00:05Z".parse().unwrap(),
            "x",
        )
    }

    #[test]
    fn ids_are_type_and_run_plus_identity() {
        let mut h = ev(State::Held);
        h.identity = Some("t1740823205".into());
        let e = to_event(&h, "INFN-T1", "bridge@b");
        assert_eq!(e.id, "job.held:INFN-T1/htcondor/1001.0/1#t1740823205");
        assert_eq!(e.time.unwrap().seconds, 1_740_823_205);
        let f = to_event(&ev(State::Finished), "INFN-T1", "bridge@b");
        assert_eq!(f.id, "job.finished:INFN-T1/htcondor/1001.0/1");
        let s = to_event(&ev(State::Started), "INFN-T1", "bridge@b");
        assert_eq!(s.id, "job.start_observed:INFN-T1/htcondor/1001.0/1");
        // Same input, same bytes.
        assert_eq!(to_event(&h, "INFN-T1", "bridge@b"), e);
    }

    #[test]
    fn bodies_carry_what_the_record_had() {
        let mut q = ev(State::Queued);
        q.usage.image_hint = Some("atlas-el9".into());
        q.usage.cores = Some(8);
        q.usage.host = Some("wn1".into());
        let e = to_event(&q, "S", "b@h");
        assert_eq!(e.host, "", "a queued job has no host yet");
        let Some(Body::JobQueued(jq)) = e.body else {
            panic!()
        };
        let job = jq.job.unwrap();
        assert_eq!(job.image_hint, "atlas-el9");
        assert_eq!(job.resources.unwrap().cores, 8);
        let mut f = ev(State::Finished);
        f.usage.exit_signal = Some(9);
        let Some(Body::JobFinished(jf)) = to_event(&f, "S", "b@h").body else {
            panic!()
        };
        assert_eq!(jf.exit_code, 137);
    }
}
