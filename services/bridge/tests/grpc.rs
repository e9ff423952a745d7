//! The bridge's gRPC service against a real nats-server.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::OnceLock, time::Duration};

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};
use wnodes_bridge::server::{self, BridgeService};
use wnodes_bus::{Bus, EventExt, NatsConfig, proto, proto::event::Body, subject};
use wnodes_testkit::{
    NatsServer,
    bus::{BusClient, stored_messages},
    events::{Events, RunRefExt, vm_failed},
};

const HOST: &str = "hv1.example.org";

/// Installs the runtime's telemetry once per process, so spans have ids and `traceparent`
/// propagates as in the service.
fn telemetry() {
    static T: OnceLock<Option<wnodes_runtime::Telemetry>> = OnceLock::new();
    T.get_or_init(|| {
        wnodes_runtime::Telemetry::init("bridge-test", &wnodes_runtime::CommonConfig::default())
            .ok()
    });
}

/// The test's own bus (the site's admin): reads what the bridge published.
async fn connect(nats: &NatsServer) -> Bus {
    BusClient::new(&nats.admin())
        .name("test@hv1.example.org")
        .connect()
        .await
        .unwrap()
}

/// The bridge's bus: its own identity (central), so its permissions apply.
async fn connect_with(nats: &NatsServer, cfg: NatsConfig) -> Bus {
    BusClient::new(&nats.creds(&wnodes_bus::roles::BRIDGE, "").unwrap())
        .name("test@hv1.example.org")
        .config(cfg)
        .connect()
        .await
        .unwrap()
}

struct Bridge {
    client: proto::bridge_client::BridgeClient<tonic::transport::Channel>,
    stop: CancellationToken,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The bridge on its own identity's bus (see [`connect_with`]).
async fn start_bridge(nats: &NatsServer) -> Bridge {
    start_bridge_on(&connect_with(nats, NatsConfig::default()).await).await
}

async fn start_bridge_on(bus: &Bus) -> Bridge {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let service = BridgeService::new(
        bus.clone(),
        "bridge@central.example.org".into(),
        stop.clone(),
    );
    tokio::spawn(server::serve(listener, service, None, stop.clone()));
    let client = proto::bridge_client::BridgeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Bridge { client, stop }
}

fn run(job_id: &str) -> proto::JobRunRef {
    wnodes_testkit::events::run(job_id)
        .site("INFN-T1")
        .lrms(proto::Lrms::Slurm)
}

fn job(job_id: &str) -> proto::JobDescription {
    proto::JobDescription {
        run: Some(run(job_id)),
        vo: "atlas".into(),
        host: HOST.into(),
        payload: Some(proto::JobPayload {
            kind: Some(proto::job_payload::Kind::Command(proto::JobCommand {
                executable: "/bin/echo".into(),
                args: vec!["hello".into()],
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The first `n` messages on `filter`.
async fn messages(bus: &Bus, filter: String, n: usize) -> Vec<async_nats::jetstream::Message> {
    let mut stored = stored_messages(bus, &filter).await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = stored.next(Duration::from_secs(10)).await.unwrap();
        out.push(m.expect("message in time"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn job_started_publishes_the_event_under_the_callers_trace() {
    telemetry();
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let mut bridge = start_bridge(&nats).await;

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut req = Request::new(proto::JobStartedRequest {
        job: Some(job("4242")),
        started_at: None,
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-b7ad6b7169203331-01").parse().unwrap(),
    );
    let ack = bridge.client.job_started(req).await.unwrap().into_inner();
    assert_eq!(ack.event_id, "job.started:INFN-T1/slurm/4242/1");
    assert!(!ack.duplicate);
    assert_eq!(ack.trace_id, trace);

    // Without a caller context the span is the root of a new trace.
    let ack2 = bridge
        .client
        .job_started(proto::JobStartedRequest {
            job: Some(job("4243")),
            started_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(ack2.trace_id, trace);
    assert_ne!(ack2.trace_id, "0".repeat(32));

    // A retried call is stored once.
    let again = bridge
        .client
        .job_started(proto::JobStartedRequest {
            job: Some(job("4242")),
            started_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.sequence, ack.sequence);

    let msgs = messages(
        &bus,
        subject::event_filter(Some(HOST), "job.started").unwrap(),
        2,
    )
    .await;
    let ev = proto::Event::decode(msgs[0].payload.clone()).unwrap();
    assert_eq!(ev.id, ack.event_id);
    assert_eq!(ev.host, HOST);
    assert_eq!(ev.run_key(), "INFN-T1/slurm/4242/1");
    let Some(Body::JobStarted(js)) = &ev.body else {
        panic!("not a JobStarted: {ev:?}");
    };
    assert_eq!(js.job.as_ref(), Some(&job("4242")));
    assert!(js.started_at.is_some());
    let traceparent = msgs[0]
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(traceparent.contains(trace), "traceparent {traceparent:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_input_is_rejected_naming_the_field() {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let mut bridge = start_bridge(&nats).await;

    let mut cases = Vec::new();
    let mut j = job("");
    cases.push((j.clone(), "job.run.job_id"));
    j = job("1");
    j.host.clear();
    cases.push((j.clone(), "job.host"));
    j = job("1");
    j.host = "HV_1.example.org".into();
    cases.push((j.clone(), "job.host"));
    j = job("1");
    j.run = None;
    cases.push((j.clone(), "job.run"));
    j = job("1");
    j.payload = None;
    cases.push((j, "job.payload"));
    for (j, field) in cases {
        let status = bridge
            .client
            .job_started(proto::JobStartedRequest {
                job: Some(j.clone()),
                started_at: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{j:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            status.message()
        );
    }
    let status = bridge
        .client
        .job_started(proto::JobStartedRequest::default())
        .await
        .unwrap_err();
    assert!(status.message().starts_with("job:"), "{}", status.message());
    let status = bridge
        .client
        .job_finished(proto::JobFinishedRequest {
            run: Some(run("1")),
            host: String::new(),
            exit_code: 0,
            finished_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("host:"),
        "{}",
        status.message()
    );
    let status = bridge
        .client
        .job_cancelled(proto::JobCancelledRequest {
            run: Some(run("")),
            host: HOST.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("run.job_id:"),
        "{}",
        status.message()
    );
    let status = bridge
        .client
        .wait_job(proto::WaitJobRequest {
            run: None,
            host: HOST.into(),
        })
        .await
        .unwrap_err();
    assert!(status.message().starts_with("run:"), "{}", status.message());

    // Nothing was published.
    let stream = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .unwrap();
    let mut stream = stream;
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_that_fails_inside_the_bridge_tells_the_caller_a_request_id_not_the_cause() {
    let mut nats = NatsServer::start().await.unwrap();
    let bus = connect_with(
        &nats,
        NatsConfig {
            publish_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let mut bridge = start_bridge_on(&bus).await;
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    nats.kill().await.unwrap();

    let status = bridge
        .client
        .job_started(proto::JobStartedRequest {
            job: Some(job("77")),
            started_at: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let message = status.message();
    let (what, request_id) = message
        .split_once(" failed: internal error; see the bridge's log, request id ")
        .unwrap_or_else(|| panic!("not a failure message: {message}"));
    assert_eq!(what, "publishing job.started:INFN-T1/slurm/77/1");
    assert_eq!(request_id.len(), 32, "{message}");
    assert!(
        request_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{message}"
    );
    // Nothing of the internal chain: the bus's error, the subject, NATS's address.
    for internal in [
        "acknowledged",
        "wnodes.evt",
        "nats",
        "127.0.0.1",
        port.as_str(),
    ] {
        assert!(
            !message.contains(internal),
            "{internal:?} leaked: {message}"
        );
    }

    // An invalid request still says what is wrong with it, even with NATS down.
    let status = bridge
        .client
        .job_started(proto::JobStartedRequest {
            job: Some(job("")),
            started_at: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("job.run.job_id:"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_and_cancelled_publish_and_wait_job_finds_ended_runs() {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let mut bridge = start_bridge(&nats).await;

    // A run that already ended before WaitJob is called.
    let stopped = Events::new(HOST, "launcher@test").build(
        &run("7"),
        Body::VmStopped(proto::VmStopped {
            vm_id: "vm-000000000007".into(),
            exit_code: 3,
            stop_reason: "guest-poweroff".into(),
            output_tail: "out\n".into(),
            ..Default::default()
        }),
    );
    bus.publish(&stopped).await.unwrap();
    let outcome = bridge
        .client
        .wait_job(proto::WaitJobRequest {
            run: Some(run("7")),
            host: HOST.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.run_key, "INFN-T1/slurm/7/1");
    assert_eq!(outcome.exit_code, 3);
    assert!(!outcome.cancelled);
    assert!(matches!(
        outcome.result,
        Some(proto::job_outcome::Result::Stopped(ref s)) if s.output_tail == "out\n"
    ));

    // A run whose VM fails while WaitJob waits; it was cancelled first.
    let mut client = bridge.client.clone();
    let waiter = tokio::spawn(async move {
        client
            .wait_job(proto::WaitJobRequest {
                run: Some(run("8")),
                host: HOST.into(),
            })
            .await
    });
    let ack = bridge
        .client
        .job_cancelled(proto::JobCancelledRequest {
            run: Some(run("8")),
            host: HOST.into(),
            reason: "scancel by user".into(),
            cancelled_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.event_id, "job.cancelled:INFN-T1/slurm/8/1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    bus.publish(&Events::new(HOST, "launcher@test").build(
        &run("8"),
        vm_failed(
            "vm-000000000008",
            "launch",
            "cancelled before the VM started",
        ),
    ))
    .await
    .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(outcome.failure_reason, "cancelled before the VM started");
    assert!(outcome.cancelled);

    let ack = bridge
        .client
        .job_finished(proto::JobFinishedRequest {
            run: Some(run("7")),
            host: HOST.into(),
            exit_code: 3,
            finished_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.event_id, "job.finished:INFN-T1/slurm/7/1");
    let msgs = messages(
        &bus,
        subject::event_filter(Some(HOST), "job.finished").unwrap(),
        1,
    )
    .await;
    let ev = proto::Event::decode(msgs[0].payload.clone()).unwrap();
    assert!(matches!(ev.body, Some(Body::JobFinished(ref f)) if f.exit_code == 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_client_certificates_admits_only_clients_the_ca_signed() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    wnodes_bus::connect::install_crypto_provider();
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let pki = wnodes_testkit::TestPki::generate().unwrap();
    let cfg = wnodes_bridge::Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: Some(pki.server_cert().to_owned()),
        tls_key: Some(pki.server_key().to_owned()),
        client_ca: Some(pki.ca_pem().to_owned()),
        ..Default::default()
    };
    let tls = server::tls_config(&cfg).unwrap();
    assert!(tls.is_some());
    let listener = server::bind(cfg.grpc_addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let service = BridgeService::new(bus.clone(), "bridge@test".into(), stop.clone());
    tokio::spawn(server::serve(listener, service, tls, stop.clone()));

    let ca = Certificate::from_pem(std::fs::read(pki.ca_pem()).unwrap());
    let channel = |identity: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        Channel::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let identity = Identity::from_pem(
        std::fs::read(pki.client_cert()).unwrap(),
        std::fs::read(pki.client_key()).unwrap(),
    );
    let mut client =
        proto::bridge_client::BridgeClient::new(channel(Some(identity)).connect().await.unwrap());
    let ack = client
        .job_started(proto::JobStartedRequest {
            job: Some(job("5")),
            started_at: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.event_id, "job.started:INFN-T1/slurm/5/1");

    // Without a client certificate the handshake (or the first call) fails.
    let refused = match channel(None).connect().await {
        Err(_) => true,
        Ok(ch) => proto::bridge_client::BridgeClient::new(ch)
            .job_started(proto::JobStartedRequest {
                job: Some(job("6")),
                started_at: None,
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // Half a TLS configuration is a configuration error naming the key.
    let half = wnodes_bridge::Config {
        tls_key: None,
        ..cfg
    };
    let err = server::tls_config(&half).unwrap_err().to_string();
    assert!(err.contains("bridge.tls_key"), "{err}");
}

/// With client certificates, each client may do only what its `[[bridge.clients]]` rule says:
/// the operations listed, for the hosts listed. A call outside its rule is refused naming the
/// client, the operation and the host, and publishes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_may_call_only_its_operations_for_its_hosts() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    wnodes_bus::connect::install_crypto_provider();
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let pki = wnodes_testkit::TestPki::generate().unwrap();
    let client_pem = std::fs::read(pki.client_cert()).unwrap();
    let subject = {
        use x509_parser::prelude::FromDer;
        let der = wnodes_identity::proxy::pem_certificates(&client_pem).unwrap();
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(&der[0]).unwrap();
        wnodes_identity::proxy::slash_dn(c.subject())
    };
    let cfg = wnodes_bridge::Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: Some(pki.server_cert().to_owned()),
        tls_key: Some(pki.server_key().to_owned()),
        client_ca: Some(pki.ca_pem().to_owned()),
        clients: vec![wnodes_bridge::ClientRule {
            subject: subject.clone(),
            hosts: vec![HOST.into()],
            operations: vec!["job_started".into(), "wait_job".into()],
        }],
        ..Default::default()
    };
    // Client certificates without rules: a configuration error naming the key.
    let no_rules = wnodes_bridge::Config {
        clients: Vec::new(),
        ..cfg.clone()
    };
    let e = <wnodes_bridge::Bridge as wnodes_runtime::Service>::validate(&no_rules).unwrap_err();
    let e = wnodes_bus::ErrorChain(&e).to_string();
    assert!(e.contains("clients"), "{e}");
    let tls = server::tls_config(&cfg).unwrap();
    let listener = server::bind(cfg.grpc_addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let service = BridgeService::new(bus.clone(), "bridge@test".into(), stop.clone())
        .with_clients(cfg.clients.clone());
    tokio::spawn(server::serve(listener, service, tls, stop.clone()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca_pem()).unwrap()))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            client_pem,
            std::fs::read(pki.client_key()).unwrap(),
        ));
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::bridge_client::BridgeClient::new(channel);
    let ok = client
        .job_started(proto::JobStartedRequest {
            job: Some(job("7")),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    // Another host.
    let mut other = job("8");
    other.host = "hv9.example.org".into();
    let e = client
        .job_started(proto::JobStartedRequest {
            job: Some(other),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(&subject) && e.message().contains("hv9.example.org"),
        "{e:?}"
    );
    // An operation the rule does not list.
    let e = client
        .job_cancelled(proto::JobCancelledRequest {
            run: Some(run("7")),
            host: HOST.into(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("job_cancelled"), "{e:?}");
    // Only the allowed call reached the bus.
    let subject_filter = format!("wnodes.evt.{}.job.>", subject::encode_host(HOST).unwrap());
    let got = messages(&bus, subject_filter, 1).await;
    let ev = proto::Event::decode(got[0].payload.clone()).unwrap();
    assert_eq!(ev.id, "job.started:INFN-T1/slurm/7/1");
    let none = stored_messages(&bus, "wnodes.evt.hv9_example_org.job.>")
        .await
        .unwrap()
        .next(Duration::from_millis(500))
        .await
        .unwrap();
    assert!(none.is_none(), "a refused call was published");
}

/// `JobStarted` through gRPC follows the agent's rules: who the job is comes from its verified
/// credentials, never from the caller's fields; a token that does not verify is refused.
#[tokio::test(flavor = "multi_thread")]
async fn job_started_takes_the_identity_from_verified_credentials_only() {
    use wnodes_identity::token::testing::TestIssuer;
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let atlas = TestIssuer::new("https://atlas-auth.example/");
    std::fs::write(dir.path().join("atlas.jwks"), atlas.jwks()).unwrap();
    let verifier = wnodes_identity::Verifier::new(&wnodes_identity::IdentityConfig {
        token_issuers: vec![wnodes_identity::token::TokenIssuer {
            issuer: atlas.issuer.clone(),
            vo: "atlas".into(),
            jwks: dir.path().join("atlas.jwks"),
            audiences: vec![wnodes_identity::token::ANY_AUDIENCE.into()],
        }],
        ..Default::default()
    })
    .unwrap();
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let service =
        BridgeService::new(bus.clone(), "bridge@test".into(), stop.clone()).with_identity(verifier);
    tokio::spawn(server::serve(listener, service, None, stop.clone()));
    let mut client = proto::bridge_client::BridgeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let now = wnodes_identity::unix_now();
    // A caller claiming an identity, with a token of another VO's user: the token wins.
    let mut claimed = job("11");
    claimed.vo = "cms".into();
    claimed.identity = Some(proto::GridIdentity {
        x509_dn: "/CN=Someone Else".into(),
        ..Default::default()
    });
    client
        .job_started(proto::JobStartedRequest {
            job: Some(claimed),
            bearer_token: atlas.token("alice", now, serde_json::json!({})),
            ..Default::default()
        })
        .await
        .unwrap();
    let filter = format!(
        "wnodes.evt.{}.job.started",
        subject::encode_host(HOST).unwrap()
    );
    let got = messages(&bus, filter, 1).await;
    let ev = proto::Event::decode(got[0].payload.clone()).unwrap();
    let Some(Body::JobStarted(js)) = ev.body else {
        panic!("{ev:?}")
    };
    let j = js.job.unwrap();
    assert_eq!(j.vo, "atlas");
    let id = j.identity.unwrap();
    assert_eq!(
        (id.x509_dn.as_str(), id.token_subject.as_str()),
        ("", "alice")
    );
    // A forged token: refused with the reason, nothing published.
    let forged =
        TestIssuer::new("https://atlas-auth.example/").token("x", now, serde_json::json!({}));
    let e = client
        .job_started(proto::JobStartedRequest {
            job: Some(job("12")),
            bearer_token: forged,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("signature"), "{e:?}");
}
