//! What the agent's test binaries share: a real agent process, a fake launcher answering its
//! events, and the `wnodes-bridge` binary whose `job-starter` the tests run.

// Each test binary uses a part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use wnodes_bus::{Bus, EventExt, proto, proto::event::Body, subject};
use wnodes_testkit::{NatsServer, events::Events, process::ServiceConfig, process::ServiceProcess};

pub const HOST: &str = "hv1.example.org";
/// The starters' user when the test runs as root (`nobody`).
pub const OTHER_UID: u32 = 65534;

/// How the fake launcher answers a `JobStarted`.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// The VM runs and stops with this exit code; its output is this tail.
    Stop(i32, &'static str),
    /// The VM runs until the job is cancelled.
    RunUntilCancelled,
}

/// Answers the job events of `HOST` the way the launcher would; reports every job event.
pub async fn fake_launcher(
    nats: &NatsServer,
    answer: Answer,
) -> mpsc::UnboundedReceiver<proto::Event> {
    let bus: Bus = wnodes_testkit::bus::connect(&nats.admin(), "launcher@hv1.example.org")
        .await
        .unwrap();
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
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let ev = proto::Event::decode(msg.payload.clone()).unwrap();
            let run = ev.run.clone().unwrap();
            let events = Events::new(HOST, "launcher@test");
            let vm_id = "vm-0123456789ab".to_owned();
            let running = Body::VmRunning(proto::VmRunning {
                vm_id: vm_id.clone(),
                pid: 4242,
                accel: "tcg".into(),
                started_at: None,
            });
            match (&ev.body, answer) {
                (Some(Body::JobStarted(_)), Answer::Stop(code, tail)) => {
                    bus.publish(&events.build(&run, running)).await.unwrap();
                    let stopped = Body::VmStopped(proto::VmStopped {
                        vm_id,
                        exit_code: code,
                        stop_reason: "guest-poweroff".into(),
                        output_tail: tail.into(),
                        ..Default::default()
                    });
                    bus.publish(&events.build(&run, stopped)).await.unwrap();
                }
                (Some(Body::JobStarted(_)), Answer::RunUntilCancelled) => {
                    bus.publish(&events.build(&run, running)).await.unwrap();
                }
                (Some(Body::JobCancelled(_)), _) => {
                    let stopped = Body::VmStopped(proto::VmStopped {
                        vm_id,
                        exit_code: 137,
                        stop_reason: "cancelled".into(),
                        output_tail: "partial output\n".into(),
                        ..Default::default()
                    });
                    bus.publish(&events.build(&run, stopped)).await.unwrap();
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

/// The next `ty` event the fake launcher saw; the agent's log in the failure report.
pub async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<proto::Event>,
    agent: &AgentProc,
    ty: &str,
) -> proto::Event {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {ty} in time; the agent said:\n{}", agent.proc.stderr()))
            .expect("the fake launcher stopped");
        if ev.event_type().map(|t| t.name()) == Some(ty) {
            return ev;
        }
    }
}

/// A running agent and its socket.
pub struct AgentProc {
    pub proc: ServiceProcess,
    pub socket: PathBuf,
}

pub async fn start_agent(nats: &NatsServer, dir: &Path, dev: bool) -> AgentProc {
    start_agent_with(nats, dir, dev, |c| c).await
}

/// [`start_agent`] with more configuration.
pub async fn start_agent_with(
    nats: &NatsServer,
    dir: &Path,
    dev: bool,
    more: impl FnOnce(ServiceConfig) -> ServiceConfig,
) -> AgentProc {
    // The starters run as another user: they must reach the socket.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = dir.join("run/agent.sock");
    let creds = nats.creds(&wnodes_bus::roles::AGENT, HOST).unwrap();
    let conf = more(
        ServiceConfig::new(HOST, &creds, &dir.join("state"))
            .set("agent", "socket", socket.as_path())
            .set("agent", "allow_dev_identity", dev),
    );
    let mut proc = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-agent"), dir)
        .config(&conf)
        .spawn()
        .unwrap();
    proc.wait_stderr("the agent listening", Duration::from_secs(30), |l| {
        l.contains("Host agent listening").then_some(())
    })
    .await
    .unwrap();
    assert!(socket.exists());
    AgentProc { proc, socket }
}

/// `wnodes-bridge` next to this test's binary (`cargo build --workspace --bins` puts it there;
/// `cargo nextest run --workspace` builds it).
pub fn bridge_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("wnodes-bridge");
    assert!(
        bin.is_file(),
        "{} is missing: cargo build --workspace --bins",
        bin.display()
    );
    bin
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
