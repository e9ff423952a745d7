//! Jobs that do not go the happy way, end to end (`wnodes-devstack`: nats-server, the seven
//! services as processes, real qemu VMs under TCG, tap networking in a private network
//! namespace): preparation failures, cancellation by the job starter, launcher crashes and
//! clean stops while a VM runs, and a duplicated `vm.stopped` reaching a restarted accounting.
//!
//! After every scenario each resource that was prepared (`…Ready`) has been released
//! (`resource.released` of its kind, read back from the run's events) and nothing is left on
//! the host (`Stack::leftovers`). Tests are named `vm_*`: they run one at a time
//! (`.config/nextest.toml`).
//!
//! Needs root, `/dev/fuse`, qemu, the test guest (`guest/build.sh`) and the service binaries
//! (`cargo build --workspace --bins`). Host tests (`wnodes_testkit::host`, `wnodes_testkit::vm::JOB_NEEDS`): where
//! a precondition is missing they are skipped, or fail naming it under `WNODES_HOST_TESTS=required`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use wnodes_bus::{
    EventType,
    proto::{self, event::Body},
};
use wnodes_devstack::{
    ExtraImage, ImageServing, RunEvent, RunningSubmit, Stack, SubmitArgs, SubmitOutcome,
    UsageRecord,
};
use wnodes_integration_tests::jobs::{
    accounting_caught_up, check_cpu_and_memory, events_when, in_private_netns, no_leftovers,
    no_usage_record, one_usage_record, tap_options as options,
};
use wnodes_testkit::{
    OtlpCollector,
    bus::BusClient,
    events::RunEvents,
    host, host_test,
    otlp::trace_id_in,
    vm::{JOB_NEEDS, JOB_TIMEOUT, mem_total_bytes},
    wait_until,
};

/// Waits until every resource whose `…Ready` was published has exactly one
/// `resource.released`; returns the events and the kinds that had been prepared.
async fn all_prepared_released(
    stack: &Stack,
    job: &str,
) -> (Vec<RunEvent>, Vec<proto::ResourceKind>) {
    events_when(stack, job, "a release for every …Ready", |evs| {
        let rel = evs.released();
        evs.prepared()
            .iter()
            .all(|k| rel.get(&(*k as i32)).is_some_and(|n| *n >= 1))
    })
    .await;
    // Give a duplicate release a chance to show up, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let evs = stack.run_events(job).await.unwrap();
    let kinds = evs.prepared();
    let rel = evs.released();
    eprintln!("{job}: events [{}]; prepared {kinds:?}", evs.names());
    for k in &kinds {
        assert_eq!(
            rel.get(&(*k as i32)),
            Some(&1),
            "{k:?} released exactly once: {}",
            evs.names()
        );
    }
    (evs, kinds)
}

/// A protobuf timestamp's `seconds` and `nanos` as a time.
fn unix((seconds, nanos): (i64, i32)) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(seconds).unwrap(),
            u32::try_from(nanos).unwrap(),
        )
}

/// qemu's start (`VmRunning.started_at`) and stop (`VmStopped.stopped_at`) as the events say.
fn vm_start_and_stop(events: &[RunEvent]) -> (SystemTime, SystemTime) {
    let started = events
        .first_payload::<proto::VmRunning>()
        .and_then(|r| r.started_at)
        .map(|t| (t.seconds, t.nanos))
        .expect("vm.running started_at");
    let stopped = events
        .the::<proto::VmStopped>()
        .stopped_at
        .map(|t| (t.seconds, t.nanos))
        .expect("vm.stopped stopped_at");
    (unix(started), unix(stopped))
}

/// The record's wall time is the VM's own start → stop (±0.05 s) and the `vm.running →
/// vm.stopped` gap of the stream (±0.5 s, not counting how long after qemu's start
/// `vm.running` was stored: qemu's `-daemonize` start-up, 0.1–0.7 s on a loaded 2-core TCG
/// host, is part of the VM's wall time but precedes the event); CPU and memory are plausible.
fn check_usage(r: &UsageRecord, events: &[RunEvent]) {
    let running = events.time_of(EventType::VmRunning);
    let stopped = events.time_of(EventType::VmStopped);
    let between = stopped.duration_since(running).unwrap().as_secs_f64();
    let (vm_started, vm_stopped) = vm_start_and_stop(events);
    let own = vm_stopped.duration_since(vm_started).unwrap().as_secs_f64();
    // How long after qemu's start / stop each event was stored.
    let running_lag = running.duration_since(vm_started).unwrap().as_secs_f64();
    let stopped_lag = stopped.duration_since(vm_stopped).unwrap().as_secs_f64();
    eprintln!(
        "record wall {:.3} s; VM start → stop {own:.3} s; vm.running → vm.stopped {between:.3} s \
         (vm.running stored {running_lag:.3} s after qemu started, vm.stopped {stopped_lag:.3} s \
         after it stopped)",
        r.wall_seconds,
    );
    assert!(
        (r.wall_seconds - own).abs() <= 0.05,
        "wall {} s vs the VM's start → stop {own} s",
        r.wall_seconds
    );
    assert!(
        (r.wall_seconds - running_lag - between).abs() <= 0.5,
        "wall {} s vs vm.running → vm.stopped {between} s (+ {running_lag} s start-up)",
        r.wall_seconds
    );
    assert!(
        running_lag <= 3.0,
        "vm.running {running_lag} s after qemu started"
    );
    check_cpu_and_memory(r);
}

/// True when the launcher measures usage through per-VM cgroups (its start-up log line says
/// which source it uses), which keep counting while the launcher is down.
/// True when every launcher start accounted usage through a per-VM cgroup (v1 or v2), which
/// keeps counting while the launcher is down; false for `/proc` samples.
fn launcher_uses_cgroups(stack: &Stack) -> bool {
    std::fs::read_to_string(stack.log_path("launcher"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("Launcher starting."))
        .all(|l| l.contains("cgroup v"))
}

/// The qemu of the stack's only VM, once it exists.
async fn the_qemu(stack: &Stack) -> u32 {
    wait_until(JOB_TIMEOUT, "the VM's qemu process", || async {
        let q = stack.leftovers().qemus;
        if q.len() == 1 {
            return Some(q[0]);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        None
    })
    .await
    .unwrap()
}

/// Starts job `job` running `script` through the job starter and waits until its VM runs;
/// returns the job starter, the run's events so far and the VM's qemu.
async fn running_job(
    stack: &Stack,
    job: &str,
    script: &str,
) -> (RunningSubmit, Vec<RunEvent>, u32) {
    let submit = stack
        .spawn_submit(&SubmitArgs::script(job, script))
        .unwrap();
    let evs = events_when(stack, job, "vm.running", |e| e.has(EventType::VmRunning)).await;
    let qemu = the_qemu(stack).await;
    (submit, evs, qemu)
}

/// The job starter of a [`CRASH_PAYLOAD`] job exits 7 with the payload's output, and the run
/// has its one usage record with exit code 7.
async fn ended_as_crash_payload(
    stack: &Stack,
    job: &str,
    submit: RunningSubmit,
) -> (SubmitOutcome, UsageRecord) {
    let out = submit.wait().await.unwrap();
    assert_eq!(out.exit_code, 7, "{out:#?}");
    assert!(out.stdout.contains("done"), "{out:#?}");
    let r = one_usage_record(stack, job).await;
    assert_eq!(r.exit_code, 7, "{r:#?}");
    (out, r)
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
}

// ---------------------------------------------------------------------------------------------
// 1. Preparation failures

/// A job that fails before anything is prepared: `vm.failed` phase `policy`, exit 125 with the
/// reason on stderr, no preparation, no record.
async fn policy_failure(stack: &Stack, args: SubmitArgs, want: &[&str]) {
    let job = args.job_id.clone();
    let out = stack.submit(&args).await.unwrap();
    assert_eq!(out.exit_code, 125, "{out:#?}");
    for w in want {
        assert!(out.stderr.contains(w), "stderr names {w:?}: {out:#?}");
    }
    let evs = events_when(stack, &job, "vm.failed", |e| e.has(EventType::VmFailed)).await;
    let f = evs.the::<proto::VmFailed>();
    assert_eq!(f.phase, "policy", "{f:#?}");
    for w in want {
        assert!(f.reason.contains(w), "reason names {w:?}: {f:#?}");
    }
    assert!(
        out.stderr.contains(&f.reason),
        "stderr has the reason {:?}: {}",
        f.reason,
        out.stderr
    );
    assert!(!evs.has(EventType::VmRequested), "{}", evs.names());
    let (evs, prepared) = all_prepared_released(stack, &job).await;
    assert!(prepared.is_empty(), "{}", evs.names());
    assert!(!evs.has(EventType::VmRunning), "{}", evs.names());
    no_usage_record(stack, &job).await;
    no_leftovers(stack).await;
}

fn vm_a_vo_without_an_image_or_too_much_scratch_fails_in_policy_with_exit_125() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let stack = Stack::start(options(work.path(), None)).await.unwrap();

        // (a) A VO the site has no image for.
        let mut args = SubmitArgs::script("fail-vo-1", "exit 0\n");
        args.vo = Some("nosuch".into());
        policy_failure(&stack, args, &["no image configured", "'nosuch'"]).await;

        // (b) More scratch than the site maximum (1024 MiB): 2048 MiB.
        let mut args = SubmitArgs::script("fail-scratch-1", "exit 0\n");
        args.scratch_mib = 2048;
        policy_failure(
            &stack,
            args,
            &[
                "scratch_bytes",
                &(2048u64 << 20).to_string(),
                &(1024u64 << 20).to_string(),
            ],
        )
        .await;
    });
}

fn vm_an_image_with_a_wrong_digest_fails_after_scratch_and_network_and_releases_them() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let wrong = "0".repeat(64);
        let mut opts = options(work.path(), None);
        // Served slowly so that scratch and network are certainly ready before the image fails.
        opts.image_serving = ImageServing::Http;
        opts.image_http_delay = Duration::from_secs(3);
        opts.extra_images.push(ExtraImage {
            name: "broken".into(),
            vo: "brokenvo".into(),
            rootfs_sha256: Some(wrong.clone()),
            rootfs_url: None,
        });
        let stack = Stack::start(opts).await.unwrap();
        let mut args = SubmitArgs::script("fail-digest-1", "exit 0\n");
        args.vo = Some("brokenvo".into());
        let out = stack.submit(&args).await.unwrap();
        assert_eq!(out.exit_code, 125, "{out:#?}");
        assert!(out.stderr.contains("sha256 mismatch"), "{out:#?}");

        let evs = events_when(&stack, "fail-digest-1", "vm.failed", |e| {
            e.has(EventType::VmFailed)
        })
        .await;
        let f = evs.the::<proto::VmFailed>();
        assert_eq!(f.phase, "image", "{f:#?}");
        assert!(f.reason.contains("sha256 mismatch"), "{f:#?}");
        assert!(
            f.reason.contains(&wrong),
            "reason names the expected digest: {f:#?}"
        );
        assert!(
            f.reason.contains("rootfs.ext4"),
            "reason names the file: {f:#?}"
        );
        assert!(out.stderr.contains(&f.reason), "{out:#?}");
        use EventType::{ImageFailed, NetworkReady, ScratchReady, VmFailed};
        assert!(
            evs.in_order(&[ScratchReady, ImageFailed])
                && evs.in_order(&[NetworkReady, ImageFailed]),
            "scratch.ready and network.ready before image.failed: {}",
            evs.names()
        );
        assert!(evs.in_order(&[ImageFailed, VmFailed]), "{}", evs.names());
        let (evs, prepared) = all_prepared_released(&stack, "fail-digest-1").await;
        assert!(
            prepared.contains(&proto::ResourceKind::Scratch)
                && prepared.contains(&proto::ResourceKind::Network),
            "{prepared:?}"
        );
        let vm_failed = evs.position(EventType::VmFailed);
        for e in evs.iter().skip(vm_failed) {
            assert_ne!(e.event_type, EventType::VmRunning, "{}", evs.names());
        }
        assert!(
            evs.iter()
                .position(|e| e.event_type == EventType::ResourceReleased)
                .is_some_and(|p| p > vm_failed),
            "released after vm.failed: {}",
            evs.names()
        );
        no_usage_record(&stack, "fail-digest-1").await;
        no_leftovers(&stack).await;
    });
}

/// A real failure with a cause under it: the image's file is not there. The image service's
/// log line and the `vm.failed` reason carry the whole chain, each link once
/// (`docs/errors-and-logging.md`).
fn vm_an_image_whose_file_is_missing_fails_with_the_whole_chain_once_in_the_log() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let missing = work.path().join("no-such-dir/rootfs.ext4");
        let mut opts = options(work.path(), None);
        opts.extra_images.push(ExtraImage {
            name: "gone".into(),
            vo: "gonevo".into(),
            rootfs_sha256: None,
            rootfs_url: Some(format!("file://{}", missing.display())),
        });
        let stack = Stack::start(opts).await.unwrap();
        let mut args = SubmitArgs::script("fail-missing-1", "exit 0\n");
        args.vo = Some("gonevo".into());
        let out = stack.submit(&args).await.unwrap();
        assert_eq!(out.exit_code, 125, "{out:#?}");

        let evs = events_when(&stack, "fail-missing-1", "vm.failed", |e| {
            e.has(EventType::VmFailed)
        })
        .await;
        let f = evs.the::<proto::VmFailed>();
        assert_eq!(f.phase, "image", "{f:#?}");
        let top = format!("cannot open the source {}", missing.display());
        let cause = "No such file or directory";
        let once_in_order = |text: &str| {
            assert_eq!(text.matches(&top).count(), 1, "{text}");
            assert_eq!(text.matches(cause).count(), 1, "{text}");
            assert!(text.find(&top) < text.find(cause), "{text}");
        };
        once_in_order(&f.reason);

        let log = std::fs::read_to_string(stack.log_path("image")).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("Fetch failed.") && l.contains(&top))
            .unwrap_or_else(|| panic!("no \"Fetch failed.\" line naming {top:?} in:\n{log}"));
        println!("image service: {line}");
        once_in_order(line);

        let (evs, _) = all_prepared_released(&stack, "fail-missing-1").await;
        assert!(!evs.has(EventType::VmRunning), "{}", evs.names());
        no_usage_record(&stack, "fail-missing-1").await;
        no_leftovers(&stack).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Cancellation

fn vm_sigterm_to_submit_while_the_vm_runs_stops_it_as_cancelled_and_exits_143() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let stack = Stack::start(options(work.path(), None)).await.unwrap();
        let job = "cancel-running-1";
        let (submit, _, qemu) = running_job(&stack, job, "echo started\nsleep 30\nexit 0\n").await;
        submit.signal(Signal::SIGTERM).unwrap();
        let out = submit.wait().await.unwrap();
        assert_eq!(out.exit_code, 143, "{out:#?}");
        assert!(out.stderr.contains("SIGTERM: cancelling"), "{out:#?}");
        // submit exits after the teardown: the VM's end is already in the stream.
        let evs = stack.run_events(job).await.unwrap();
        assert!(evs.has(EventType::JobCancelled), "{}", evs.names());
        let stopped = evs.the::<proto::VmStopped>();
        assert_eq!(stopped.stop_reason, "cancelled", "{stopped:#?}");
        assert!(!evs.has(EventType::VmFailed), "{}", evs.names());
        assert!(!alive(qemu), "qemu {qemu} still alive after submit exited");
        let gap = evs
            .time_of(EventType::VmStopped)
            .duration_since(evs.time_of(EventType::VmRunning))
            .unwrap();
        assert!(gap < Duration::from_secs(30), "not cut short: {gap:?}");
        let (_, prepared) = all_prepared_released(&stack, job).await;
        assert_eq!(prepared.len(), 3, "{prepared:?}");
        let r = one_usage_record(&stack, job).await;
        assert_eq!(r.stop_reason, "cancelled", "{r:#?}");
        let evs = stack.run_events(job).await.unwrap();
        check_usage(&r, &evs);
        no_leftovers(&stack).await;
    });
}

fn vm_sigterm_to_submit_while_preparing_fails_the_vm_as_cancelled_and_releases_late_results() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut opts = options(work.path(), None);
        // The image arrives ~8 s after it is requested; the rest is ready long before.
        opts.image_serving = ImageServing::Http;
        opts.image_http_delay = Duration::from_secs(8);
        let stack = Stack::start(opts).await.unwrap();
        let job = "cancel-preparing-1";
        let submit = stack
            .spawn_submit(&SubmitArgs::script(job, "exit 0\n"))
            .unwrap();
        let evs = events_when(&stack, job, "scratch, network and storage ready", |e| {
            e.has(EventType::ScratchReady)
                && e.has(EventType::NetworkReady)
                && e.has(EventType::StorageReady)
        })
        .await;
        assert!(
            !evs.has(EventType::ImageReady),
            "the image came too early for this test: {}",
            evs.names()
        );
        submit.signal(Signal::SIGTERM).unwrap();
        let out = submit.wait().await.unwrap();
        assert_eq!(out.exit_code, 143, "{out:#?}");
        let evs = stack.run_events(job).await.unwrap();
        let f = evs.the::<proto::VmFailed>();
        assert_eq!(f.phase, "cancelled", "{f:#?}");
        assert!(f.reason.contains("SIGTERM"), "{f:#?}");
        // The image result arrives after the cancel; it must not start anything.
        let evs = events_when(&stack, job, "the late image result", |e| {
            e.has(EventType::ImageReady) || e.has(EventType::ImageFailed)
        })
        .await;
        let late = evs
            .iter()
            .position(|e| matches!(e.event_type, EventType::ImageReady | EventType::ImageFailed))
            .unwrap();
        assert!(late > evs.position(EventType::VmFailed), "{}", evs.names());
        let (evs, prepared) = all_prepared_released(&stack, job).await;
        assert_eq!(
            prepared,
            vec![
                proto::ResourceKind::Scratch,
                proto::ResourceKind::Network,
                proto::ResourceKind::Storage
            ]
        );
        // Let the launcher act on the late result, then check nothing was started.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let evs2 = stack.run_events(job).await.unwrap();
        assert_eq!(evs2.len(), evs.len(), "{}", evs2.names());
        assert!(!evs2.has(EventType::VmRunning), "{}", evs2.names());
        assert!(!evs2.has(EventType::VmStopped), "{}", evs2.names());
        assert!(stack.leftovers().qemus.is_empty());
        let vm_dir = stack.state_dir("launcher").join("vms").join(&f.vm_id);
        assert!(
            !vm_dir.join("qemu/qemu.pid").exists() && !vm_dir.join("running.json").exists(),
            "qemu was started in {}",
            vm_dir.display()
        );
        no_usage_record(&stack, job).await;
        no_leftovers(&stack).await;
    });
}

fn vm_sigterm_to_submit_while_scratch_is_down_releases_the_scratch_prepared_after_the_cancel() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut stack = Stack::start(options(work.path(), None)).await.unwrap();
        // Scratch is down: its result can only come after the job has been cancelled.
        stack.stop_service("scratch").unwrap();
        let job = "cancel-late-scratch-1";
        let submit = stack
            .spawn_submit(&SubmitArgs::script(job, "exit 0\n"))
            .unwrap();
        events_when(&stack, job, "image, network and storage ready", |e| {
            e.has(EventType::ImageReady)
                && e.has(EventType::NetworkReady)
                && e.has(EventType::StorageReady)
        })
        .await;
        submit.signal(Signal::SIGTERM).unwrap();
        let out = submit.wait().await.unwrap();
        assert_eq!(out.exit_code, 143, "{out:#?}");
        let evs = stack.run_events(job).await.unwrap();
        assert_eq!(evs.the::<proto::VmFailed>().phase, "cancelled");
        assert!(!evs.has(EventType::ScratchReady), "{}", evs.names());
        stack.start_service("scratch").await.unwrap();
        let evs = events_when(&stack, job, "the scratch volume released", |e| {
            e.released()
                .contains_key(&(proto::ResourceKind::Scratch as i32))
        })
        .await;
        if evs.has(EventType::ScratchReady) {
            assert!(
                evs.in_order(&[EventType::VmFailed, EventType::ScratchReady]),
                "{}",
                evs.names()
            );
        }
        let (evs, prepared) = all_prepared_released(&stack, job).await;
        assert!(
            prepared.contains(&proto::ResourceKind::Network)
                && prepared.contains(&proto::ResourceKind::Storage),
            "{prepared:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let evs2 = stack.run_events(job).await.unwrap();
        assert_eq!(evs2.len(), evs.len(), "{}", evs2.names());
        assert!(!evs2.has(EventType::VmRunning), "{}", evs2.names());
        assert!(stack.leftovers().qemus.is_empty());
        no_usage_record(&stack, job).await;
        no_leftovers(&stack).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 3. The launcher crashes or stops while a VM runs

const CRASH_PAYLOAD: &str = "sleep 3; echo done; exit 7\n";

fn vm_launcher_killed_while_the_vm_runs_is_restarted_and_the_job_ends_once_in_its_trace() {
    in_private_netns(|| async {
        let collector = OtlpCollector::start().await.unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut stack = Stack::start(options(work.path(), Some(collector.endpoint())))
            .await
            .unwrap();
        let job = "crash-running-1";
        let (submit, _, qemu) = running_job(&stack, job, CRASH_PAYLOAD).await;
        stack.kill_service("launcher").unwrap();
        assert!(alive(qemu), "qemu died with the launcher");
        stack.start_service("launcher").await.unwrap();
        let (out, r) = ended_as_crash_payload(&stack, job, submit).await;
        let trace =
            trace_id_in(&out.stderr).unwrap_or_else(|| panic!("no trace id in {}", out.stderr));
        let evs = stack.run_events(job).await.unwrap();
        check_usage(&r, &evs);
        all_prepared_released(&stack, job).await;
        no_leftovers(&stack).await;
        let run_key = out.run_key.clone();
        drop(stack); // SIGTERM flushes every service's spans.
        let is_stopped_publish = |s: &wnodes_testkit::CollectedSpan| {
            s.service_name == "wnodes-launcher"
                && s.name == "launcher.publish"
                && s.attributes.get("event").map(String::as_str) == Some("vm.stopped")
                && s.attributes.get("wnodes.run") == Some(&run_key)
        };
        let spans = collector
            .wait_for(
                Duration::from_secs(30),
                "the restarted launcher's vm.stopped publish span",
                |s| s.iter().any(is_stopped_publish),
            )
            .await
            .unwrap();
        // The first launcher was SIGKILLed before the VM stopped: this span is the new one's.
        let publish: Vec<_> = spans.iter().filter(|s| is_stopped_publish(s)).collect();
        for s in &publish {
            assert_eq!(s.trace_id, trace, "{s:#?}");
        }
        let finish: Vec<_> = spans
            .iter()
            .filter(|s| s.service_name == "wnodes-launcher" && s.name == "launcher.vm_stopped")
            .collect();
        assert!(!finish.is_empty(), "no launcher.vm_stopped span");
        for s in &finish {
            assert_eq!(s.trace_id, trace, "{s:#?}");
        }
    });
}

fn vm_a_vm_that_ends_while_the_launcher_is_down_is_reported_once_after_the_restart() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut stack = Stack::start(options(work.path(), None)).await.unwrap();
        let job = "crash-ended-1";
        let (submit, evs, qemu) = running_job(&stack, job, CRASH_PAYLOAD).await;
        let running = evs.time_of(EventType::VmRunning);
        stack.kill_service("launcher").unwrap();
        wait_until(
            JOB_TIMEOUT,
            "qemu to exit while the launcher is down",
            || async {
                if alive(qemu) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return None;
                }
                Some(())
            },
        )
        .await
        .unwrap();
        let gone = SystemTime::now();
        stack.start_service("launcher").await.unwrap();
        let (_, r) = ended_as_crash_payload(&stack, job, submit).await;
        // The VM's stop was not observed: its wall time ends at the guest's last output, after
        // the payload's 3 s and before we saw qemu gone — not at the late vm.stopped.
        let evs = stack.run_events(job).await.unwrap();
        let (vm_started, vm_stopped) = vm_start_and_stop(&evs);
        let own = vm_stopped.duration_since(vm_started).unwrap().as_secs_f64();
        let seen = gone.duration_since(vm_started).unwrap().as_secs_f64();
        let gap = evs
            .time_of(EventType::VmStopped)
            .duration_since(running)
            .unwrap()
            .as_secs_f64();
        eprintln!(
            "record wall {:.3} s; VM start → stop {own:.3} s; qemu seen gone {seen:.3} s after \
             its start; vm.running → vm.stopped {gap:.3} s",
            r.wall_seconds
        );
        assert!(
            r.wall_seconds >= 3.0 && r.wall_seconds <= seen,
            "wall {} s; the payload sleeps 3 s; qemu seen gone {seen} s after its start",
            r.wall_seconds
        );
        assert!(
            (r.wall_seconds - own).abs() <= 0.05,
            "wall {} s vs the VM's start → stop {own} s",
            r.wall_seconds
        );
        assert!(
            evs.time_of(EventType::VmStopped) > gone,
            "vm.stopped was published before qemu was seen gone: {}",
            evs.names()
        );
        if launcher_uses_cgroups(&stack) {
            check_cpu_and_memory(&r);
        } else {
            // `/proc` samples (hosts without usable cgroups, services/launcher/src/usage.rs): nothing is
            // sampled while the launcher is down, so CPU and peak memory are those of the last
            // sample persisted before the crash (the first one is persisted at once) — a
            // lower bound, documented; only its plausibility is checked.
            assert!(
                r.cpu_seconds > 0.0 && r.cpu_seconds <= r.wall_seconds * r.cores as f64,
                "{r:#?}"
            );
            let peak = r.peak_memory_bytes as f64;
            assert!(peak > 0.0 && peak <= mem_total_bytes(), "{r:#?}");
            assert_eq!(
                (r.vo.as_str(), r.uid, r.gid),
                ("demo", Some(65534), Some(65534))
            );
        }
        all_prepared_released(&stack, job).await;
        no_leftovers(&stack).await;
    });
}

fn vm_launcher_stopped_with_sigterm_leaves_the_vm_running_and_reports_it_after_the_restart() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut stack = Stack::start(options(work.path(), None)).await.unwrap();
        let job = "stop-running-1";
        let (submit, _, qemu) = running_job(&stack, job, CRASH_PAYLOAD).await;
        let launcher = stack.service_pid("launcher").unwrap();
        stack.stop_service("launcher").unwrap(); // SIGTERM; returns once it has exited
        assert!(!alive(launcher), "the launcher is still running");
        assert!(
            alive(qemu),
            "qemu {qemu} died with the launcher's clean stop"
        );
        stack.start_service("launcher").await.unwrap();
        let (_, r) = ended_as_crash_payload(&stack, job, submit).await;
        let evs = stack.run_events(job).await.unwrap();
        assert_eq!(evs.count(EventType::VmStopped), 1, "{}", evs.names());
        check_usage(&r, &evs);
        all_prepared_released(&stack, job).await;
        no_leftovers(&stack).await;
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Exactly once at the stack level

fn vm_a_republished_vm_stopped_after_an_accounting_restart_is_not_recorded_twice() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut stack = Stack::start(options(work.path(), None)).await.unwrap();
        let job = "dup-stopped-1";
        let out = stack
            .submit(&SubmitArgs::script(job, "echo once\nexit 4\n"))
            .await
            .unwrap();
        assert_eq!(out.exit_code, 4, "{out:#?}");
        let first = one_usage_record(&stack, job).await;
        no_leftovers(&stack).await;

        stack.stop_service("accounting").unwrap();
        stack.start_service("accounting").await.unwrap();

        // The stored vm.stopped message of the run, as it is in the stream.
        let client = wnodes_bus::connect::connect(&stack.nats_admin(), "test", None, None)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(wnodes_bus::subject::EVENTS_STREAM)
            .await
            .unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut original = None;
        for seq in 1..=last {
            let msg = stream.get_raw_message(seq).await.unwrap();
            let ev = <proto::Event as prost::Message>::decode(msg.payload.as_ref()).unwrap();
            if ev.run.as_ref().map(wnodes_bus::event::run_key) == Some(out.run_key.clone())
                && matches!(ev.body, Some(Body::VmStopped(_)))
            {
                original = Some(msg);
            }
        }
        let original = original.expect("the run's vm.stopped in the stream");
        let mut headers = original.headers.clone();
        let old_id = headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .expect("a Nats-Msg-Id");
        let new_id = format!("{old_id}:republished");
        headers.insert("Nats-Msg-Id", new_id.as_str());

        let bus = BusClient::new(&stack.nats_admin())
            .name("job-failures-test@local")
            .without_streams()
            .connect()
            .await
            .unwrap();
        let published = bus
            .publish_raw(
                original.subject.as_str(),
                headers,
                original.payload.clone(),
                "test.republish",
            )
            .await
            .unwrap();
        assert!(!published.duplicate, "the new Nats-Msg-Id was deduplicated");
        assert!(published.sequence > original.sequence);
        let evs = stack.run_events(job).await.unwrap();
        assert_eq!(evs.count(EventType::VmStopped), 2, "{}", evs.names());

        accounting_caught_up(&stack).await;
        let recs = stack.usage_record(job).await.unwrap();
        assert_eq!(recs.len(), 1, "one record after the duplicate: {recs:#?}");
        assert_eq!(recs[0], first, "the record was rewritten");
        let evs = stack.run_events(job).await.unwrap();
        assert_eq!(evs.count(EventType::UsageRecorded), 1, "{}", evs.names());
        no_leftovers(&stack).await;
    });
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(sync vm_a_vo_without_an_image_or_too_much_scratch_fails_in_policy_with_exit_125 needs JOB_NEEDS),
        host_test!(sync vm_an_image_with_a_wrong_digest_fails_after_scratch_and_network_and_releases_them needs JOB_NEEDS),
        host_test!(sync vm_an_image_whose_file_is_missing_fails_with_the_whole_chain_once_in_the_log needs JOB_NEEDS),
        host_test!(sync vm_sigterm_to_submit_while_the_vm_runs_stops_it_as_cancelled_and_exits_143 needs JOB_NEEDS),
        host_test!(sync vm_sigterm_to_submit_while_preparing_fails_the_vm_as_cancelled_and_releases_late_results needs JOB_NEEDS),
        host_test!(sync vm_sigterm_to_submit_while_scratch_is_down_releases_the_scratch_prepared_after_the_cancel needs JOB_NEEDS),
        host_test!(sync vm_launcher_killed_while_the_vm_runs_is_restarted_and_the_job_ends_once_in_its_trace needs JOB_NEEDS),
        host_test!(sync vm_a_vm_that_ends_while_the_launcher_is_down_is_reported_once_after_the_restart needs JOB_NEEDS),
        host_test!(sync vm_launcher_stopped_with_sigterm_leaves_the_vm_running_and_reports_it_after_the_restart needs JOB_NEEDS),
        host_test!(sync vm_a_republished_vm_stopped_after_an_accounting_restart_is_not_recorded_twice needs JOB_NEEDS),
    ])
}
