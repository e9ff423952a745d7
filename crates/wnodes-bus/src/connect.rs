//! Connecting to NATS: credentials, rustls, reconnect behaviour, connection-state logging.

use std::sync::Arc;

use async_nats::ConnectOptions;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{
    config::{NatsConfig, TlsConfig},
    denial::Denials,
    error::BusError,
    metrics::BusMetrics,
};

/// Installs ring as the process-wide rustls provider (idempotent). Call first thing in `main`.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, BusError> {
    std::fs::read(path).map_err(|source| BusError::ReadFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Builds the rustls client configuration from PEM files.
pub fn rustls_client_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, BusError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let ca_file = tls
        .ca_file
        .as_deref()
        .ok_or_else(|| BusError::Tls("tls.ca_file is required when tls is configured".into()))?;
    let ca_pem = read("the TLS CA file", ca_file)?;
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert
            .map_err(|e| BusError::Tls(format!("bad certificate in {}: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| BusError::Tls(format!("CA in {} rejected: {e}", ca_file.display())))?;
    }
    if roots.is_empty() {
        return Err(BusError::Tls(format!(
            "no certificate found in {}",
            ca_file.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BusError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let cert_pem = read("the TLS client certificate", cert_file)?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| BusError::Tls(format!("{}: {e}", cert_file.display())))?;
            let key_pem = read("the TLS client key", key_file)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| BusError::Tls(format!("{}: {e}", key_file.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| BusError::Tls(format!("client certificate rejected: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(BusError::Tls(
            "tls.cert_file and tls.key_file must be given together".into(),
        )),
    }
}

/// The identity a `.creds` file names: its user JWT's `name` claim, when that is a valid token
/// (`wnodesctl provision` names each user after its role and host: `launcher-hv01_example_org`).
pub fn creds_identity(path: &std::path::Path) -> Result<Option<String>, BusError> {
    let text = String::from_utf8(read("the NATS credentials file", path)?)
        .map_err(|_| BusError::Config(format!("{} is not UTF-8", path.display())))?;
    let Some(jwt) = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("eyJ") && l.split('.').count() == 3)
    else {
        return Ok(None);
    };
    let claims = jwt.split('.').nth(1).unwrap_or_default();
    let Ok(bytes) = data_encoding::BASE64URL_NOPAD.decode(claims.trim_end_matches('=').as_bytes())
    else {
        return Ok(None);
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(None);
    };
    Ok(value
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| crate::subject::validate_token("identity", n).is_ok())
        .map(str::to_owned))
}

/// The inbox prefix of this connection: `nats.inbox_prefix`, else `_INBOX.<identity>` when the
/// credentials name one (its permissions allow replies only there), else the default `_INBOX`.
pub fn inbox_prefix(cfg: &NatsConfig) -> Result<Option<String>, BusError> {
    if let Some(p) = &cfg.inbox_prefix {
        return Ok(Some(p.clone()));
    }
    match &cfg.creds_file {
        Some(path) => Ok(creds_identity(path)?.map(|id| format!("_INBOX.{id}"))),
        None => Ok(None),
    }
}

/// Builds connect options (credentials, TLS, timeouts, reconnect) from the configuration.
/// Permission violations the server reports are logged and recorded in `denials`.
pub async fn connect_options(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<BusMetrics>,
    denials: Option<Denials>,
) -> Result<ConnectOptions, BusError> {
    let methods = [
        cfg.user.is_some() || cfg.password.is_some(),
        cfg.token.is_some(),
        cfg.nkey_seed.is_some() || cfg.nkey_seed_file.is_some(),
        cfg.creds_file.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        return Err(BusError::Config(
            "nats: give only one of user/password, token, nkey_seed(_file), creds_file".into(),
        ));
    }
    let mut opts = if let Some(user) = &cfg.user {
        let password = cfg
            .password
            .clone()
            .ok_or_else(|| BusError::Config("nats.user is set but nats.password is not".into()))?;
        ConnectOptions::with_user_and_password(user.clone(), password)
    } else if cfg.password.is_some() {
        return Err(BusError::Config(
            "nats.password is set but nats.user is not".into(),
        ));
    } else if let Some(token) = &cfg.token {
        ConnectOptions::with_token(token.clone())
    } else if let Some(seed) = &cfg.nkey_seed {
        ConnectOptions::with_nkey(seed.trim().to_owned())
    } else if let Some(path) = &cfg.nkey_seed_file {
        let seed = String::from_utf8(read("the NKey seed file", path)?)
            .map_err(|_| BusError::Config(format!("{} is not UTF-8", path.display())))?;
        ConnectOptions::with_nkey(seed.trim().to_owned())
    } else if let Some(path) = &cfg.creds_file {
        ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| BusError::ReadFile {
                what: "the NATS credentials file",
                path: path.display().to_string(),
                source,
            })?
    } else {
        ConnectOptions::new()
    };
    if let Some(tls) = &cfg.tls {
        opts = opts
            .require_tls(true)
            .tls_client_config(rustls_client_config(tls)?);
    }
    if let Some(prefix) = inbox_prefix(cfg)? {
        opts = opts.custom_inbox_prefix(prefix);
    }
    let m = metrics.clone();
    opts = opts
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .max_reconnects(None)
        // async-nats asks for a delay before the very first attempt too (attempt 1): none then,
        // else every process would wait 200 ms before it first connects.
        .reconnect_delay_callback(|attempt| {
            if attempt <= 1 {
                return std::time::Duration::ZERO;
            }
            let ms = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
            std::time::Duration::from_millis(ms)
        })
        .event_callback(move |ev| {
            let m = m.clone();
            let denials = denials.clone();
            async move {
                match &ev {
                    async_nats::Event::ServerError(e)
                        if denials.as_ref().is_some_and(|d| d.record(&e.to_string())) => {}
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(error = %e, "NATS server error.")
                    }
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connection (re)established.")
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(
                            "NATS connection lost; reconnecting, publishes are buffered."
                        )
                    }
                    other => tracing::debug!(event = %other, "NATS client event."),
                }
                if let Some(m) = m {
                    m.connection_event(&ev);
                }
            }
        });
    Ok(opts)
}

/// Connects, failing after `connect_timeout` with an error naming the URL.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    metrics: Option<BusMetrics>,
    denials: Option<Denials>,
) -> Result<async_nats::Client, BusError> {
    let opts = connect_options(cfg, name, metrics, denials).await?;
    let fut = opts.connect(cfg.url.as_str());
    match tokio::time::timeout(cfg.connect_timeout + std::time::Duration::from_secs(1), fut).await {
        Ok(res) => res.map_err(|source| BusError::Connect {
            url: cfg.url.clone(),
            source,
        }),
        Err(_) => Err(BusError::Config(format!(
            "timed out after {:?} connecting to NATS at {}",
            cfg.connect_timeout, cfg.url
        ))),
    }
}
