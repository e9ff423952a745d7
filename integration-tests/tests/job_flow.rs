//! The job flow end to end: nats-server and the seven services as separate processes
//! (`wnodes-devstack`), real qemu VMs (TCG) booted from the test guest, tap networking with the
//! nftables filter and the sshfs gateway, all inside a private network namespace that each test
//! enters before its runtime starts (nextest runs every test in its own process). Tests are named
//! `vm_*`: they boot VMs and run one at a time (`.config/nextest.toml`).
//!
//! Needs root, `/dev/fuse`, qemu, the test guest (`guest/build.sh`) and the service binaries
//! (`cargo build --workspace --bins`). Host tests (`wnodes_testkit::host`, `wnodes_testkit::vm::JOB_NEEDS`): where
//! a precondition is missing they are skipped, or fail naming it under `WNODES_HOST_TESTS=required`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::{
    collections::BTreeSet,
    os::unix::fs::{MetadataExt, PermissionsExt},
    time::Duration,
};

use wnodes_bus::EventType;
use wnodes_devstack::{ImageServing, NetworkChoice, Stack, SubmitArgs};
use wnodes_integration_tests::jobs::{
    check_cpu_and_memory, in_private_netns, no_leftovers, one_usage_record, seven_services,
    tap_options as options,
};
use wnodes_testkit::{
    OtlpCollector,
    events::RunEvents,
    host, host_test,
    otlp::{one_trace, spans_by_service as by_service, trace_id_in},
    vm::JOB_NEEDS,
    wait_until,
};

const LONG: Duration = Duration::from_secs(60);

/// The record agrees with the run's events and with the machine.
async fn check_usage(stack: &Stack, job_id: &str, exit_code: i64) {
    let r = one_usage_record(stack, job_id).await;
    assert_eq!(r.exit_code, exit_code, "{r:#?}");
    let events = stack.run_events(job_id).await.unwrap();
    let running = events.time_of(EventType::VmRunning);
    let stopped = events.time_of(EventType::VmStopped);
    let between = stopped.duration_since(running).unwrap().as_secs_f64();
    assert!(
        (r.wall_seconds - between).abs() <= 0.5,
        "wall {} s vs vm.running → vm.stopped {between} s",
        r.wall_seconds
    );
    check_cpu_and_memory(&r);
}

const SUBMIT_PAYLOAD: &str = r#"echo "hello from $(hostname)" > /shared/hello.txt || exit 10
cat /shared/hello.txt
if echo x > /shared/rootdir/f 2>/dev/null; then echo "rootdir: written"; else echo "rootdir: denied"; fi
echo "uid=$(id -u)"
exit 0
"#;

fn vm_jobs_via_submit_and_grpc_return_exit_codes_are_accounted_once_and_leave_nothing() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let stack = Stack::start(options(work.path(), None)).await.unwrap();
        // A root-owned directory inside the export: the job's uid must not write there.
        let rootdir = stack.export_dir().join("rootdir");
        std::fs::create_dir(&rootdir).unwrap();
        std::fs::set_permissions(&rootdir, std::fs::Permissions::from_mode(0o755)).unwrap();

        // 1. The job starter, as the LRMS runs it.
        let out = stack
            .submit(&SubmitArgs::script("flow-submit-1", SUBMIT_PAYLOAD))
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{out:#?}");
        assert!(out.stdout.contains("hello from wnodes-guest"), "{out:#?}");
        assert!(out.stdout.contains("rootdir: denied"), "{out:#?}");
        assert!(out.stdout.contains("uid=65534"), "{out:#?}");
        let hello = stack.export_dir().join("hello.txt");
        assert_eq!(
            std::fs::read_to_string(&hello).unwrap(),
            "hello from wnodes-guest\n"
        );
        let meta = std::fs::metadata(&hello).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65534),
            "owned by the job uid"
        );
        assert!(!rootdir.join("f").exists(), "written into a root-owned dir");
        check_usage(&stack, "flow-submit-1", 0).await;
        no_leftovers(&stack).await;

        // 2. The bridge's gRPC API, as an LRMS integration calls it.
        let out = stack
            .grpc_submit(&SubmitArgs::script(
                "flow-grpc-1",
                "echo from-grpc\nexit 3\n",
            ))
            .await
            .unwrap();
        assert_eq!(out.exit_code, 3, "{out:#?}");
        assert!(out.stdout.contains("from-grpc"), "{out:#?}");
        check_usage(&stack, "flow-grpc-1", 3).await;
        // JobFinished (sent after WaitJob returned) adds the LRMS's exit code to the record.
        wait_until(LONG, "the LRMS exit code in the usage record", || async {
            let recs = stack.usage_record(&out.run_key).await.ok()?;
            (recs.len() == 1 && recs[0].lrms_exit_code == Some(3)).then_some(())
        })
        .await
        .unwrap();
        no_leftovers(&stack).await;

        // The timeline has every phase of the flow.
        for job in ["flow-submit-1", "flow-grpc-1"] {
            let phases = wnodes_devstack::timeline(&stack.run_events(job).await.unwrap());
            eprintln!("timeline of {job}:");
            for p in &phases {
                eprintln!("  {:<40} {:>8.3} s", p.name, p.duration.as_secs_f64());
            }
            assert_eq!(phases.len(), 10, "{phases:#?}");
        }
    });
}

fn vm_a_job_is_one_trace_with_spans_from_all_seven_services() {
    in_private_netns(|| async {
        let collector = OtlpCollector::start().await.unwrap();
        let work = tempfile::tempdir().unwrap();
        // This test also fetches the image over HTTP (the other one uses file://).
        let mut opts = options(work.path(), Some(collector.endpoint()));
        opts.image_serving = ImageServing::Http;
        let stack = Stack::start(opts).await.unwrap();
        let out = stack
            .submit(&SubmitArgs::script("flow-trace-1", "echo traced\nexit 0\n"))
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{out:#?}");
        // "wnodes-bridge: job … started on … (trace <32 hex>)"
        let trace_id =
            trace_id_in(&out.stderr).unwrap_or_else(|| panic!("no trace id in {}", out.stderr));
        one_usage_record(&stack, "flow-trace-1").await;
        no_leftovers(&stack).await;
        // SIGTERM flushes every service's spans.
        drop(stack);
        let want = seven_services();
        let spans = collector
            .wait_for(
                Duration::from_secs(30),
                "spans of all seven services",
                |s| {
                    want.iter()
                        .all(|svc| by_service(s, &trace_id).contains_key(svc))
                },
            )
            .await
            .unwrap();
        let trace = one_trace(&spans, &trace_id);
        eprintln!(
            "trace {trace_id}: {} spans by service {:?}",
            trace.len(),
            by_service(&spans, &trace_id)
        );
        // One trace per job: no span about this run sits in another trace.
        let strays: Vec<_> = spans
            .iter()
            .filter(|s| {
                s.attributes.get("wnodes.run") == Some(&out.run_key) && s.trace_id != trace_id
            })
            .collect();
        assert!(
            strays.is_empty(),
            "spans of the run outside its trace: {strays:#?}"
        );
        assert!(
            trace
                .iter()
                .any(|s| s.attributes.get("wnodes.run") == Some(&out.run_key)),
            "no span carries wnodes.run = {}",
            out.run_key
        );
        let services: BTreeSet<String> = trace.iter().map(|s| s.service_name.clone()).collect();
        assert_eq!(services, want, "{:#?}", by_service(&spans, &trace_id));
    });
}

fn vm_a_crashed_service_is_restarted_and_the_next_job_runs() {
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut stack = Stack::start(options(work.path(), None)).await.unwrap();
        // A crash (SIGKILL) and a clean stop (SIGTERM), each followed by a restart that must
        // become ready again (reconcile on start, durable consumers resumed).
        let old = stack.service_pid("launcher").unwrap();
        stack.kill_service("launcher").unwrap();
        assert_eq!(stack.service_pid("launcher"), None);
        stack.start_service("launcher").await.unwrap();
        assert_ne!(stack.service_pid("launcher"), Some(old));
        stack.stop_service("gateway").unwrap();
        stack.start_service("gateway").await.unwrap();
        assert!(stack.start_service("nonesuch").await.is_err());
        // While the job runs, every kind of leftover the stack checks for exists (so the
        // empty lists after the job mean released, not "not looked for").
        let job = SubmitArgs::script(
            "flow-restart-1",
            "echo after-restart > /shared/r.txt\nsleep 3\nexit 0\n",
        );
        let seen = parking_lot::Mutex::new(BTreeSet::new());
        let during = async {
            let what = "every kind of resource held while the job runs";
            wait_until(LONG, what, || async {
                let l = stack.leftovers();
                let mut seen = seen.lock();
                for (kind, held) in [
                    ("scratch file", !l.scratch_files.is_empty()),
                    ("tap", !l.taps.is_empty()),
                    ("nft chain", !l.nft_chains.is_empty()),
                    ("gateway listener", !l.gateway_listeners.is_empty()),
                    ("sftp-server", !l.sftp_servers.is_empty()),
                    ("qemu", !l.qemus.is_empty()),
                ] {
                    if held {
                        seen.insert(kind);
                    }
                }
                (seen.len() == 6).then_some(())
            })
            .await
        };
        let (out, held) = tokio::join!(stack.submit(&job), during);
        let out = out.unwrap();
        held.unwrap_or_else(|e| panic!("{e}; seen: {:?}", seen.lock()));
        assert_eq!(out.exit_code, 0, "{out:#?}");
        assert_eq!(
            std::fs::read_to_string(stack.export_dir().join("r.txt")).unwrap(),
            "after-restart\n"
        );
        one_usage_record(&stack, "flow-restart-1").await;
        no_leftovers(&stack).await;
    });
}

fn vm_user_mode_networking_runs_a_job_through_the_gateway_on_loopback() {
    // The non-root demo's mode (qemu user networking, the gateway on 127.0.0.1), here still in
    // a private namespace so the listener is on this test's loopback only.
    in_private_netns(|| async {
        let work = tempfile::tempdir().unwrap();
        let mut opts = options(work.path(), None);
        opts.network = NetworkChoice::User;
        let stack = Stack::start(opts).await.unwrap();
        let out = stack
            .submit(&SubmitArgs::script(
                "flow-user-1",
                "echo user-mode > /shared/u.txt && cat /shared/u.txt\nexit 0\n",
            ))
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{out:#?}");
        assert!(out.stdout.contains("user-mode"), "{out:#?}");
        let meta = std::fs::metadata(stack.export_dir().join("u.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        check_usage(&stack, "flow-user-1", 0).await;
        no_leftovers(&stack).await;
    });
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(sync vm_jobs_via_submit_and_grpc_return_exit_codes_are_accounted_once_and_leave_nothing needs JOB_NEEDS),
        host_test!(sync vm_a_job_is_one_trace_with_spans_from_all_seven_services needs JOB_NEEDS),
        host_test!(sync vm_a_crashed_service_is_restarted_and_the_next_job_runs needs JOB_NEEDS),
        host_test!(sync vm_user_mode_networking_runs_a_job_through_the_gateway_on_loopback needs JOB_NEEDS),
    ])
}
