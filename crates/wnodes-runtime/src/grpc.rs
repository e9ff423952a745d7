//! What a service's gRPC server shares with the others: its TLS settings (`tls_cert`,
//! `tls_key`, `client_ca` in the service's section; rustls through tonic), with errors that name
//! the key that is wrong.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Why a gRPC server's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GrpcTlsError {
    /// A key is missing or set without the ones it needs (`bridge.tls_key: required with
    /// bridge.tls_cert`).
    #[error("{0}")]
    Config(String),
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, GrpcTlsError> {
    std::fs::read(path).map_err(|source| GrpcTlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The server's TLS from `[<section>] tls_cert, tls_key, client_ca`: `None` for plain TCP (none
/// set); with `client_ca`, clients must present a certificate it signed (mTLS).
pub fn server_tls(
    section: &str,
    tls_cert: Option<&Path>,
    tls_key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, GrpcTlsError> {
    let (cert, key) = match (tls_cert, tls_key) {
        (None, None) => {
            if client_ca.is_some() {
                return Err(GrpcTlsError::Config(format!(
                    "{section}.client_ca: needs {section}.tls_cert and {section}.tls_key"
                )));
            }
            return Ok(None);
        }
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => {
            return Err(GrpcTlsError::Config(format!(
                "{section}.tls_key: required with {section}.tls_cert"
            )));
        }
        (None, Some(_)) => {
            return Err(GrpcTlsError::Config(format!(
                "{section}.tls_cert: required with {section}.tls_key"
            )));
        }
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}
