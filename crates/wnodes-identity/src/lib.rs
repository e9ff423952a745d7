//! Grid credentials verified offline (issue 9, item 4), for every door a job comes in by: the
//! host agent (a job starter's credentials) and the bridge's gRPC ingest (a compute element's).
//!
//! - [`token`]: WLCG bearer tokens against the configured issuers' keys (JWKS files).
//! - [`proxy`]: X.509 proxies against a CA directory, and their VOMS attribute certificates
//!   against `vomsdir` LSC files.
//! - [`Verifier`] (this file): the `[<section>.identity]` settings, and the job's
//!   `GridIdentity` and VO from what was presented, or the refusal's reason.

#[cfg(test)]
mod error_rule;
pub mod proxy;
pub mod token;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wnodes_proto::v1::GridIdentity;

/// `[<section>.identity]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Refuse a job that brings no verified credential (default off: the VO is then the
    /// LRMS's, e.g. the Slurm account, or the caller's).
    pub require: bool,
    /// Trusted token issuers (`[[<section>.identity.token_issuers]]`: `issuer`, `vo`, `jwks`,
    /// `audiences`).
    pub token_issuers: Vec<token::TokenIssuer>,
    /// Trusted CAs for X.509 proxies and VOMS servers (default `/etc/grid-security/certificates`).
    pub ca_dir: PathBuf,
    /// VOMS LSC files, `<vomsdir>/<vo>/<host>.lsc` (default `/etc/grid-security/vomsdir`).
    pub vomsdir: PathBuf,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        let x509 = proxy::X509Config::default();
        Self {
            require: false,
            token_issuers: Vec::new(),
            ca_dir: x509.ca_dir,
            vomsdir: x509.vomsdir,
        }
    }
}

/// Why a job's credentials are refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("the bearer token is refused")]
    Token(#[source] token::TokenError),
    #[error("the X.509 proxy is refused")]
    Proxy(#[source] proxy::ProxyError),
    #[error("the X.509 proxy is VO '{proxy}''s and the bearer token VO '{token}''s")]
    VoMismatch { proxy: String, token: String },
    #[error(
        "this site requires a grid credential (an X.509 proxy or a WLCG bearer token) and none was presented"
    )]
    Missing,
}

/// The configured verification, keys loaded.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    require: bool,
    issuers: token::Issuers,
    x509: proxy::X509Config,
}

impl Verifier {
    /// Loads the issuers' keys.
    ///
    /// # Errors
    /// A JWKS file that cannot be read or is no key set, or an issuer listed twice.
    pub fn new(config: &IdentityConfig) -> Result<Self, token::IssuerConfigError> {
        Ok(Self {
            require: config.require,
            issuers: token::Issuers::load(&config.token_issuers)?,
            x509: proxy::X509Config {
                ca_dir: config.ca_dir.clone(),
                vomsdir: config.vomsdir.clone(),
            },
        })
    }

    /// The job's grid identity and VO at `now` (Unix seconds): from a verified X.509 proxy
    /// and/or bearer token when presented (both must verify, and name one VO), else an empty
    /// identity and `fallback_vo` (refused when `require` is on).
    ///
    /// # Errors
    /// The reason the credentials are refused.
    pub fn verify(
        &self,
        bearer_token: &str,
        x509_proxy: &[u8],
        fallback_vo: String,
        now: i64,
    ) -> Result<(GridIdentity, String), CredentialError> {
        let proxy = if x509_proxy.is_empty() {
            None
        } else {
            Some(proxy::verify(x509_proxy, &self.x509, now).map_err(CredentialError::Proxy)?)
        };
        let token = if bearer_token.trim().is_empty() {
            None
        } else {
            Some(
                self.issuers
                    .verify(bearer_token, now)
                    .map_err(CredentialError::Token)?,
            )
        };
        match (proxy, token) {
            (None, None) if self.require => Err(CredentialError::Missing),
            (None, None) => Ok((GridIdentity::default(), fallback_vo)),
            (Some(p), None) => Ok((
                GridIdentity {
                    x509_dn: p.dn,
                    voms_fqans: p.fqans,
                    ..Default::default()
                },
                p.vo,
            )),
            (p, Some(t)) => {
                if let Some(p) = &p
                    && p.vo != t.vo
                {
                    return Err(CredentialError::VoMismatch {
                        proxy: p.vo.clone(),
                        token: t.vo,
                    });
                }
                let (x509_dn, voms_fqans) = p.map(|p| (p.dn, p.fqans)).unwrap_or_default();
                Ok((
                    GridIdentity {
                        x509_dn,
                        voms_fqans,
                        token_subject: t.subject,
                        token_issuer: t.issuer,
                        token_groups: t.groups,
                    },
                    t.vo,
                ))
            }
        }
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_credentials_the_fallback_vo_unless_required() {
        let v = Verifier::new(&IdentityConfig::default()).unwrap();
        let (id, vo) = v.verify("", b"", "demo".into(), 0).unwrap();
        assert_eq!((id, vo.as_str()), (GridIdentity::default(), "demo"));
        let v = Verifier::new(&IdentityConfig {
            require: true,
            ..Default::default()
        })
        .unwrap();
        let e = v.verify(" ", b"", "demo".into(), 0).unwrap_err();
        assert!(e.to_string().contains("requires a grid credential"), "{e}");
        let e = v.verify("not.a.jwt", b"", "demo".into(), 0).unwrap_err();
        assert!(matches!(e, CredentialError::Token(_)), "{e}");
    }
}
