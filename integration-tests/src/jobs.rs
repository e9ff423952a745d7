//! Helpers of the whole-job tests (`tests/job_flow.rs`, `tests/job_failures.rs`): what they
//! need of the machine ([`NEEDS`]), a private network namespace per test, stack options, and
//! the checks every job ends with.

use std::{future::Future, path::Path, time::Duration};

use wnodes_devstack::{NetworkChoice, Stack, StackOptions, UsageRecord, enter_private_netns};
use wnodes_testkit::{host::Precondition, wait_until};

/// How long a job-level wait may take on a loaded 2-core machine.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// What a whole-job test needs of the host (`wnodes_testkit::host`): root (a private network
/// namespace, taps, nftables, `setpriv` to the job's uid), qemu and the test guest, and what the
/// gateway runs (`sftp-server` through `setpriv`); `/dev/fuse` for the storage export.
pub const NEEDS: &[Precondition] = &[
    Precondition::Root,
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::DevFuse,
    Precondition::SftpServer,
    Precondition::Setpriv,
    Precondition::Nft,
];

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

/// The host's memory (`MemTotal`), in bytes; 0 when unreadable.
pub fn mem_total_bytes() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb * 1024.0)
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
