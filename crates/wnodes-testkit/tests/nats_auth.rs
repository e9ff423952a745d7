//! Every NATS auth method from `nats_auth` and `pki`, verified against the real nats-server.

use std::time::Duration;

use async_nats::{ConnectOptions, jetstream};
use futures::StreamExt;
use wnodes_testkit::{
    NatsServer, TestPki, jwt_auth, nkey_block, nkey_user, token_block, user_password_block,
};

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connect with a timeout (a wedged connect must not hang the test).
async fn connect(opts: ConnectOptions, url: &str) -> Result<async_nats::Client, String> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        opts.connection_timeout(Duration::from_secs(3)).connect(url),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Connecting must fail with an authorization violation.
async fn refused(opts: ConnectOptions, url: &str) {
    let Err(err) = connect(opts, url).await else {
        panic!("connect must fail");
    };
    assert!(err.contains("authorization violation"), "{err}");
}

/// The connection really works: a round trip through the server.
async fn round_trip(client: &async_nats::Client) -> anyhow::Result<()> {
    let mut sub = client.subscribe("auth.check").await?;
    client.flush().await?;
    client.publish("auth.check", "ok".into()).await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
    anyhow::ensure!(
        &msg.payload[..] == b"ok",
        "unexpected payload {:?}",
        msg.payload
    );
    Ok(())
}

#[tokio::test]
async fn user_and_password() {
    init();
    let mut server = NatsServer::start_with_config(&user_password_block("alice", "s3cr3t"))
        .await
        .unwrap();
    let good = ConnectOptions::with_user_and_password("alice".into(), "s3cr3t".into());
    let client = connect(good.clone(), &server.url()).await.unwrap();
    round_trip(&client).await.unwrap();

    let wrong = ConnectOptions::with_user_and_password("alice".into(), "nope".into());
    refused(wrong, &server.url()).await;
    refused(ConnectOptions::new(), &server.url()).await;

    // restart() keeps the config.
    server.restart().await.unwrap();
    let client = connect(good, &server.url()).await.unwrap();
    round_trip(&client).await.unwrap();
    let wrong = ConnectOptions::with_user_and_password("alice".into(), "nope".into());
    refused(wrong, &server.url()).await;
}

#[tokio::test]
async fn token() {
    init();
    let server = NatsServer::start_with_config(&token_block("t0k3n"))
        .await
        .unwrap();
    let client = connect(ConnectOptions::with_token("t0k3n".into()), &server.url())
        .await
        .unwrap();
    round_trip(&client).await.unwrap();
    refused(ConnectOptions::with_token("other".into()), &server.url()).await;
    refused(ConnectOptions::new(), &server.url()).await;
}

#[tokio::test]
async fn nkey() {
    init();
    let user = nkey_user();
    let server = NatsServer::start_with_config(&nkey_block(&user.public_key))
        .await
        .unwrap();
    let client = connect(ConnectOptions::with_nkey(user.seed.clone()), &server.url())
        .await
        .unwrap();
    round_trip(&client).await.unwrap();

    let stranger = nkey_user();
    refused(ConnectOptions::with_nkey(stranger.seed), &server.url()).await;
    refused(ConnectOptions::new(), &server.url()).await;
}

#[tokio::test]
async fn jwt_operator_mode_with_jetstream() {
    init();
    let auth = jwt_auth().unwrap();
    let server = NatsServer::start_with_config(&auth.server_block)
        .await
        .unwrap();

    let opts = ConnectOptions::with_credentials_file(&auth.creds_file)
        .await
        .unwrap();
    let client = connect(opts, &server.url()).await.unwrap();
    round_trip(&client).await.unwrap();

    // JetStream works for the account.
    let js = jetstream::new(client);
    let mut stream = js
        .create_stream(jetstream::stream::Config {
            name: "JWT".into(),
            subjects: vec!["jwt.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    js.publish("jwt.one", "1".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    // No credentials, or a user of another operator: refused.
    refused(ConnectOptions::new(), &server.url()).await;
    let other = jwt_auth().unwrap();
    let opts = ConnectOptions::with_credentials_file(&other.creds_file)
        .await
        .unwrap();
    refused(opts, &server.url()).await;
}

fn tls_opts(pki: &TestPki, client_cert: bool) -> ConnectOptions {
    let opts = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.ca_pem().to_path_buf());
    if client_cert {
        opts.add_client_certificate(
            pki.client_cert().to_path_buf(),
            pki.client_key().to_path_buf(),
        )
    } else {
        opts
    }
}

#[tokio::test]
async fn mutual_tls() {
    init();
    let pki = TestPki::generate().unwrap();
    let server = NatsServer::start_with_config(&pki.nats_tls_block(true))
        .await
        .unwrap();

    let client = connect(tls_opts(&pki, true), &server.url()).await.unwrap();
    round_trip(&client).await.unwrap();

    // Missing client certificate: the server aborts the handshake.
    let err = connect(tls_opts(&pki, false), &server.url())
        .await
        .expect_err("a client without certificate must be refused");
    assert!(err.contains("CertificateRequired"), "{err}");

    // A client that does not trust our CA refuses the server.
    let untrusting = ConnectOptions::new()
        .require_tls(true)
        .add_client_certificate(
            pki.client_cert().to_path_buf(),
            pki.client_key().to_path_buf(),
        );
    let err = connect(untrusting, &server.url())
        .await
        .expect_err("a client must not trust a server outside its roots");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn server_only_tls() {
    init();
    let pki = TestPki::generate().unwrap();
    let server = NatsServer::start_with_config(&pki.nats_tls_block(false))
        .await
        .unwrap();
    let client = connect(tls_opts(&pki, false), &server.url()).await.unwrap();
    round_trip(&client).await.unwrap();
}
