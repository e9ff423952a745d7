//! NATS JWTs (v2) and `.creds` files, made in Rust (`nsc` is not available on the project's
//! machines): operator, account and user claims signed with ed25519 nkeys.

use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::SiteError;

/// Builds and signs a NATS JWT: header `{"typ":"JWT","alg":"ed25519-nkey"}`, claims with `jti`
/// = base32(sha256(claims without `jti`)) (nats-jwt uses SHA-512/256; the server only needs a
/// unique id), signed by `issuer` over `header.claims`, all base64url without padding.
pub fn encode(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    nats: Value,
) -> Result<String, SiteError> {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut claims = json!({
        "jti": "",
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let unhashed = serde_json::to_vec(&claims).map_err(SiteError::Json)?;
    claims["jti"] = Value::String(BASE32_NOPAD.encode(&Sha256::digest(&unhashed)));
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).map_err(SiteError::Json)?);
    let signing_input = format!("{header}.{body}");
    let sig = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| SiteError::Key(format!("signing the JWT of {name}: {e}")))?;
    Ok(format!("{signing_input}.{}", BASE64URL_NOPAD.encode(&sig)))
}

/// The claims of a JWT (the signature is not checked: this reads back what provisioning
/// wrote, to compare it with what it would write now).
pub fn claims(jwt: &str) -> Option<Value> {
    let body = jwt.trim().split('.').nth(1)?;
    let bytes = BASE64URL_NOPAD
        .decode(body.trim_end_matches('=').as_bytes())
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What makes two JWTs equivalent: everything but the issue time and id.
pub fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("iat");
            o.remove("jti");
        }
        v
    };
    strip(a) == strip(b)
}

/// The `.creds` file layout `nsc` writes: the user JWT and its nkey seed.
pub fn creds_file_text(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The user JWT and seed of a `.creds` file.
pub fn parse_creds(text: &str) -> Option<(String, String)> {
    let mut lines = text.lines().map(str::trim);
    let mut jwt = None;
    let mut seed = None;
    while let Some(line) = lines.next() {
        if line.starts_with("-----BEGIN NATS USER JWT") {
            jwt = lines.next().map(str::to_owned);
        } else if line.starts_with("-----BEGIN USER NKEY SEED") {
            seed = lines.next().map(str::to_owned);
        }
    }
    Some((jwt?, seed?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_is_signed_by_the_issuer_and_reads_back() {
        let op = KeyPair::new_operator();
        let jwt = encode(
            &op,
            &op.public_key(),
            "op",
            json!({"type": "operator", "version": 2}),
        )
        .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let c = claims(&jwt).unwrap();
        assert_eq!(c["iss"], op.public_key());
        assert_eq!(c["nats"]["type"], "operator");
        assert!(!c["jti"].as_str().unwrap().is_empty());
        let sig = BASE64URL_NOPAD.decode(parts[2].as_bytes()).unwrap();
        op.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        let again = encode(
            &op,
            &op.public_key(),
            "op",
            json!({"type": "operator", "version": 2}),
        )
        .unwrap();
        assert!(same_content(&c, &claims(&again).unwrap()));
        let other = encode(
            &op,
            &op.public_key(),
            "op2",
            json!({"type": "operator", "version": 2}),
        )
        .unwrap();
        assert!(!same_content(&c, &claims(&other).unwrap()));
    }

    #[test]
    fn creds_round_trip() {
        let text = creds_file_text("eyJ.a.b", "SUABC");
        assert_eq!(parse_creds(&text), Some(("eyJ.a.b".into(), "SUABC".into())));
        assert_eq!(parse_creds("nothing"), None);
    }
}
