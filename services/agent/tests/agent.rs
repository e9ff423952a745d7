//! `wnodes-agent` (the real binary) with a real nats-server, real job starters
//! (`wnodes-bridge job-starter`, run as another user when root) and a fake launcher that
//! answers the run's events as the launcher would. The Slurm side (who a job is) is tested
//! against a real Slurm in `integration-tests/tests/slurm.rs`; here, the protocol: refusals
//! with reasons, the development identity behind its switch, uid and gid from the socket, the
//! output and exit code back to the starter, and a starter that dies or an agent that restarts
//! cancelling the run.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::Path, process::Stdio, time::Duration};

use prost::Message;
use tokio::net::UnixStream;
use wnodes_bridge::agent_wire::{read_msg, write_msg};
use wnodes_bus::{
    proto,
    proto::{agent_message::Kind as Reply, event::Body, starter_message::Kind as Ask},
};
use wnodes_testkit::NatsServer;

mod common;

use common::*;

/// A job starter, as `OTHER_UID` when root, with an empty environment.
fn starter(socket: &Path, args: &[&str]) -> tokio::process::Command {
    let mut c = if is_root() {
        let mut c = tokio::process::Command::new("setpriv");
        c.args([
            format!("--reuid={OTHER_UID}"),
            format!("--regid={OTHER_UID}"),
            "--clear-groups".into(),
        ])
        .arg(bridge_bin());
        c
    } else {
        tokio::process::Command::new(bridge_bin())
    };
    c.arg("job-starter")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

fn expected_uid() -> u32 {
    if is_root() {
        OTHER_UID
    } else {
        nix::unistd::getuid().as_raw()
    }
}

/// Sends `req` from this process and returns the agent's first answer.
async fn ask(socket: &Path, msg: &[u8]) -> proto::AgentMessage {
    use tokio::io::AsyncWriteExt;
    let mut s = UnixStream::connect(socket).await.unwrap();
    s.write_all(msg).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), read_msg(&mut s))
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an answer before the close")
}

fn framed(msg: &proto::StarterMessage) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut v = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    v.extend(body);
    v
}

fn start_msg(lrms: proto::Lrms, dev_job: Option<&str>) -> proto::StarterMessage {
    proto::StarterMessage {
        kind: Some(Ask::Start(proto::StartRequest {
            lrms: lrms as i32,
            payload: Some(proto::JobPayload {
                kind: Some(proto::job_payload::Kind::Command(proto::JobCommand {
                    executable: "/bin/true".into(),
                    args: vec![],
                })),
                ..Default::default()
            }),
            dev: dev_job.map(|j| proto::DevIdentity {
                job_id: j.into(),
                run_attempt: 1,
                vo: "atlas".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn refused(m: &proto::AgentMessage) -> (String, i32) {
    match &m.kind {
        Some(Reply::Refused(r)) => (r.reason.clone(), r.exit_code),
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn starters_are_refused_with_a_reason_and_nothing_is_published() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(0, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&nats, dir.path(), false).await;

    // A development identity, with the switch off.
    let (reason, code) = refused(
        &ask(
            &agent.socket,
            &framed(&start_msg(proto::Lrms::Slurm, Some("j1"))),
        )
        .await,
    );
    assert_eq!(code, 77);
    assert!(reason.contains("allow_dev_identity"), "{reason}");
    // A batch system the agent is not configured for.
    let (reason, code) = refused(
        &ask(
            &agent.socket,
            &framed(&start_msg(proto::Lrms::Htcondor, None)),
        )
        .await,
    );
    assert_eq!(code, 77);
    assert!(reason.contains("slurm only, not of htcondor"), "{reason}");
    // Bytes that are no request; a cancel before any start.
    let (reason, code) = refused(&ask(&agent.socket, &[0, 0, 0, 3, 0xff, 0xff, 0xff]).await);
    assert_eq!(code, 64);
    assert!(reason.contains("malformed"), "{reason}");
    let cancel = proto::StarterMessage {
        kind: Some(Ask::Cancel(proto::CancelRequest::default())),
    };
    let (reason, _) = refused(&ask(&agent.socket, &framed(&cancel)).await);
    assert!(reason.contains("first message must be a start"), "{reason}");
    // The real job starter, as another user, with the development flags.
    let out = starter(&agent.socket, &["--dev-job-id", "j2", "--", "/bin/true"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains("allow_dev_identity is off"), "{stderr}");
    // Nothing reached the bus, and the agent still serves.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), seen.recv())
            .await
            .is_err()
    );
    assert!(agent.socket.exists());
    let metrics = agent.proc.stderr();
    assert!(metrics.contains("Job starter refused"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_takes_uid_and_gid_from_the_socket_and_returns_output_and_exit_code() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(3, "hello from the guest\n")).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&nats, dir.path(), true).await;
    let child = starter(
        &agent.socket,
        &[
            "--dev-job-id",
            "dev-1",
            "--dev-vo",
            "atlas",
            "--env",
            "A=1",
            "--",
            "/bin/sh",
            "-c",
            "exit 3",
        ],
    )
    .spawn()
    .unwrap();
    let started = next_event(&mut seen, &agent, "job.started").await;
    let Some(Body::JobStarted(js)) = &started.body else {
        unreachable!()
    };
    let job = js.job.clone().unwrap();
    let owner = job.owner.unwrap();
    assert_eq!(owner.uid, expected_uid(), "the uid is the socket peer's");
    assert_eq!(job.vo, "atlas");
    assert_eq!(job.host, HOST);
    assert_eq!(job.run.as_ref().unwrap().job_id, "dev-1");
    assert_eq!(
        job.payload
            .unwrap()
            .environment
            .get("A")
            .map(String::as_str),
        Some("1")
    );
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the guest\n"
    );
    assert!(
        stderr.contains("vm.running vm-0123456789ab"),
        "progress reaches the starter: {stderr}"
    );
    let finished = next_event(&mut seen, &agent, "job.finished").await;
    let Some(Body::JobFinished(f)) = finished.body else {
        unreachable!()
    };
    assert_eq!(f.exit_code, 3);
    // A second starter for the same run while none is connected is a new start (the launcher
    // dedups); two at once are refused: see the next test.
}

#[tokio::test(flavor = "multi_thread")]
async fn a_starter_killed_with_sigkill_cancels_its_run_and_a_second_starter_is_refused() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::RunUntilCancelled).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&nats, dir.path(), true).await;
    let mut child = starter(
        &agent.socket,
        &["--dev-job-id", "dev-2", "--", "/bin/sleep", "600"],
    )
    .spawn()
    .unwrap();
    next_event(&mut seen, &agent, "job.started").await;
    // A second starter for the same run while the first is connected.
    let (reason, code) = refused(
        &ask(
            &agent.socket,
            &framed(&start_msg(proto::Lrms::Unspecified, Some("dev-2"))),
        )
        .await,
    );
    assert_eq!(code, 77);
    assert!(reason.contains("already has a job starter"), "{reason}");
    // SIGKILL: no chance to say anything; the agent sees the connection close.
    let t0 = std::time::Instant::now();
    child.start_kill().unwrap();
    let cancelled = next_event(&mut seen, &agent, "job.cancelled").await;
    let elapsed = t0.elapsed();
    let Some(Body::JobCancelled(c)) = cancelled.body else {
        unreachable!()
    };
    assert!(c.reason.contains("went away"), "{}", c.reason);
    let finished = next_event(&mut seen, &agent, "job.finished").await;
    let Some(Body::JobFinished(f)) = finished.body else {
        unreachable!()
    };
    assert_eq!(f.exit_code, 137);
    eprintln!("JobCancelled {elapsed:?} after the SIGKILL");
    // Nothing is left live: the run's record is gone.
    let runs = dir.path().join("state/runs");
    wnodes_testkit::wait_until(
        Duration::from_secs(10),
        "the live-run record removed",
        || async {
            std::fs::read_dir(&runs)
                .ok()?
                .next()
                .is_none()
                .then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_restarts_cancels_the_runs_of_the_starters_it_lost() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::RunUntilCancelled).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&nats, dir.path(), true).await;
    let child = starter(
        &agent.socket,
        &["--dev-job-id", "dev-3", "--", "/bin/sleep", "600"],
    )
    .spawn()
    .unwrap();
    next_event(&mut seen, &agent, "job.started").await;
    agent.proc.kill().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("host agent"), "{stderr}");
    drop(agent);
    let agent = start_agent(&nats, dir.path(), true).await;
    let cancelled = next_event(&mut seen, &agent, "job.cancelled").await;
    let Some(Body::JobCancelled(c)) = cancelled.body else {
        unreachable!()
    };
    assert!(c.reason.contains("restarted"), "{}", c.reason);
    assert_eq!(cancelled.run.unwrap().job_id, "dev-3");
}

/// The frame helpers talk to the agent too (a start and a cancel from this process).
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_request_ends_the_run_with_the_cancel_s_exit_code() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::RunUntilCancelled).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&nats, dir.path(), true).await;
    let mut s = UnixStream::connect(&agent.socket).await.unwrap();
    write_msg(&mut s, &start_msg(proto::Lrms::Unspecified, Some("dev-4")))
        .await
        .unwrap();
    let first: proto::AgentMessage = read_msg(&mut s).await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(Reply::Accepted(_))), "{first:?}");
    next_event(&mut seen, &agent, "job.started").await;
    let cancel = proto::StarterMessage {
        kind: Some(Ask::Cancel(proto::CancelRequest {
            reason: "SIGTERM received by the job starter".into(),
            exit_code: 143,
        })),
    };
    write_msg(&mut s, &cancel).await.unwrap();
    let c = next_event(&mut seen, &agent, "job.cancelled").await;
    let Some(Body::JobCancelled(c)) = c.body else {
        unreachable!()
    };
    assert_eq!(c.reason, "SIGTERM received by the job starter");
    let done = loop {
        let m: proto::AgentMessage =
            tokio::time::timeout(Duration::from_secs(20), read_msg(&mut s))
                .await
                .unwrap()
                .unwrap()
                .expect("a Done before the close");
        if let Some(Reply::Done(d)) = m.kind {
            break d;
        }
    };
    assert_eq!(done.exit_code, 143, "{}", done.message);
    assert!(done.message.contains("cancelled"), "{}", done.message);
}

/// A VM stopped without the payload's exit code (killed at its walltime or output limit: the
/// launcher says -1) is no success: 255, as `submit` says.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_stopped_without_an_exit_code_ends_the_job_with_255() {
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(-1, "cut short\n")).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&nats, dir.path(), true).await;
    let out = starter(&agent.socket, &["--dev-job-id", "dev-5", "--", "/bin/true"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    let finished = next_event(&mut seen, &agent, "job.finished").await;
    let Some(Body::JobFinished(f)) = finished.body else {
        unreachable!()
    };
    assert_eq!(f.exit_code, 255);
}

/// A WLCG token, verified offline against the issuer's keys from the agent's configuration,
/// names the job's VO (over any other) and its subject, issuer and groups; an expired token,
/// one from an issuer the site does not trust, and a forged one are refused with their reason,
/// and nothing is published for them.
#[tokio::test(flavor = "multi_thread")]
async fn a_verified_token_names_the_vo_and_bad_tokens_are_refused_with_their_reason() {
    use wnodes_identity::token::testing::TestIssuer;
    let nats = NatsServer::start().await.unwrap();
    let mut seen = fake_launcher(&nats, Answer::Stop(0, "ok\n")).await;
    let dir = tempfile::tempdir().unwrap();
    let atlas = TestIssuer::new("https://atlas-auth.example/");
    let jwks = dir.path().join("atlas.jwks");
    std::fs::write(&jwks, atlas.jwks()).unwrap();
    let agent = start_agent_with(&nats, dir.path(), true, |c| {
        c.push(
            "agent.identity.token_issuers",
            &[
                ("issuer", atlas.issuer.as_str().into()),
                ("vo", "atlas".into()),
                ("jwks", jwks.as_path().into()),
            ],
        )
    })
    .await;
    let now = wnodes_identity::unix_now();
    // The starter reads its token from BEARER_TOKEN_FILE, a file of the job's user.
    let with_token = |name: &str, token: &str, job: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let mut c = starter(
            &agent.socket,
            &[
                "--dev-job-id",
                job,
                "--dev-vo",
                "othervo",
                "--",
                "/bin/true",
            ],
        );
        c.env("BEARER_TOKEN_FILE", &path);
        c
    };
    let good = atlas.token(
        "alice-sub",
        now,
        serde_json::json!({"wlcg.groups": ["/atlas/production", "/atlas"]}),
    );
    let out = with_token("good.jwt", &good, "tok-1")
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = next_event(&mut seen, &agent, "job.started").await;
    let Some(Body::JobStarted(js)) = &started.body else {
        unreachable!()
    };
    let job = js.job.clone().unwrap();
    assert_eq!(
        job.vo, "atlas",
        "the token's VO, not the starter's --dev-vo"
    );
    let id = job.identity.unwrap();
    assert_eq!(
        (id.token_subject.as_str(), id.token_issuer.as_str()),
        ("alice-sub", "https://atlas-auth.example/")
    );
    assert_eq!(id.token_groups, ["/atlas/production", "/atlas"]);
    assert_eq!(
        job.payload
            .unwrap()
            .environment
            .get("WNODES_VO")
            .map(String::as_str),
        Some("atlas")
    );
    next_event(&mut seen, &agent, "job.finished").await;

    let expired = atlas.token("alice-sub", now - 7200, serde_json::json!({}));
    let rogue = TestIssuer::new("https://rogue.example/").token("x", now, serde_json::json!({}));
    let forged =
        TestIssuer::new("https://atlas-auth.example/").token("x", now, serde_json::json!({}));
    for (name, token, why) in [
        ("expired.jwt", expired, "the token expired at"),
        ("rogue.jwt", rogue, "is not a trusted issuer of this site"),
        ("forged.jwt", forged, "signature does not verify"),
    ] {
        let out = with_token(name, &token, name).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{name}: {stderr}");
        assert!(
            stderr.contains("the bearer token is refused"),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(why), "{name}: {stderr}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), seen.recv())
            .await
            .is_err(),
        "a refused token published something"
    );
}
