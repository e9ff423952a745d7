//! WLCG bearer tokens (JWT, WLCG Common JWT Profile 1.0) verified offline against the issuer
//! keys in the agent's configuration (`[[agent.identity.token_issuers]]`, one JWKS file each):
//! no network, no token introspection.
//!
//! A token is accepted when its header names `ES256` or `RS256` and a key of its issuer
//! verifies the signature; `iss` is a configured issuer (an issuer issues for one VO); `exp` is
//! in the future and `nbf`, when present, in the past (60 s leeway each); `iat` and `sub` are
//! present; `aud` names one of the issuer's accepted audiences; `wlcg.ver` is `1.0` (or `ver` is
//! `scitoken:2.0`); and every `wlcg.groups` entry lies under the issuer's VO (`/atlas`,
//! `/atlas/...`). What it yields: the subject, the issuer, the VO and the groups.

use std::{collections::BTreeMap, path::PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The accepted audience when an issuer names none: the WLCG profile's "any relying party".
pub const ANY_AUDIENCE: &str = "https://wlcg.cern.ch/jwt/v1/any";
/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: i64 = 60;

/// One trusted token issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIssuer {
    /// The `iss` claim, exactly.
    pub issuer: String,
    /// The VO it issues for.
    pub vo: String,
    /// Its keys: a JWKS file (`{"keys": [...]}`, EC P-256 or RSA keys).
    pub jwks: PathBuf,
    /// Accepted `aud` values (default: [`ANY_AUDIENCE`]).
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
}

fn default_audiences() -> Vec<String> {
    vec![ANY_AUDIENCE.to_owned()]
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    pub issuer: String,
    pub vo: String,
    /// `wlcg.groups`, in the token's order.
    pub groups: Vec<String>,
}

/// Why a token is refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token's issuer {0:?} is not a trusted issuer of this site")]
    UnknownIssuer(String),
    #[error("the token's algorithm {0:?} is not accepted (ES256 or RS256)")]
    Algorithm(String),
    #[error("the token's signature does not verify with any key of its issuer {0:?}")]
    Signature(String),
    #[error("the token expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("the token is not valid before {nbf} (now {now})")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("the token's audience {aud} is none of {accepted:?}")]
    Audience { aud: String, accepted: Vec<String> },
    #[error("the token lacks the claim {0}")]
    Missing(&'static str),
    #[error("the token's {claim} is {value:?}, not a WLCG 1.0 or SciTokens 2.0 token")]
    Version { claim: &'static str, value: String },
    #[error("the token's group {group:?} is not under its issuer's VO '{vo}'")]
    Group { group: String, vo: String },
}

/// Why the issuers' configuration cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IssuerConfigError {
    #[error("cannot read the JWKS file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the JWKS file {path} is not a key set: {why}")]
    Keys { path: PathBuf, why: String },
    #[error("issuer {0:?} is configured twice")]
    Duplicate(String),
}

/// One public key of an issuer.
#[derive(Debug, Clone)]
enum Key {
    /// Uncompressed P-256 point (0x04 || x || y).
    Ec { kid: Option<String>, point: Vec<u8> },
    Rsa {
        kid: Option<String>,
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

impl Key {
    fn kid(&self) -> Option<&str> {
        match self {
            Key::Ec { kid, .. } | Key::Rsa { kid, .. } => kid.as_deref(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| e.to_string())
}

fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let set: Jwks = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for (i, k) in set.keys.into_iter().enumerate() {
        let need = |v: Option<String>, what: &str| {
            v.ok_or_else(|| format!("key {i}: no {what}"))
                .and_then(|s| b64(&s).map_err(|e| format!("key {i}: {what}: {e}")))
        };
        match k.kty.as_str() {
            "EC" => {
                if k.crv.as_deref() != Some("P-256") {
                    return Err(format!("key {i}: curve {:?}, only P-256", k.crv));
                }
                let (x, y) = (need(k.x, "x")?, need(k.y, "y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("key {i}: x and y must be 32 bytes"));
                }
                let mut point = vec![4u8];
                point.extend(x);
                point.extend(y);
                keys.push(Key::Ec { kid: k.kid, point });
            }
            "RSA" => keys.push(Key::Rsa {
                kid: k.kid,
                n: need(k.n, "n")?,
                e: need(k.e, "e")?,
            }),
            other => return Err(format!("key {i}: key type {other:?}, only EC and RSA")),
        }
    }
    if keys.is_empty() {
        return Err("no keys".into());
    }
    Ok(keys)
}

/// The trusted issuers with their keys.
#[derive(Debug, Clone, Default)]
pub struct Issuers {
    by_iss: BTreeMap<String, (TokenIssuer, Vec<Key>)>,
}

impl Issuers {
    /// Loads every issuer's keys.
    ///
    /// # Errors
    /// A JWKS file that cannot be read or is not a key set (named), or an issuer listed twice.
    pub fn load(issuers: &[TokenIssuer]) -> Result<Self, IssuerConfigError> {
        let mut by_iss = BTreeMap::new();
        for i in issuers {
            let text =
                std::fs::read_to_string(&i.jwks).map_err(|source| IssuerConfigError::Read {
                    path: i.jwks.clone(),
                    source,
                })?;
            let keys = parse_jwks(&text).map_err(|why| IssuerConfigError::Keys {
                path: i.jwks.clone(),
                why,
            })?;
            if by_iss.insert(i.issuer.clone(), (i.clone(), keys)).is_some() {
                return Err(IssuerConfigError::Duplicate(i.issuer.clone()));
            }
        }
        Ok(Self { by_iss })
    }

    /// Whether any issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.by_iss.is_empty()
    }

    /// Verifies `token` at `now` (Unix seconds).
    ///
    /// # Errors
    /// The first reason the token is refused.
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let token = token.trim();
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "not three dot-separated parts".into(),
            ));
        };
        let header: serde_json::Value = serde_json::from_slice(
            &b64(h).map_err(|e| TokenError::Malformed(format!("header: {e}")))?,
        )
        .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
        let claims: serde_json::Value = serde_json::from_slice(
            &b64(p).map_err(|e| TokenError::Malformed(format!("payload: {e}")))?,
        )
        .map_err(|e| TokenError::Malformed(format!("payload: {e}")))?;
        let sig = b64(sig).map_err(|e| TokenError::Malformed(format!("signature: {e}")))?;
        let alg = header["alg"].as_str().unwrap_or_default().to_owned();
        let iss = claims["iss"]
            .as_str()
            .ok_or(TokenError::Missing("iss"))?
            .to_owned();
        let (issuer, keys) = self
            .by_iss
            .get(&iss)
            .ok_or_else(|| TokenError::UnknownIssuer(iss.clone()))?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let kid = header["kid"].as_str();
        let candidates = keys
            .iter()
            .filter(|k| kid.is_none() || k.kid().is_none() || k.kid() == kid);
        let verified = match alg.as_str() {
            "ES256" => candidates
                .filter_map(|k| match k {
                    Key::Ec { point, .. } => Some(point),
                    Key::Rsa { .. } => None,
                })
                .any(|point| {
                    ring::signature::UnparsedPublicKey::new(
                        &ring::signature::ECDSA_P256_SHA256_FIXED,
                        point,
                    )
                    .verify(signed, &sig)
                    .is_ok()
                }),
            "RS256" => candidates
                .filter_map(|k| match k {
                    Key::Rsa { n, e, .. } => Some((n, e)),
                    Key::Ec { .. } => None,
                })
                .any(|(n, e)| {
                    ring::signature::RsaPublicKeyComponents { n, e }
                        .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                        .is_ok()
                }),
            other => return Err(TokenError::Algorithm(other.to_owned())),
        };
        if !verified {
            return Err(TokenError::Signature(iss));
        }
        // The claims, now that they are the issuer's.
        let exp = claims["exp"].as_i64().ok_or(TokenError::Missing("exp"))?;
        if now > exp + LEEWAY_SECS {
            return Err(TokenError::Expired { exp, now });
        }
        if let Some(nbf) = claims["nbf"].as_i64()
            && now + LEEWAY_SECS < nbf
        {
            return Err(TokenError::NotYetValid { nbf, now });
        }
        claims["iat"].as_i64().ok_or(TokenError::Missing("iat"))?;
        let sub = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::Missing("sub"))?;
        let auds: Vec<&str> = match &claims["aud"] {
            serde_json::Value::String(a) => vec![a.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => return Err(TokenError::Missing("aud")),
        };
        if !auds
            .iter()
            .any(|a| issuer.audiences.iter().any(|ok| ok == a))
        {
            return Err(TokenError::Audience {
                aud: auds.join(" "),
                accepted: issuer.audiences.clone(),
            });
        }
        match (claims["wlcg.ver"].as_str(), claims["ver"].as_str()) {
            (Some("1.0"), _) | (None, Some("scitoken:2.0")) => {}
            (Some(v), _) => {
                return Err(TokenError::Version {
                    claim: "wlcg.ver",
                    value: v.to_owned(),
                });
            }
            (None, Some(v)) => {
                return Err(TokenError::Version {
                    claim: "ver",
                    value: v.to_owned(),
                });
            }
            (None, None) => return Err(TokenError::Missing("wlcg.ver")),
        }
        let root = format!("/{}", issuer.vo);
        let groups: Vec<String> = claims["wlcg.groups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(g) = groups
            .iter()
            .find(|g| **g != root && !g.starts_with(&format!("{root}/")))
        {
            return Err(TokenError::Group {
                group: g.clone(),
                vo: issuer.vo.clone(),
            });
        }
        Ok(VerifiedToken {
            subject: sub.to_owned(),
            issuer: iss,
            vo: issuer.vo.clone(),
            groups,
        })
    }
}

/// Test helpers: an issuer's key pair and tokens it signs (`ring`, ES256). Only in tests (and
/// with the `test-tokens` feature, which the agent's and the bridge's tests turn on).
#[cfg(any(test, feature = "test-tokens"))]
#[allow(clippy::expect_used)] // test code: a failure is the report
pub mod testing {
    use super::*;
    use ring::signature::KeyPair as _;

    /// An ES256 key pair of a test issuer.
    #[derive(Debug)]
    pub struct TestIssuer {
        pub issuer: String,
        pair: ring::signature::EcdsaKeyPair,
    }

    impl TestIssuer {
        pub fn new(issuer: &str) -> Self {
            let rng = ring::rand::SystemRandom::new();
            let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 =
                ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("a P-256 key");
            let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                .expect("the key just made");
            Self {
                issuer: issuer.into(),
                pair,
            }
        }

        /// The JWKS of its public key.
        pub fn jwks(&self) -> String {
            let point = self.pair.public_key().as_ref();
            let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            serde_json::json!({"keys": [{
                "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
                "x": enc(&point[1..33]), "y": enc(&point[33..65]),
            }]})
            .to_string()
        }

        /// A token with `claims` (merged over a valid WLCG 1.0 token for `sub`).
        pub fn token(&self, sub: &str, now: i64, claims: serde_json::Value) -> String {
            let mut c = serde_json::json!({
                "iss": self.issuer, "sub": sub, "aud": ANY_AUDIENCE, "wlcg.ver": "1.0",
                "iat": now, "nbf": now, "exp": now + 3600, "jti": "0",
            });
            if let (Some(base), Some(more)) = (c.as_object_mut(), claims.as_object()) {
                for (k, v) in more {
                    base.insert(k.clone(), v.clone());
                }
            }
            self.sign(
                &serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "k1"}),
                &c,
            )
        }

        /// Signs any header and claims.
        pub fn sign(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
            let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let signed = format!(
                "{}.{}",
                enc(header.to_string().as_bytes()),
                enc(claims.to_string().as_bytes())
            );
            let rng = ring::rand::SystemRandom::new();
            let sig = self.pair.sign(&rng, signed.as_bytes()).expect("signing");
            format!("{signed}.{}", enc(sig.as_ref()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::TestIssuer, *};

    const NOW: i64 = 1_800_000_000;

    fn issuers(dir: &std::path::Path, t: &TestIssuer, vo: &str) -> Issuers {
        let path = dir.join(format!("{vo}.jwks"));
        std::fs::write(&path, t.jwks()).unwrap();
        Issuers::load(&[TokenIssuer {
            issuer: t.issuer.clone(),
            vo: vo.into(),
            jwks: path,
            audiences: default_audiences(),
        }])
        .unwrap()
    }

    #[test]
    fn a_valid_token_yields_its_subject_vo_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let atlas = TestIssuer::new("https://atlas-auth.cern.ch/");
        let trust = issuers(dir.path(), &atlas, "atlas");
        let tok = atlas.token(
            "e1eb758b",
            NOW,
            serde_json::json!({"wlcg.groups": ["/atlas/production", "/atlas"]}),
        );
        let v = trust.verify(&tok, NOW).unwrap();
        assert_eq!(
            v,
            VerifiedToken {
                subject: "e1eb758b".into(),
                issuer: "https://atlas-auth.cern.ch/".into(),
                vo: "atlas".into(),
                groups: vec!["/atlas/production".into(), "/atlas".into()],
            }
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let atlas = TestIssuer::new("https://atlas-auth.cern.ch/");
        let trust = issuers(dir.path(), &atlas, "atlas");
        let why = |tok: &str| trust.verify(tok, NOW).unwrap_err().to_string();
        // An issuer the site does not trust, even with a good signature of its own.
        let rogue = TestIssuer::new("https://rogue.example/");
        assert!(
            why(&rogue.token("s", NOW, serde_json::json!({}))).contains("not a trusted issuer"),
        );
        // A trusted issuer's name, another key: the signature does not verify.
        let forger = TestIssuer::new("https://atlas-auth.cern.ch/");
        assert!(why(&forger.token("s", NOW, serde_json::json!({}))).contains("signature"));
        // Expired (beyond the leeway), not yet valid.
        let e = why(&atlas.token("s", NOW - 7200, serde_json::json!({})));
        assert!(e.contains("expired"), "{e}");
        let e = why(&atlas.token("s", NOW, serde_json::json!({"nbf": NOW + 600})));
        assert!(e.contains("not valid before"), "{e}");
        // Another audience; another VO's group; no WLCG version.
        let e = why(&atlas.token(
            "s",
            NOW,
            serde_json::json!({"aud": "https://other.example"}),
        ));
        assert!(e.contains("audience"), "{e}");
        let e = why(&atlas.token("s", NOW, serde_json::json!({"wlcg.groups": ["/cms"]})));
        assert!(
            e.contains("\"/cms\" is not under its issuer's VO 'atlas'"),
            "{e}"
        );
        let e = why(&atlas.token("s", NOW, serde_json::json!({"wlcg.ver": "2.0"})));
        assert!(e.contains("wlcg.ver"), "{e}");
        // `alg: none`, and bytes that are no JWT.
        let claims = serde_json::json!({"iss": atlas.issuer, "sub": "s"});
        let none = atlas.sign(&serde_json::json!({"alg": "none"}), &claims);
        assert!(why(&none).contains("algorithm"), "{}", why(&none));
        assert!(why("garbage").contains("not a JWT"));
        // A token cut short loses its signature.
        let tok = atlas.token("s", NOW, serde_json::json!({}));
        let cut = &tok[..tok.len() - 4];
        assert!(why(cut).contains("signature") || why(cut).contains("not a JWT"));
    }

    #[test]
    fn a_jwks_that_is_no_key_set_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jwks");
        std::fs::write(&path, r#"{"keys": [{"kty": "OKP"}]}"#).unwrap();
        let e = Issuers::load(&[TokenIssuer {
            issuer: "https://x/".into(),
            vo: "x".into(),
            jwks: path.clone(),
            audiences: default_audiences(),
        }])
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("OKP"),
            "{msg}"
        );
    }
}
