//! The checks of the whole-job tests (`tests/job_flow.rs`, `tests/job_failures.rs`,
//! `tests/demo_trace.rs`) over a `wnodes_devstack::Stack`: a private network namespace per
//! test, stack options, the run's events once they meet a condition, and the checks every job
//! ends with. What they need of the machine is `wnodes_testkit::vm::JOB_NEEDS`; what they ask
//! of a run's events is `wnodes_testkit::events::RunEvents`.

use std::{collections::BTreeSet, future::Future, path::Path, time::Duration};

use wnodes_devstack::{
    NetworkChoice, RunEvent, SERVICES, Stack, StackOptions, UsageRecord, enter_private_netns,
};
use wnodes_testkit::{
    bus::consumer_state,
    events::RunEvents,
    vm::{JOB_TIMEOUT, mem_total_bytes},
    wait_until,
};

/// How often [`events_when`] and [`accounting_caught_up`] look again.
const POLL: Duration = Duration::from_millis(200);

/// The seven services' `service.name`s (`wnodes-<service>`).
pub fn seven_services() -> BTreeSet<String> {
    SERVICES.iter().map(|s| format!("wnodes-{s}")).collect()
}

/// Enters a private network namespace, then runs `f` on a fresh multi-thread runtime (whose
/// threads, and every process they start, inherit the namespace).
///
/// # Panics
/// When the namespace or the runtime cannot be made: the test fails.
#[allow(clippy::expect_used)] // a test helper: failing is its job
pub fn in_private_netns<F: Future<Output = ()>>(f: impl FnOnce() -> F) {
    enter_private_netns().expect("entering a private network namespace");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f());
}

/// Stack options with tap networking and an optional OTLP endpoint.
pub fn tap_options(work: &Path, otlp: Option<String>) -> StackOptions {
    let mut o = StackOptions::new(work);
    o.network = NetworkChoice::Tap;
    o.otlp_endpoint = otlp;
    o
}

/// Waits until nothing of any job is left on the host.
///
/// # Panics
/// With what is left, after [`JOB_TIMEOUT`].
pub async fn no_leftovers(stack: &Stack) {
    if let Err(e) = wait_until(JOB_TIMEOUT, "every resource released", || async {
        stack.leftovers().is_empty().then_some(())
    })
    .await
    {
        panic!("{e}: {:#?}", stack.leftovers());
    }
}

/// The run's one usage record (waits for it, then gives a duplicate time to show up).
///
/// # Panics
/// When there is none, or more than one.
#[allow(clippy::expect_used)]
pub async fn one_usage_record(stack: &Stack, job_id: &str) -> UsageRecord {
    wait_until(
        JOB_TIMEOUT,
        &format!("the usage record of {job_id}"),
        || async {
            let recs = stack.usage_record(job_id).await.ok()?;
            (!recs.is_empty()).then_some(())
        },
    )
    .await
    .expect("a usage record");
    // Give a duplicate (a redelivered vm.stopped) a chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = stack
        .usage_record(job_id)
        .await
        .expect("reading usage records");
    assert_eq!(recs.len(), 1, "exactly one usage record per run: {recs:#?}");
    let r = recs.into_iter().next().expect("one record");
    eprintln!(
        "{job_id}: record exit {} stop {} wall {:.3} s cpu {:.3} s peak {} B cores {}",
        r.exit_code, r.stop_reason, r.wall_seconds, r.cpu_seconds, r.peak_memory_bytes, r.cores
    );
    r
}

/// The run's events once `pred` holds for them (read every 200 ms, at most [`JOB_TIMEOUT`]).
///
/// # Panics
/// With the events there are, when `pred` does not hold in time.
#[allow(clippy::expect_used)]
pub async fn events_when(
    stack: &Stack,
    job: &str,
    what: &str,
    pred: impl Fn(&[RunEvent]) -> bool,
) -> Vec<RunEvent> {
    let res = wait_until(JOB_TIMEOUT, &format!("{what} ({job})"), || async {
        if let Ok(evs) = stack.run_events(job).await
            && pred(&evs)
        {
            return Some(evs);
        }
        tokio::time::sleep(POLL).await;
        None
    })
    .await;
    match res {
        Ok(evs) => evs,
        Err(e) => panic!(
            "{e}; events: {}",
            stack
                .run_events(job)
                .await
                .expect("reading the run's events")
                .names()
        ),
    }
}

/// Waits until accounting's durable consumer has acknowledged everything in the stream.
///
/// # Panics
/// When it does not within [`JOB_TIMEOUT`].
#[allow(clippy::expect_used)]
pub async fn accounting_caught_up(stack: &Stack) {
    let client = wnodes_bus::connect::connect(&stack.nats_admin(), "test", None, None)
        .await
        .expect("connecting to the stack's nats-server as the admin");
    let js = async_nats::jetstream::new(client);
    let name = wnodes_bus::subject::durable_name("accounting", None).expect("a durable name");
    wait_until(
        JOB_TIMEOUT,
        "accounting caught up with the stream",
        || async {
            let s = consumer_state(&js, &name).await.ok()?;
            if s.pending == 0 && s.ack_pending == 0 {
                return Some(());
            }
            tokio::time::sleep(POLL).await;
            None
        },
    )
    .await
    .expect("accounting caught up");
}

/// No usage record for `job_id` once accounting has seen everything up to now.
///
/// # Panics
/// When there is one.
#[allow(clippy::expect_used)]
pub async fn no_usage_record(stack: &Stack, job_id: &str) {
    accounting_caught_up(stack).await;
    let recs = stack
        .usage_record(job_id)
        .await
        .expect("reading usage records");
    assert!(recs.is_empty(), "no usage record for {job_id}: {recs:#?}");
}

/// The bounds every usage record of the demo job meets: CPU between 0.1 s and wall × cores,
/// peak memory between 10 MB and the host's memory, the demo VO and the job's uid/gid.
///
/// # Panics
/// When a bound does not hold.
pub fn check_cpu_and_memory(r: &UsageRecord) {
    let cores = r.cores as f64;
    assert!(cores >= 1.0, "{r:#?}");
    assert!(
        r.cpu_seconds >= 0.1 && r.cpu_seconds <= r.wall_seconds * cores,
        "cpu {} s, wall {} s × {cores} cores",
        r.cpu_seconds,
        r.wall_seconds
    );
    let peak = r.peak_memory_bytes as f64;
    assert!(
        peak >= 10e6 && peak <= mem_total_bytes(),
        "peak memory {peak} bytes"
    );
    assert_eq!(r.vo, "demo");
    assert_eq!((r.uid, r.gid), (Some(65534), Some(65534)));
}
