//! TLS and every credential type against a nats-server configured for it.

// Test helpers outside #[test] functions panic on failure too: that is the point of a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use wnodes_bus::{Bus, ErrorChain, NatsConfig, TlsConfig};
use wnodes_testkit::{
    NatsServer, TestPki, bus::BusClient, jwt_auth, nkey_block, nkey_user, token_block,
    user_password_block,
};

/// Connects and asks JetStream for the account's info (proof that the connection is usable:
/// JetStream answers). These servers have no site provisioned: the auth method is under test.
async fn try_connect(cfg: NatsConfig) -> Result<Bus, String> {
    let bus = BusClient::from_config(cfg)
        .name("auth-test@local")
        .without_streams()
        .connect()
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    bus.jetstream()
        .query_account()
        .await
        .map_err(|e| format!("JetStream did not answer: {e}"))?;
    Ok(bus)
}

fn cfg(url: String) -> NatsConfig {
    NatsConfig {
        url,
        connect_timeout: std::time::Duration::from_secs(3),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_accepts_a_client_certificate_and_refuses_none() {
    let pki = TestPki::generate().unwrap();
    let server = NatsServer::start_with_config(&pki.nats_tls_block(true))
        .await
        .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port());
    let good = NatsConfig {
        tls: Some(TlsConfig {
            ca_file: Some(pki.ca_pem().to_owned()),
            cert_file: Some(pki.client_cert().to_owned()),
            key_file: Some(pki.client_key().to_owned()),
        }),
        ..cfg(url.clone())
    };
    try_connect(good).await.unwrap();
    let no_cert = NatsConfig {
        tls: Some(TlsConfig {
            ca_file: Some(pki.ca_pem().to_owned()),
            ..Default::default()
        }),
        ..cfg(url)
    };
    let err = try_connect(no_cert).await.unwrap_err();
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_config_errors_name_the_file() {
    let err = wnodes_bus::connect::rustls_client_config(&TlsConfig {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(ErrorChain(&err).to_string().contains("/nonexistent/ca.pem"));
}

#[tokio::test(flavor = "multi_thread")]
async fn user_and_password() {
    let server = NatsServer::start_with_config(&user_password_block("wn", "s3cret"))
        .await
        .unwrap();
    let ok = NatsConfig {
        user: Some("wn".into()),
        password: Some("s3cret".into()),
        ..cfg(server.url())
    };
    try_connect(ok).await.unwrap();
    let bad = NatsConfig {
        user: Some("wn".into()),
        password: Some("wrong".into()),
        ..cfg(server.url())
    };
    let err = try_connect(bad).await.unwrap_err();
    assert!(err.to_lowercase().contains("authorization"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token() {
    let server = NatsServer::start_with_config(&token_block("t0ken"))
        .await
        .unwrap();
    try_connect(NatsConfig {
        token: Some("t0ken".into()),
        ..cfg(server.url())
    })
    .await
    .unwrap();
    let err = try_connect(NatsConfig {
        token: Some("nope".into()),
        ..cfg(server.url())
    })
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("authorization"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nkey_from_config_and_from_file() {
    let user = nkey_user();
    let server = NatsServer::start_with_config(&nkey_block(&user.public_key))
        .await
        .unwrap();
    try_connect(NatsConfig {
        nkey_seed: Some(user.seed.clone()),
        ..cfg(server.url())
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed)).unwrap();
    try_connect(NatsConfig {
        nkey_seed_file: Some(seed_file),
        ..cfg(server.url())
    })
    .await
    .unwrap();
    let other = nkey_user();
    let err = try_connect(NatsConfig {
        nkey_seed: Some(other.seed),
        ..cfg(server.url())
    })
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("authorization"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn creds_file() {
    let auth = jwt_auth().unwrap();
    let server = NatsServer::start_with_config(&auth.server_block)
        .await
        .unwrap();
    try_connect(NatsConfig {
        creds_file: Some(auth.creds_file.clone()),
        ..cfg(server.url())
    })
    .await
    .unwrap();
    let other = jwt_auth().unwrap();
    let err = try_connect(NatsConfig {
        creds_file: Some(other.creds_file.clone()),
        ..cfg(server.url())
    })
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("authorization"), "{err}");
    let err = try_connect(NatsConfig {
        creds_file: Some("/nonexistent.creds".into()),
        ..cfg(server.url())
    })
    .await
    .unwrap_err();
    assert!(err.contains("/nonexistent.creds"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_credentials_are_refused_before_connecting() {
    let err = try_connect(NatsConfig {
        token: Some("a".into()),
        user: Some("u".into()),
        password: Some("p".into()),
        ..cfg("nats://127.0.0.1:1".into())
    })
    .await
    .unwrap_err();
    assert!(err.contains("only one of"), "{err}");
}
