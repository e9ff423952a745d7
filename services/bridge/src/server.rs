//! The gRPC service `wnodes.v1.Bridge`: LRMS integrations report job starts, ends and
//! cancellations; each call publishes the matching event.
//!
//! What a caller is told when a call fails: for an invalid request, `INVALID_ARGUMENT` naming the
//! field and what is wrong with it; for a failure of the bridge or what it depends on, what
//! failed and a request id ([`failure`]), never the internal error chain, which goes to the
//! bridge's log once, under that request id.

use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Response, Status,
    metadata::{KeyRef, MetadataMap},
    transport::{Server, ServerTlsConfig, server::TcpIncoming},
};
use tracing::{Instrument, field};
use wnodes_bus::{
    Bus, ErrorChain, EventExt, Published, event::run_key, proto, proto::bridge_server,
    proto::event::Body,
};

use crate::{BridgeError, Config, validate, watch};

/// Reads W3C trace context from gRPC metadata.
#[derive(Debug)]
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl opentelemetry::propagation::Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

fn now() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(SystemTime::now()))
}

/// The `JobStarted` event of `job` (validated by the caller).
pub fn job_started_event(
    job: proto::JobDescription,
    started_at: Option<prost_types::Timestamp>,
    source: &str,
) -> proto::Event {
    let run = job.run.clone().unwrap_or_default();
    let host = job.host.clone();
    proto::Event::build(
        run,
        &host,
        source,
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: started_at.or_else(now),
        }),
    )
}

/// The `JobFinished` event of a run.
pub fn job_finished_event(
    run: proto::JobRunRef,
    host: &str,
    exit_code: i32,
    finished_at: Option<prost_types::Timestamp>,
    source: &str,
) -> proto::Event {
    proto::Event::build(
        run.clone(),
        host,
        source,
        Body::JobFinished(proto::JobFinished {
            run: Some(run),
            exit_code,
            finished_at: finished_at.or_else(now),
        }),
    )
}

/// The `JobCancelled` event of a run.
pub fn job_cancelled_event(
    run: proto::JobRunRef,
    host: &str,
    reason: &str,
    cancelled_at: Option<prost_types::Timestamp>,
    source: &str,
) -> proto::Event {
    proto::Event::build(
        run.clone(),
        host,
        source,
        Body::JobCancelled(proto::JobCancelled {
            run: Some(run),
            reason: reason.to_owned(),
            cancelled_at: cancelled_at.or_else(now),
        }),
    )
}

/// The bridge's gRPC service.
#[derive(Debug, Clone)]
pub struct BridgeService {
    bus: Bus,
    source: String,
    shutdown: CancellationToken,
    verifier: std::sync::Arc<wnodes_identity::Verifier>,
    /// With mTLS: what each client certificate may do (`None`: no client certificates).
    clients: Option<std::sync::Arc<Vec<crate::ClientRule>>>,
}

/// An RPC, for the client rules (`[[bridge.clients]] operations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    JobStarted,
    JobFinished,
    JobCancelled,
    WaitJob,
}

impl Operation {
    /// Its name in `operations`.
    pub fn name(self) -> &'static str {
        match self {
            Operation::JobStarted => "job_started",
            Operation::JobFinished => "job_finished",
            Operation::JobCancelled => "job_cancelled",
            Operation::WaitJob => "wait_job",
        }
    }
}

impl BridgeService {
    /// `source` is `"bridge@<host>"`; `shutdown` ends pending `WaitJob` calls. No credential
    /// is required and no client rule applies until [`Self::with_identity`] and
    /// [`Self::with_clients`].
    pub fn new(bus: Bus, source: String, shutdown: CancellationToken) -> Self {
        Self {
            bus,
            source,
            shutdown,
            verifier: std::sync::Arc::new(wnodes_identity::Verifier::default()),
            clients: None,
        }
    }

    /// Verifies `JobStarted`'s credentials with `verifier` (`[bridge.identity]`).
    #[must_use]
    pub fn with_identity(mut self, verifier: wnodes_identity::Verifier) -> Self {
        self.verifier = std::sync::Arc::new(verifier);
        self
    }

    /// Authorises each call by its client certificate's subject (`[[bridge.clients]]`).
    #[must_use]
    pub fn with_clients(mut self, clients: Vec<crate::ClientRule>) -> Self {
        self.clients = Some(std::sync::Arc::new(clients));
        self
    }

    /// Whether the caller's certificate may do `op` for `host`.
    fn authorize<T>(&self, request: &Request<T>, op: Operation, host: &str) -> Result<(), Status> {
        let Some(rules) = &self.clients else {
            return Ok(());
        };
        let subject = request
            .peer_certs()
            .and_then(|certs| {
                certs.first().and_then(|der| {
                    use x509_parser::prelude::FromDer;
                    x509_parser::certificate::X509Certificate::from_der(der.as_ref())
                        .ok()
                        .map(|(_, c)| wnodes_identity::proxy::slash_dn(c.subject()))
                })
            })
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let allowed = rules.iter().any(|r| {
            r.subject == subject
                && r.operations.iter().any(|o| o == op.name())
                && r.hosts.iter().any(|h| h == "*" || h == host)
        });
        if allowed {
            Ok(())
        } else {
            tracing::warn!(%subject, operation = op.name(), %host, "A client was refused.");
            Err(Status::permission_denied(format!(
                "client {subject} may not call {} for host {host:?} ([[bridge.clients]])",
                op.name()
            )))
        }
    }

    /// Publishes `event` inside `span` and answers with the ack.
    async fn publish(
        &self,
        event: proto::Event,
        (span, traced): (tracing::Span, bool),
    ) -> Result<Response<proto::JobAck>, Status> {
        let key = event.run_key();
        if !traced {
            wnodes_bus::propagation::set_parent(&span, wnodes_bus::propagation::run_context(&key));
        }
        span.record("wnodes.run", key.as_str());
        let bus = self.bus.clone();
        async move {
            let trace_id = wnodes_bus::propagation::current_trace_id();
            let Published {
                sequence,
                duplicate,
            } = bus
                .publish(&event)
                .await
                .map_err(|e| failure(Code::Unavailable, &format!("publishing {}", event.id), &e))?;
            tracing::info!(id = %event.id, sequence, duplicate, "Published.");
            Ok(Response::new(proto::JobAck {
                event_id: event.id.clone(),
                sequence,
                duplicate,
                trace_id,
            }))
        }
        .instrument(span)
        .await
    }
}

fn invalid(e: validate::InvalidInput) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The status of a call that failed for a reason the caller cannot fix: `what` failed, and a
/// request id to find the cause by. The whole error chain goes to the log once, under that id;
/// the caller never sees it (it names internal addresses, subjects and files).
pub fn failure(code: Code, what: &str, e: &(dyn std::error::Error + 'static)) -> Status {
    let request_id = uuid::Uuid::now_v7().simple().to_string();
    tracing::error!(%request_id, what, error = %ErrorChain(e), "Request failed.");
    Status::new(
        code,
        format!("{what} failed: internal error; see the bridge's log, request id {request_id}"),
    )
}

macro_rules! rpc_span {
    ($name:literal, $method:literal, $meta:expr) => {{
        let span = tracing::info_span!(
            $name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "wnodes.v1.Bridge",
            rpc.method = $method,
            wnodes.run = field::Empty,
        );
        // A caller's trace context wins; without one, the span joins its run's own trace
        // (set in `publish`, once the run is known).
        let traced = $meta.contains_key("traceparent");
        if traced {
            wnodes_bus::propagation::set_parent_from_carrier(&span, &MetadataExtractor($meta));
        }
        (span, traced)
    }};
}

/// The request's `run` and `host` fields, checked: the run, or the reason naming the field.
fn run_on_host(run: Option<proto::JobRunRef>, host: &str) -> Result<proto::JobRunRef, Status> {
    validate::run("run", run.as_ref()).map_err(invalid)?;
    validate::host("host", host).map_err(invalid)?;
    Ok(run.unwrap_or_default())
}

#[tonic::async_trait]
impl bridge_server::Bridge for BridgeService {
    async fn job_started(
        &self,
        request: Request<proto::JobStartedRequest>,
    ) -> Result<Response<proto::JobAck>, Status> {
        let span = rpc_span!("bridge.job_started", "JobStarted", request.metadata());
        let host = request
            .get_ref()
            .job
            .as_ref()
            .map(|j| j.host.clone())
            .unwrap_or_default();
        self.authorize(&request, Operation::JobStarted, &host)?;
        let req = request.into_inner();
        validate::job(req.job.as_ref()).map_err(invalid)?;
        let Some(mut job) = req.job else {
            return Err(Status::invalid_argument("job: is required"));
        };
        // Who the job is comes from its verified credentials, never from the caller's fields.
        let (identity, vo) = self
            .verifier
            .verify(
                &req.bearer_token,
                &req.x509_proxy,
                job.vo.clone(),
                wnodes_identity::unix_now(),
            )
            .map_err(|e| Status::permission_denied(ErrorChain(&e).to_string()))?;
        job.identity = (identity != proto::GridIdentity::default()).then_some(identity);
        job.vo = vo;
        let event = job_started_event(job, req.started_at, &self.source);
        // Without a caller's trace, the run's own: its root span, ended at once (the bridge
        // does not follow the run).
        let _run_span = (!span.1)
            .then(|| wnodes_runtime::telemetry::start_run_span(&event.run_key(), "wnodes.run"));
        self.publish(event, span).await
    }

    async fn job_finished(
        &self,
        request: Request<proto::JobFinishedRequest>,
    ) -> Result<Response<proto::JobAck>, Status> {
        let span = rpc_span!("bridge.job_finished", "JobFinished", request.metadata());
        self.authorize(&request, Operation::JobFinished, &request.get_ref().host)?;
        let req = request.into_inner();
        let run = run_on_host(req.run, &req.host)?;
        let event =
            job_finished_event(run, &req.host, req.exit_code, req.finished_at, &self.source);
        self.publish(event, span).await
    }

    async fn job_cancelled(
        &self,
        request: Request<proto::JobCancelledRequest>,
    ) -> Result<Response<proto::JobAck>, Status> {
        let span = rpc_span!("bridge.job_cancelled", "JobCancelled", request.metadata());
        self.authorize(&request, Operation::JobCancelled, &request.get_ref().host)?;
        let req = request.into_inner();
        let run = run_on_host(req.run, &req.host)?;
        let event =
            job_cancelled_event(run, &req.host, &req.reason, req.cancelled_at, &self.source);
        self.publish(event, span).await
    }

    async fn wait_job(
        &self,
        request: Request<proto::WaitJobRequest>,
    ) -> Result<Response<proto::JobOutcome>, Status> {
        let (span, traced) = rpc_span!("bridge.wait_job", "WaitJob", request.metadata());
        self.authorize(&request, Operation::WaitJob, &request.get_ref().host)?;
        let req = request.into_inner();
        let key = run_key(&run_on_host(req.run, &req.host)?);
        if !traced {
            wnodes_bus::propagation::set_parent(&span, wnodes_bus::propagation::run_context(&key));
        }
        span.record("wnodes.run", key.as_str());
        wnodes_bus::subject::validate_host(&req.host)
            .map_err(|e| invalid_or_internal(&crate::BridgeError::from(e)))?;
        let wait = watch::run_outcome(&self.bus, &req.host, watch::From::All, &key, |_| {});
        tokio::select! {
            res = wait.instrument(span) => match res {
                Ok(outcome) => Ok(Response::new(outcome.to_proto())),
                Err(e) => Err(failure(Code::Unavailable, "waiting for the run's end", &e)),
            },
            _ = self.shutdown.cancelled() => Err(Status::unavailable("the bridge is shutting down")),
        }
    }
}

fn invalid_or_internal(e: &BridgeError) -> Status {
    match e {
        BridgeError::Invalid(i) => Status::invalid_argument(i.to_string()),
        other => failure(Code::Internal, "waiting for the run's end", other),
    }
}

/// The TLS settings of `[bridge]`: `None` for plain TCP. Errors name the key.
pub fn tls_config(cfg: &Config) -> Result<Option<ServerTlsConfig>, BridgeError> {
    use wnodes_runtime::grpc::{GrpcTlsError, server_tls};
    server_tls(
        "bridge",
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
        cfg.client_ca.as_deref(),
    )
    .map_err(|e| match e {
        GrpcTlsError::Config(why) => BridgeError::Config(why),
        GrpcTlsError::Read { path, source } => BridgeError::Read { path, source },
    })
}

/// Binds `addr`.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, BridgeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BridgeError::Listen { addr, source })
}

/// Serves `service` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    service: BridgeService,
    tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), BridgeError> {
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(bridge_server::BridgeServer::new(service))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}
