//! One job starter's connection: who it is, its run, and the run's end.
//!
//! The peer's uid, gid and pid come from the socket (`SO_PEERCRED`); the job, from the LRMS
//! ([`crate::slurm`], [`crate::pbs`], [`crate::lsf`], [`crate::htcondor`]) — or, only with `allow_dev_identity`, from the request's development
//! identity. Then `JobStarted` is published (the root span of the job's trace), progress lines
//! and, once the VM has stopped, the payload's output go back to the starter, and `JobFinished`
//! closes the run. A `CancelRequest`, the starter's connection closing, or the agent stopping
//! publishes `JobCancelled` first.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use tokio::{io::AsyncReadExt, net::UnixStream, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wnodes_bridge::{
    agent_wire::{read_msg, write_msg},
    server::{job_cancelled_event, job_finished_event, job_started_event},
    submit::progress_line,
    watch::{self, Ending},
};
use wnodes_bus::{
    Bus, ErrorChain,
    proto::{self, agent_message::Kind as Reply, starter_message::Kind as Ask},
};
use wnodes_runtime::exit;

use crate::{
    Config,
    htcondor::Htcondor,
    lrms::LrmsError,
    lsf::Lsf,
    metrics::Metrics,
    pbs::Pbs,
    runs::{LiveRun, Runs},
    slurm::Slurm,
};

/// The payload's output goes back in chunks of this size.
const OUTPUT_CHUNK: usize = 64 << 10;
/// How long a starter may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The exit code of a run whose starter went away (as if SIGKILLed).
pub const EXIT_STARTER_GONE: i32 = 137;

/// Why a job starter was refused: the message it gets, and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub exit_code: u8,
    /// The metric label.
    pub kind: &'static str,
}

impl Refusal {
    fn not_permitted(kind: &'static str, reason: String) -> Self {
        Self {
            reason,
            exit_code: 77,
            kind,
        }
    }
}

/// The peer of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// What the sessions share.
#[derive(Debug)]
pub struct Agent {
    pub bus: Bus,
    pub config: Config,
    pub site: String,
    pub host: String,
    pub source: String,
    pub slurm: Slurm,
    pub pbs: Pbs,
    pub lsf: Lsf,
    pub htcondor: Htcondor,
    pub runs: Runs,
    pub metrics: Metrics,
    /// Grid credentials' verification.
    pub verifier: wnodes_identity::Verifier,
    /// Run keys with a connected starter.
    live: parking_lot::Mutex<HashSet<String>>,
    pub shutdown: CancellationToken,
}

/// Removes a run key from the live set when the session ends.
struct LiveGuard<'a> {
    agent: &'a Agent,
    key: String,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut live = self.agent.live.lock();
        live.remove(&self.key);
        self.agent
            .metrics
            .live
            .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
    }
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

impl Agent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bus: Bus,
        config: Config,
        site: String,
        host: String,
        source: String,
        runs: Runs,
        metrics: Metrics,
        verifier: wnodes_identity::Verifier,
        shutdown: CancellationToken,
    ) -> Self {
        let slurm = Slurm::new(config.slurm.clone());
        let pbs = Pbs::new(config.pbs.clone());
        let lsf = Lsf::new(config.lsf.clone());
        let htcondor = Htcondor::new(config.htcondor.clone());
        Self {
            bus,
            config,
            site,
            host,
            source,
            slurm,
            pbs,
            lsf,
            htcondor,
            runs,
            metrics,
            verifier,
            live: parking_lot::Mutex::new(HashSet::new()),
            shutdown,
        }
    }

    /// The job a start request from `peer` is, or why it is refused.
    pub async fn identify(
        &self,
        req: &proto::StartRequest,
        peer: Peer,
    ) -> Result<proto::JobDescription, Refusal> {
        let lrms = proto::Lrms::try_from(req.lrms).unwrap_or(proto::Lrms::Unspecified);
        let mut payload = req.payload.clone();
        let (run, owner, vo, queue, resources) = if let Some(dev) = &req.dev {
            if !self.config.allow_dev_identity {
                return Err(Refusal::not_permitted(
                    "dev_identity",
                    "a development identity (--dev-job-id) is refused: [agent] allow_dev_identity is off".into(),
                ));
            }
            let run = proto::JobRunRef {
                site: self.site.clone(),
                lrms: lrms as i32,
                job_id: dev.job_id.clone(),
                run_attempt: dev.run_attempt.max(1),
            };
            let owner = proto::JobOwner {
                user: user_name(peer.uid),
                uid: peer.uid,
                gid: peer.gid,
            };
            (
                run,
                owner,
                dev.vo.clone(),
                dev.queue.clone(),
                dev.resources.unwrap_or_default(),
            )
        } else {
            if !self.config.lrms.iter().any(|k| k.proto() == lrms) {
                let names: Vec<&str> = self.config.lrms.iter().map(|l| l.name()).collect();
                return Err(Refusal::not_permitted(
                    "lrms",
                    format!(
                        "this host agent takes jobs of {} only, not of {}",
                        names.join(", "),
                        lrms_name(lrms)
                    ),
                ));
            }
            let Some(pid) = peer.pid.filter(|p| *p > 0) else {
                return Err(Refusal::not_permitted(
                    "no_pid",
                    "the socket gave no process id for the job starter".into(),
                ));
            };
            let claimed = req.claimed_job_id.as_str();
            let verified = match lrms {
                proto::Lrms::Slurm => self.slurm.identify(pid, peer.uid, claimed).await,
                proto::Lrms::Pbs => self.pbs.identify(pid, peer.uid, claimed, &self.host).await,
                proto::Lrms::Lsf => self.lsf.identify(pid, peer.uid, claimed, &self.host).await,
                proto::Lrms::Htcondor => {
                    self.htcondor
                        .identify(pid, peer.uid, claimed, &self.host)
                        .await
                }
                proto::Lrms::Unspecified => Err(LrmsError::refused(
                    "lrms",
                    "the job starter named no batch system",
                )),
            }
            .map_err(lrms_refusal)?;
            // The payload sees the job as the LRMS describes it (these override what the
            // starter sent).
            if let Some(p) = payload.as_mut() {
                for (k, v) in &verified.env {
                    p.environment.insert(k.clone(), v.clone());
                }
            }
            let run = proto::JobRunRef {
                site: self.site.clone(),
                lrms: lrms as i32,
                job_id: verified.job_id,
                run_attempt: verified.attempt,
            };
            let owner = proto::JobOwner {
                user: verified.user,
                uid: verified.uid,
                gid: verified.gid,
            };
            let resources = proto::ResourceRequest {
                cores: verified.cpus,
                memory_bytes: verified.memory_bytes,
                scratch_bytes: 0,
                walltime: verified.walltime.map(|s| prost_types::Duration {
                    seconds: i64::try_from(s).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
            };
            (run, owner, verified.vo, verified.queue, resources)
        };
        // A grid credential, verified, names the VO (the LRMS's VO is the fallback).
        let (identity, vo) = self.credential(req, vo)?;
        if let Some(p) = payload.as_mut() {
            p.environment.insert("WNODES_VO".to_owned(), vo.clone());
        }
        let job = proto::JobDescription {
            run: Some(run),
            owner: Some(owner),
            identity: Some(identity),
            vo,
            queue,
            resources: Some(resources),
            image_hint: req.image_hint.clone(),
            storage_mode: req.storage_mode,
            host: self.host.clone(),
            payload,
            submitted_at: None,
        };
        wnodes_bridge::validate::job(Some(&job)).map_err(|e| Refusal {
            reason: e.to_string(),
            exit_code: exit::USAGE,
            kind: "invalid",
        })?;
        Ok(job)
    }

    /// The job's grid identity and VO: from a verified X.509 proxy and/or bearer token when the
    /// starter sent them (refused with the reason when one does not verify, or when they name
    /// different VOs), else none and `lrms_vo` (refused when `[agent.identity] require` is on).
    fn credential(
        &self,
        req: &proto::StartRequest,
        lrms_vo: String,
    ) -> Result<(proto::GridIdentity, String), Refusal> {
        self.verifier
            .verify(
                &req.bearer_token,
                &req.x509_proxy,
                lrms_vo,
                wnodes_identity::unix_now(),
            )
            .map_err(|e| {
                let kind = match e {
                    wnodes_identity::CredentialError::Missing => "no_credential",
                    _ => "credential",
                };
                Refusal::not_permitted(kind, ErrorChain(&e).to_string())
            })
    }

    /// Runs one connection to its end.
    pub async fn session(self: Arc<Self>, stream: UnixStream) {
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read a job starter's peer credentials; closing.");
                return;
            }
        };
        let (mut rx, mut tx) = stream.into_split();
        let span = tracing::info_span!("agent.session", uid = peer.uid, pid = peer.pid);
        let this = self.clone();
        async move {
            let first =
                tokio::time::timeout(REQUEST_TIMEOUT, read_msg::<proto::StarterMessage>(&mut rx))
                    .await;
            let req = match first {
                Ok(Ok(Some(proto::StarterMessage {
                    kind: Some(Ask::Start(r)),
                }))) => r,
                Ok(Ok(None)) => return,
                Ok(Ok(Some(_))) => {
                    this.refuse(
                        &mut tx,
                        Refusal {
                            reason: "the first message must be a start request".into(),
                            exit_code: exit::USAGE,
                            kind: "protocol",
                        },
                    )
                    .await;
                    return;
                }
                Ok(Err(e)) => {
                    this.refuse(
                        &mut tx,
                        Refusal {
                            reason: format!("a malformed request: {}", ErrorChain(&e)),
                            exit_code: exit::USAGE,
                            kind: "protocol",
                        },
                    )
                    .await;
                    return;
                }
                Err(_) => {
                    this.refuse(
                        &mut tx,
                        Refusal {
                            reason: format!("no request within {REQUEST_TIMEOUT:?}"),
                            exit_code: exit::USAGE,
                            kind: "protocol",
                        },
                    )
                    .await;
                    return;
                }
            };
            let job = match this.identify(&req, peer).await {
                Ok(j) => j,
                Err(r) => {
                    this.refuse(&mut tx, r).await;
                    return;
                }
            };
            this.run_job(job, peer, rx, &mut tx).await;
        }
        .instrument(span)
        .await;
    }

    async fn refuse(&self, tx: &mut (impl tokio::io::AsyncWrite + Unpin), r: Refusal) {
        tracing::warn!(reason = %r.reason, kind = r.kind, "Job starter refused.");
        self.metrics.refused(r.kind);
        let msg = proto::AgentMessage {
            kind: Some(Reply::Refused(proto::Refused {
                reason: r.reason,
                exit_code: i32::from(r.exit_code),
            })),
        };
        let _ = write_msg(tx, &msg).await;
    }

    async fn run_job(
        &self,
        job: proto::JobDescription,
        peer: Peer,
        mut rx: tokio::net::unix::OwnedReadHalf,
        tx: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) {
        let run = job.run.clone().unwrap_or_default();
        let key = wnodes_bus::event::run_key(&run);
        let owner = job.owner.clone().unwrap_or_default();
        let vo = job.vo.clone();
        let inserted = {
            let mut live = self.live.lock();
            let inserted = live.insert(key.clone());
            self.metrics
                .live
                .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
            inserted
        };
        if !inserted {
            self.refuse(
                tx,
                Refusal::not_permitted("duplicate", format!("run {key} already has a job starter")),
            )
            .await;
            return;
        }
        let _guard = LiveGuard {
            agent: self,
            key: key.clone(),
        };
        if let Err(e) = self.runs.record(&key, &LiveRun::new(&run, &self.host)) {
            self.refuse(
                tx,
                Refusal {
                    reason: format!("the agent cannot record the run: {e}"),
                    exit_code: exit::UNAVAILABLE,
                    kind: "state",
                },
            )
            .await;
            return;
        }
        // The run's root span (its ids derived from the run key), ended when this session is.
        let _run_span = wnodes_runtime::telemetry::start_run_span(&key, "wnodes.run");
        let root = tracing::info_span!(
            "bridge.job_started",
            otel.kind = "producer",
            wnodes.run = key.as_str(),
            uid = peer.uid
        );
        // The run's own trace (derived from its run key): the LRMS's events of the run, published
        // by other processes, land in the same trace.
        wnodes_bus::propagation::set_parent(&root, wnodes_bus::propagation::run_context(&key));
        let event = job_started_event(job, None, &self.source);
        let published = async {
            let trace_id = wnodes_bus::propagation::current_trace_id();
            self.bus
                .publish(&event)
                .await
                .map(|p| (p.sequence, trace_id))
        }
        .instrument(root.clone())
        .await;
        let (seq, trace_id) = match published {
            Ok(p) => p,
            Err(e) => {
                self.runs.forget(&key);
                self.refuse(
                    tx,
                    Refusal {
                        reason: format!("cannot publish JobStarted: {}", ErrorChain(&e)),
                        exit_code: exit::UNAVAILABLE,
                        kind: "bus",
                    },
                )
                .await;
                return;
            }
        };
        let root_cx = {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            root.context()
        };
        tracing::info!(run = %key, uid = owner.uid, gid = owner.gid, %vo, %trace_id, "Job started for a job starter.");
        self.metrics.accepted();
        let run_ctx = RunCtx {
            agent: self,
            run,
            key: key.clone(),
            root: root_cx,
        };
        let mut connected = write_msg(
            tx,
            &proto::AgentMessage {
                kind: Some(Reply::Accepted(proto::Accepted {
                    run_key: key.clone(),
                    trace_id: trace_id.clone(),
                    user: owner.user.clone(),
                    uid: owner.uid,
                    gid: owner.gid,
                    vo,
                })),
            },
        )
        .await
        .is_ok();

        // The starter's messages, read by a task of their own (a frame is never cut in half by
        // the select below); `None` when the connection closes or fails.
        let (mtx, mut mrx) = tokio::sync::mpsc::channel::<Option<proto::StarterMessage>>(4);
        let reader = tokio::spawn(async move {
            loop {
                let m = read_msg::<proto::StarterMessage>(&mut rx)
                    .await
                    .ok()
                    .flatten();
                let end = m.is_none();
                if mtx.send(m).await.is_err() || end {
                    return;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let t0 = Instant::now();
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let wait = watch::run_outcome(
            &self.bus,
            &self.host,
            watch::From::Sequence(seq),
            &key,
            move |ev| {
                let _ = ptx.send(progress_line(t0, ev));
            },
        );
        tokio::pin!(wait);
        let mut cancel_code: Option<i32> = None;
        if !connected {
            cancel_code = Some(EXIT_STARTER_GONE);
            run_ctx.starter_gone().await;
        }
        let outcome = loop {
            tokio::select! {
                res = &mut wait => break res,
                Some(line) = prx.recv() => {
                    if connected && write_msg(tx, &proto::AgentMessage { kind: Some(Reply::Progress(line)) }).await.is_err() {
                        connected = false;
                        if cancel_code.is_none() {
                            cancel_code = Some(EXIT_STARTER_GONE);
                            run_ctx.starter_gone().await;
                        }
                    }
                }
                msg = mrx.recv(), if connected => match msg.flatten() {
                    Some(proto::StarterMessage { kind: Some(Ask::Cancel(c)) }) => {
                        if cancel_code.is_none() {
                            let code = if (1..=255).contains(&c.exit_code) { c.exit_code } else { 143 };
                            cancel_code = Some(code);
                            let reason = if c.reason.is_empty() { "cancelled by the job starter".to_owned() } else { c.reason.clone() };
                            run_ctx.cancel(&reason).await;
                        }
                    }
                    Some(_) => {}
                    None => {
                        connected = false;
                        if cancel_code.is_none() {
                            cancel_code = Some(EXIT_STARTER_GONE);
                            run_ctx.starter_gone().await;
                        }
                    }
                },
                () = self.shutdown.cancelled(), if cancel_code.is_none() => {
                    cancel_code = Some(EXIT_STARTER_GONE);
                    run_ctx.cancel("the host agent is stopping").await;
                }
            }
        };
        // The progress lines of the events up to the end, not yet sent.
        while let Ok(line) = prx.try_recv() {
            if connected {
                let msg = proto::AgentMessage {
                    kind: Some(Reply::Progress(line)),
                };
                connected = write_msg(tx, &msg).await.is_ok();
            }
        }
        let (code, message) = match outcome {
            Ok(o) => match &o.ending {
                Ending::Stopped(s) => {
                    if connected {
                        connected = send_output(tx, s).await;
                    }
                    let code = cancel_code
                        .unwrap_or_else(|| u8::try_from(s.exit_code).map_or(255, i32::from));
                    let note = if cancel_code.is_some() {
                        " (cancelled)"
                    } else {
                        ""
                    };
                    (
                        code,
                        format!(
                            "run {key}: payload exited with code {} ({}); exit code {code}{note}",
                            s.exit_code, s.stop_reason
                        ),
                    )
                }
                Ending::Failed(f) => {
                    let code =
                        cancel_code.unwrap_or(i32::from(wnodes_bridge::submit::EXIT_VM_FAILED));
                    (
                        code,
                        format!(
                            "run {key}: VM failed in phase {}: {}; exit code {code}",
                            f.phase, f.reason
                        ),
                    )
                }
            },
            Err(e) => {
                if cancel_code.is_none() {
                    run_ctx.cancel("the host agent lost track of the run").await;
                }
                let code = i32::from(exit::UNAVAILABLE);
                (code, format!("lost track of {key}: {}", ErrorChain(&e)))
            }
        };
        run_ctx.finish(code).await;
        self.runs.forget(&key);
        tracing::info!(run = %key, exit_code = code, connected, "Run ended.");
        if connected {
            let _ = write_msg(
                tx,
                &proto::AgentMessage {
                    kind: Some(Reply::Done(proto::Done {
                        exit_code: code,
                        message,
                    })),
                },
            )
            .await;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the payload's output: the file the launcher names when the agent can read it, else
/// the tail in the event. Returns whether the starter is still connected.
async fn send_output(tx: &mut (impl tokio::io::AsyncWrite + Unpin), s: &proto::VmStopped) -> bool {
    let file = if s.output_location.is_empty() {
        None
    } else {
        tokio::fs::File::open(PathBuf::from(&s.output_location))
            .await
            .ok()
    };
    match file {
        Some(mut f) => {
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            loop {
                match f.read(&mut buf).await {
                    Ok(0) => return true,
                    Ok(n) => {
                        let msg = proto::AgentMessage {
                            kind: Some(Reply::Output(buf[..n].to_vec())),
                        };
                        if write_msg(tx, &msg).await.is_err() {
                            return false;
                        }
                    }
                    Err(e) => {
                        let msg = proto::AgentMessage {
                            kind: Some(Reply::Progress(format!(
                                "cannot read the output {}: {e}",
                                s.output_location
                            ))),
                        };
                        return write_msg(tx, &msg).await.is_ok();
                    }
                }
            }
        }
        None => {
            let msg = proto::AgentMessage {
                kind: Some(Reply::Output(s.output_tail.clone().into_bytes())),
            };
            write_msg(tx, &msg).await.is_ok()
        }
    }
}

/// What a session publishes about its run after `JobStarted`.
struct RunCtx<'a> {
    agent: &'a Agent,
    run: proto::JobRunRef,
    key: String,
    root: opentelemetry::Context,
}

impl RunCtx<'_> {
    fn span(&self, span: tracing::Span) -> tracing::Span {
        wnodes_bus::propagation::set_parent(&span, self.root.clone());
        span
    }

    async fn starter_gone(&self) {
        self.agent.metrics.starters_lost.inc();
        tracing::warn!(run = %self.key, "The job starter's connection closed before its run ended: cancelling the run.");
        self.cancel("the job starter went away (its connection to the host agent closed)")
            .await;
    }

    async fn cancel(&self, reason: &str) {
        let ev = job_cancelled_event(
            self.run.clone(),
            &self.agent.host,
            reason,
            None,
            &self.agent.source,
        );
        let span = self.span(tracing::info_span!(
            "bridge.job_cancelled",
            otel.kind = "producer"
        ));
        if let Err(e) = self.agent.bus.publish(&ev).instrument(span).await {
            tracing::error!(run = %self.key, error = %ErrorChain(&e), "Cannot publish JobCancelled.");
        }
    }

    async fn finish(&self, code: i32) {
        let ev = job_finished_event(
            self.run.clone(),
            &self.agent.host,
            code,
            None,
            &self.agent.source,
        );
        let span = self.span(tracing::info_span!(
            "bridge.job_finished",
            otel.kind = "producer"
        ));
        match tokio::time::timeout(
            Duration::from_secs(30),
            self.agent.bus.publish(&ev).instrument(span),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(run = %self.key, error = %ErrorChain(&e), "Cannot publish JobFinished.")
            }
            Err(_) => tracing::error!(run = %self.key, "Publishing JobFinished timed out."),
        }
    }
}

/// A refusal for what the LRMS (or the kernel) said.
fn lrms_refusal(e: LrmsError) -> Refusal {
    let reason = ErrorChain(&e).to_string();
    match e {
        LrmsError::Refused { kind, .. } => Refusal::not_permitted(kind, reason),
        // The process went away while it was being looked at: it is no job's now.
        LrmsError::Proc { .. } => Refusal::not_permitted("not_in_job", reason),
        LrmsError::Client(_) => Refusal {
            reason,
            exit_code: exit::UNAVAILABLE,
            kind: "lrms_unavailable",
        },
    }
}

/// The LRMS's name in messages and config.
pub fn lrms_name(l: proto::Lrms) -> &'static str {
    match l {
        proto::Lrms::Unspecified => "unspecified",
        proto::Lrms::Htcondor => "htcondor",
        proto::Lrms::Slurm => "slurm",
        proto::Lrms::Pbs => "pbs",
        proto::Lrms::Lsf => "lsf",
    }
}
