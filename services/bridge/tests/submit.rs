//! `wnodes-bridge submit` (the real binary) against a real nats-server and a fake launcher.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{process::Stdio, time::Duration};

use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use wnodes_bus::{Bus, EventExt, proto, proto::event::Body, subject};
use wnodes_testkit::{NatsServer, events::Events};

const HOST: &str = "hv1.example.org";

async fn connect(nats: &NatsServer) -> Bus {
    wnodes_testkit::bus::connect(&nats.admin(), "launcher@hv1.example.org")
        .await
        .unwrap()
}

/// How the fake launcher answers a `JobStarted`.
#[derive(Debug, Clone)]
enum Answer {
    /// The VM runs and stops with this exit code and output.
    Stop(i32, &'static str),
    /// The VM stops with this exit code; its output is in the file at this path.
    StopWithFile(i32, String),
    /// The VM fails with this reason.
    Fail(&'static str),
    /// The VM runs until the job is cancelled.
    RunUntilCancelled,
}

/// Answers the job's events the way the launcher would; reports every job event it saw.
async fn fake_launcher(bus: &Bus, answer: Answer) -> mpsc::UnboundedReceiver<proto::Event> {
    let mut sub = bus
        .client()
        .subscribe(format!(
            "wnodes.evt.{}.job.>",
            subject::encode_host(HOST).unwrap()
        ))
        .await
        .unwrap();
    bus.client().flush().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let bus = bus.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let ev = proto::Event::decode(msg.payload.clone()).unwrap();
            let run = ev.run.clone().unwrap();
            let publish = |body: Body| {
                let bus = bus.clone();
                let ev = Events::new(HOST, "launcher@test").build(&run, body);
                async move { bus.publish(&ev).await.unwrap() }
            };
            let vm_id = "vm-0123456789ab".to_owned();
            match &ev.body {
                Some(Body::JobStarted(_)) => {
                    publish(Body::VmRequested(proto::VmRequested {
                        spec: Some(proto::VmSpec {
                            vm_id: vm_id.clone(),
                            ..Default::default()
                        }),
                    }))
                    .await;
                    match &answer {
                        Answer::Fail(reason) => {
                            publish(Body::VmFailed(proto::VmFailed {
                                vm_id,
                                reason: (*reason).into(),
                                phase: "policy".into(),
                            }))
                            .await;
                        }
                        Answer::Stop(code, output) => {
                            publish(Body::VmRunning(proto::VmRunning {
                                vm_id: vm_id.clone(),
                                pid: 4242,
                                accel: "tcg".into(),
                                started_at: None,
                            }))
                            .await;
                            publish(Body::VmStopped(proto::VmStopped {
                                vm_id,
                                exit_code: *code,
                                stop_reason: "guest-poweroff".into(),
                                output_tail: (*output).into(),
                                ..Default::default()
                            }))
                            .await;
                        }
                        Answer::StopWithFile(code, path) => {
                            publish(Body::VmStopped(proto::VmStopped {
                                vm_id,
                                exit_code: *code,
                                stop_reason: "guest-poweroff".into(),
                                output_location: path.clone(),
                                output_tail: "only the tail\n".into(),
                                ..Default::default()
                            }))
                            .await;
                        }
                        Answer::RunUntilCancelled => {
                            publish(Body::VmRunning(proto::VmRunning {
                                vm_id,
                                pid: 4242,
                                accel: "tcg".into(),
                                started_at: None,
                            }))
                            .await;
                        }
                    }
                }
                Some(Body::JobCancelled(_)) => {
                    // The teardown takes a moment: the job starter must wait for it.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    publish(Body::VmStopped(proto::VmStopped {
                        vm_id,
                        exit_code: 137,
                        stop_reason: "cancelled".into(),
                        output_tail: "partial output\n".into(),
                        ..Default::default()
                    }))
                    .await;
                }
                _ => {}
            }
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    rx
}

fn submit(nats: &NatsServer, args: &[&str]) -> tokio::process::Command {
    submit_with_env(nats, args, &[])
}

fn submit_with_env(
    nats: &NatsServer,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wnodes-bridge"));
    let agent = nats.creds(&wnodes_bus::roles::AGENT, HOST).unwrap();
    cmd.env_remove("WNODES_CONFIG")
        .env("WNODES_NATS__URL", nats.url())
        .env(
            "WNODES_NATS__CREDS_FILE",
            agent.creds_file.unwrap_or_default(),
        )
        .env("WNODES_HOST", HOST)
        .env("WNODES_SITE", "INFN-T1")
        .arg("submit")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<proto::Event>, ty: &str) -> proto::Event {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {ty} in time"))
            .expect("the fake launcher stopped");
        if ev.event_type().map(|t| t.name()) == Some(ty) {
            return ev;
        }
    }
}

async fn finish(child: tokio::process::Child) -> (i32, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("submit exits in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {:?}\n{stderr}", out.status));
    (code, stdout, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_exits_with_the_payload_exit_code_and_prints_its_output() {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let mut seen = fake_launcher(&bus, Answer::Stop(3, "hello from the guest\n")).await;
    let otlp = wnodes_testkit::OtlpCollector::start().await.unwrap();
    let endpoint = otlp.endpoint();
    let child = submit_with_env(
        &nats,
        &[
            "--vo",
            "atlas",
            "--uid",
            "1000",
            "--gid",
            "100",
            "--cores",
            "2",
            "--job-id",
            "77.0",
            "--lrms",
            "htcondor",
            "--",
            "/bin/sh",
            "-c",
            "echo hello; exit 3",
        ],
        &[("WNODES_OTLP_ENDPOINT", endpoint.as_str())],
    )
    .spawn()
    .unwrap();
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, 3, "stderr:\n{stderr}");
    assert_eq!(stdout, "hello from the guest\n");
    for line in [
        "job.started",
        "vm.requested",
        "vm.running",
        "vm.stopped",
        "exit code 3",
    ] {
        assert!(
            stderr.contains(line),
            "{line:?} missing in stderr:\n{stderr}"
        );
    }

    let started = next_event(&mut seen, "job.started").await;
    assert_eq!(started.id, "job.started:INFN-T1/htcondor/77.0/1");
    let Some(Body::JobStarted(js)) = started.body else {
        panic!("not a JobStarted");
    };
    let job = js.job.unwrap();
    assert_eq!(job.vo, "atlas");
    assert_eq!(
        job.owner.as_ref().map(|o| (o.uid, o.gid)),
        Some((1000, 100))
    );
    assert_eq!(job.resources.as_ref().map(|r| r.cores), Some(2));
    assert_eq!(
        job.payload.and_then(|p| p.kind),
        Some(proto::job_payload::Kind::Command(proto::JobCommand {
            executable: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hello; exit 3".into()],
        }))
    );
    let finished = next_event(&mut seen, "job.finished").await;
    assert!(matches!(finished.body, Some(Body::JobFinished(ref f)) if f.exit_code == 3));

    // `wnodes.run` is the root of the job's trace, its ids derived from the run key;
    // `bridge.job_started` is its child; the trace id is the one printed.
    let spans = otlp
        .wait_for(Duration::from_secs(10), "the bridge's spans", |s| {
            s.iter().any(|s| s.name == "bridge.job_finished")
                && s.iter().any(|s| s.name == "wnodes.run")
        })
        .await
        .unwrap();
    let run = spans
        .iter()
        .find(|s| s.name == "wnodes.run")
        .expect("a wnodes.run span");
    assert_eq!(run.parent_span_id, "", "not a root: {run:?}");
    let (trace, span) = wnodes_bus::propagation::run_ids("INFN-T1/htcondor/77.0/1");
    assert_eq!(
        (run.trace_id.as_str(), run.span_id.as_str()),
        (trace.to_string().as_str(), span.to_string().as_str()),
        "the run's ids are derived from its run key"
    );
    let root = spans
        .iter()
        .find(|s| s.name == "bridge.job_started")
        .expect("a bridge.job_started span");
    assert_eq!(
        (root.trace_id.as_str(), root.parent_span_id.as_str()),
        (run.trace_id.as_str(), run.span_id.as_str())
    );
    assert!(
        stderr.contains(&format!("(trace {})", root.trace_id)),
        "stderr:\n{stderr}"
    );
    let fin = spans
        .iter()
        .find(|s| s.name == "bridge.job_finished")
        .unwrap();
    assert_eq!(
        (fin.trace_id.as_str(), fin.parent_span_id.as_str()),
        (root.trace_id.as_str(), root.span_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_exits_125_with_the_reason_when_the_vm_fails() {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let reason = "no image configured for VO 'lhcb'";
    let mut seen = fake_launcher(&bus, Answer::Fail(reason)).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("job.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let child = submit(
        &nats,
        &["--vo", "lhcb", "--script", script.to_str().unwrap()],
    )
    .spawn()
    .unwrap();
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, 125, "stderr:\n{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains(reason), "stderr:\n{stderr}");
    let started = next_event(&mut seen, "job.started").await;
    let Some(Body::JobStarted(js)) = started.body else {
        panic!("not a JobStarted");
    };
    assert_eq!(
        js.job.and_then(|j| j.payload).and_then(|p| p.kind),
        Some(proto::job_payload::Kind::InlineScript(
            b"#!/bin/sh\necho hi\n".to_vec()
        ))
    );
    let finished = next_event(&mut seen, "job.finished").await;
    assert!(matches!(finished.body, Some(Body::JobFinished(ref f)) if f.exit_code == 125));
}

async fn signal_cancels_the_job_after_the_teardown(
    signal: nix::sys::signal::Signal,
    job_id: &str,
    expected: i32,
) {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let mut seen = fake_launcher(&bus, Answer::RunUntilCancelled).await;
    let child = submit(&nats, &["--job-id", job_id, "--", "/bin/sleep", "3600"])
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    next_event(&mut seen, "job.started").await;
    nix::sys::signal::kill(pid, signal).unwrap();
    let cancelled = next_event(&mut seen, "job.cancelled").await;
    assert_eq!(
        cancelled.id,
        format!("job.cancelled:INFN-T1/unknown/{job_id}/1")
    );
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, expected, "stderr:\n{stderr}");
    // It waited for the teardown: the VM's stop (and its output) came before the exit.
    assert_eq!(stdout, "partial output\n");
    assert!(stderr.contains(signal.as_str()), "stderr:\n{stderr}");
    assert!(stderr.contains("(cancelled)"), "stderr:\n{stderr}");
    let finished = next_event(&mut seen, "job.finished").await;
    assert!(matches!(finished.body, Some(Body::JobFinished(ref f)) if f.exit_code == expected));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cancels_the_job_and_exits_143_after_the_teardown() {
    signal_cancels_the_job_after_the_teardown(nix::sys::signal::Signal::SIGTERM, "99", 143).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_cancels_the_job_and_exits_130_after_the_teardown() {
    signal_cancels_the_job_after_the_teardown(nix::sys::signal::Signal::SIGINT, "98", 130).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_prints_the_output_file_when_it_is_readable() {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm-0123456789ab.out");
    std::fs::write(&path, "line 1\nline 2\nthe whole output\n").unwrap();
    let path = path.to_str().unwrap().to_owned();
    let _seen = fake_launcher(&bus, Answer::StopWithFile(0, path)).await;
    let child = submit(&nats, &["--", "/bin/true"]).spawn().unwrap();
    let (code, stdout, stderr) = finish(child).await;
    assert_eq!(code, 0, "stderr:\n{stderr}");
    assert_eq!(stdout, "line 1\nline 2\nthe whole output\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_rejects_a_bad_job_naming_the_field_before_publishing() {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let child = submit(&nats, &["--job-id", "a/b", "--", "/bin/true"])
        .spawn()
        .unwrap();
    let (code, _, stderr) = finish(child).await;
    assert_eq!(code, 64, "stderr:\n{stderr}");
    assert!(stderr.contains("job.run.job_id"), "stderr:\n{stderr}");
    let child = submit(&nats, &["--host", "Not_A_Host", "--", "/bin/true"])
        .spawn()
        .unwrap();
    let (code, _, stderr) = finish(child).await;
    assert_eq!(code, 64, "stderr:\n{stderr}");
    assert!(stderr.contains("job.host"), "stderr:\n{stderr}");
    let mut stream = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}
