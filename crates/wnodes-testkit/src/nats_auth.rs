//! nats-server config text and client credentials for each NATS auth method.
//!
//! Pass the returned blocks to [`crate::NatsServer::start_with_config`]; connect with the
//! matching `async_nats::ConnectOptions` constructor (`with_user_and_password`, `with_token`,
//! `with_nkey(seed)`, `with_credentials_file(creds_file)`).

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use nkeys::KeyPair;
use serde_json::{Value, json};

/// Quote a string for the nats-server config language (a JSON string literal is valid there).
fn quote(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// `authorization { user: .., password: .. }`.
pub fn user_password_block(user: &str, password: &str) -> String {
    format!(
        "authorization {{\n  user: {}\n  password: {}\n}}\n",
        quote(user),
        quote(password)
    )
}

/// `authorization { token: .. }`.
pub fn token_block(token: &str) -> String {
    format!("authorization {{\n  token: {}\n}}\n", quote(token))
}

/// A fresh NKEY user (`nkeys::KeyPair::new_user()`): the public key goes into the server config
/// ([`nkey_block`]), the seed into `ConnectOptions::with_nkey`.
#[derive(Debug, Clone)]
pub struct NkeyUser {
    /// `U...` public key.
    pub public_key: String,
    /// `SU...` seed (the secret).
    pub seed: String,
}

/// Generate a new NKEY user.
pub fn nkey_user() -> NkeyUser {
    let kp = KeyPair::new_user();
    NkeyUser {
        public_key: kp.public_key(),
        // A freshly generated pair always has its seed; an empty seed would fail loudly at connect.
        seed: kp.seed().unwrap_or_default(),
    }
}

/// `authorization { users = [ { nkey: U... } ] }`.
pub fn nkey_block(public_key: &str) -> String {
    format!(
        "authorization {{\n  users = [\n    {{ nkey: {} }}\n  ]\n}}\n",
        quote(public_key)
    )
}

/// Decentralised JWT auth: a generated operator, system account, application account (JetStream
/// enabled, unlimited) and one user of that account (may publish/subscribe to everything).
#[derive(Debug)]
pub struct JwtAuth {
    /// `operator`, `system_account`, `resolver: MEMORY` and `resolver_preload` with both account JWTs.
    pub server_block: String,
    /// Standard `.creds` file (user JWT + user seed) for `ConnectOptions::with_credentials_file`.
    pub creds_file: PathBuf,
    /// Public key (`A...`) of the application account the user belongs to.
    pub account_public_key: String,
    /// Public key (`U...`) of the user.
    pub user_public_key: String,
    /// Keeps `creds_file` alive.
    _dir: tempfile::TempDir,
}

impl JwtAuth {
    /// The directory holding the creds file.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// Generate operator, accounts and user JWTs plus the server config and the user's creds file.
pub fn jwt_auth() -> anyhow::Result<JwtAuth> {
    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let account = KeyPair::new_account();
    let user = KeyPair::new_user();

    let operator_jwt = encode_jwt(
        &operator,
        &operator.public_key(),
        "wnodes-test-operator",
        json!({
            "type": "operator",
            "version": 2,
            "system_account": system.public_key(),
        }),
    )?;
    let system_jwt = encode_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({
            "type": "account",
            "version": 2,
            "limits": unlimited_account_limits(false),
            "default_permissions": { "pub": {}, "sub": {} },
            // The system account conventionally exports these services (as nsc writes it).
            "exports": [
                {
                    "name": "account-monitoring-services",
                    "subject": "$SYS.REQ.ACCOUNT.*.*",
                    "type": "service",
                    "response_type": "Stream",
                    "account_token_position": 4
                },
                {
                    "name": "account-monitoring-streams",
                    "subject": "$SYS.ACCOUNT.*.>",
                    "type": "stream",
                    "account_token_position": 3
                }
            ]
        }),
    )?;
    let account_jwt = encode_jwt(
        &operator,
        &account.public_key(),
        "wnodes-test-account",
        json!({
            "type": "account",
            "version": 2,
            "limits": unlimited_account_limits(true),
            "default_permissions": { "pub": {}, "sub": {} },
        }),
    )?;
    let user_jwt = encode_jwt(
        &account,
        &user.public_key(),
        "wnodes-test-user",
        json!({
            "type": "user",
            "version": 2,
            // Empty permission objects mean "allow everything".
            "pub": {},
            "sub": {},
            "subs": -1,
            "data": -1,
            "payload": -1,
        }),
    )?;

    let server_block = format!(
        "operator: {op}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: {sys_jwt}\n  {acc}: {acc_jwt}\n}}\n",
        op = quote(&operator_jwt),
        sys = system.public_key(),
        sys_jwt = quote(&system_jwt),
        acc = account.public_key(),
        acc_jwt = quote(&account_jwt),
    );

    let dir = tempfile::Builder::new()
        .prefix("wnodes-jwt-")
        .tempdir()
        .context("creating the creds temp dir")?;
    let creds_file = dir.path().join("user.creds");
    let seed = user
        .seed()
        .map_err(|e| anyhow!("reading the user seed: {e}"))?;
    std::fs::write(&creds_file, creds_file_text(&user_jwt, &seed))
        .with_context(|| format!("writing {}", creds_file.display()))?;

    Ok(JwtAuth {
        server_block,
        creds_file,
        account_public_key: account.public_key(),
        user_public_key: user.public_key(),
        _dir: dir,
    })
}

/// Account limits with everything unlimited; with `jetstream`, JetStream is enabled (any
/// non-zero `mem_storage`/`disk_storage` turns it on for the account; -1 = unlimited).
fn unlimited_account_limits(jetstream: bool) -> Value {
    let js = if jetstream { -1 } else { 0 };
    json!({
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": true,
        "conn": -1,
        "leaf": -1,
        "mem_storage": js,
        "disk_storage": js,
        "streams": js,
        "consumer": js,
    })
}

fn encode_jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> anyhow::Result<String> {
    wnodes_site::jwt::encode(issuer, subject, name, nats)
        .map_err(|e| anyhow!("signing the JWT of {name}: {e}"))
}

fn creds_file_text(user_jwt: &str, seed: &str) -> String {
    wnodes_site::jwt::creds_file_text(user_jwt, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_quote_values() {
        assert_eq!(
            user_password_block("a", "p\"w"),
            "authorization {\n  user: \"a\"\n  password: \"p\\\"w\"\n}\n"
        );
        assert!(token_block("t0k").contains("token: \"t0k\""));
        let u = nkey_user();
        assert!(u.public_key.starts_with('U'));
        assert!(u.seed.starts_with("SU"));
        assert!(nkey_block(&u.public_key).contains(&u.public_key));
    }
}
