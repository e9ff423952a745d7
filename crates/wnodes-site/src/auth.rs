//! The site's NATS accounts and users as files: decentralised JWT authentication (operator
//! mode). Why JWTs and not a static user list: ARCHITECTURE.md, "Trust boundaries".
//!
//! ```text
//! <dir>/keys/{operator,system,account}.nk   the signing seeds (0600): keep them off the hosts
//! <dir>/nats-auth.conf                      for nats-server: `include` it (operator, resolver)
//! <dir>/creds/<identity>.creds              one per identity (0600): copy each to its host
//! ```
//!
//! Idempotent: keys are made once; a JWT is rewritten only when its content (permissions,
//! names, keys) differs, so a second run with the same description writes nothing.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use nkeys::KeyPair;
use serde_json::{Value, json};

use crate::{
    description::SiteDescription,
    error::SiteError,
    identity::Identity,
    jwt,
    report::{Action, Change, Report},
};

/// The provisioning directory of one site.
#[derive(Debug, Clone)]
pub struct AuthDir {
    root: PathBuf,
}

/// Whether to write, or only say what would be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    DryRun,
}

impl AuthDir {
    pub fn new(root: &Path) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `include` this from nats-server's configuration.
    pub fn server_conf(&self) -> PathBuf {
        self.root.join("nats-auth.conf")
    }

    pub fn creds_dir(&self) -> PathBuf {
        self.root.join("creds")
    }

    /// The creds file of `identity`.
    pub fn creds(&self, identity: &Identity) -> PathBuf {
        self.creds_dir().join(identity.creds_file_name())
    }

    /// The operator's creds (`admin`), for provisioning the streams.
    pub fn admin_creds(&self) -> PathBuf {
        self.creds(&Identity::admin())
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.root.join("keys").join(format!("{name}.nk"))
    }

    /// Makes (or checks) the keys, the server configuration and every identity's creds.
    pub fn provision(&self, site: &SiteDescription, mode: Mode) -> Result<Report, SiteError> {
        let mut report = Report::default();
        let operator = self.key("operator", KeyPair::new_operator, mode, &mut report)?;
        let system = self.key("system", KeyPair::new_account, mode, &mut report)?;
        let account = self.key("account", KeyPair::new_account, mode, &mut report)?;
        let conf = server_conf(site, &operator, &system, &account)?;
        let conf_path = self.server_conf();
        self.write_if_changed(
            &conf_path,
            "server configuration",
            &conf,
            |old| same_server_conf(old, &conf),
            false,
            mode,
            &mut report,
        )?;
        let identities = site.identities()?;
        for id in &identities {
            self.user(id, &account, mode, &mut report)?;
        }
        // Creds of identities the description no longer names: reported, not removed (the
        // operator revokes them; removing a file would not make the JWT invalid).
        if let Ok(entries) = std::fs::read_dir(self.creds_dir()) {
            let known: std::collections::HashSet<String> =
                identities.iter().map(Identity::creds_file_name).collect();
            let mut stale: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".creds") && !known.contains(n))
                .collect();
            stale.sort();
            for n in stale {
                report.push(Change::new(
                    format!("creds {}", n.trim_end_matches(".creds")),
                    Action::Stale,
                    "not in the site description",
                ));
            }
        }
        Ok(report)
    }

    /// Loads the seed `name`, or makes one (dry run: a throwaway key, reported as created).
    fn key(
        &self,
        name: &str,
        make: fn() -> KeyPair,
        mode: Mode,
        report: &mut Report,
    ) -> Result<KeyPair, SiteError> {
        let path = self.key_path(name);
        match std::fs::read_to_string(&path) {
            Ok(seed) => {
                let kp = KeyPair::from_seed(seed.trim())
                    .map_err(|e| SiteError::Key(format!("{}: {e}", path.display())))?;
                report.push(Change::new(format!("key {name}"), Action::Unchanged, ""));
                Ok(kp)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = make();
                let seed = kp.seed().map_err(|e| SiteError::Key(e.to_string()))?;
                if mode == Mode::Apply {
                    write_file(&path, &format!("{seed}\n"), true)?;
                }
                report.push(Change::new(format!("key {name}"), Action::Create, ""));
                Ok(kp)
            }
            Err(e) => Err(SiteError::io("read", &path, e)),
        }
    }

    /// Writes `identity`'s creds unless the existing file says the same.
    fn user(
        &self,
        id: &Identity,
        account: &KeyPair,
        mode: Mode,
        report: &mut Report,
    ) -> Result<(), SiteError> {
        let path = self.creds(id);
        let existing = match std::fs::read_to_string(&path) {
            Ok(t) => jwt::parse_creds(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(SiteError::io("read", &path, e)),
        };
        let user = match existing.as_ref().map(|(_, seed)| KeyPair::from_seed(seed)) {
            Some(Ok(kp)) => kp,
            _ => KeyPair::new_user(),
        };
        let claims = user_claims(id)?;
        let token = jwt::encode(account, &user.public_key(), &id.name, claims)?;
        let object = format!("creds {}", id.name);
        let action = match &existing {
            None => Action::Create,
            Some((old, _)) => {
                let same = jwt::claims(old)
                    .zip(jwt::claims(&token))
                    .is_some_and(|(a, b)| jwt::same_content(&a, &b));
                if same {
                    report.push(Change::new(object, Action::Unchanged, ""));
                    return Ok(());
                }
                Action::Update
            }
        };
        if mode == Mode::Apply {
            let seed = user.seed().map_err(|e| SiteError::Key(e.to_string()))?;
            write_file(&path, &jwt::creds_file_text(&token, &seed), true)?;
        }
        report.push(Change::new(object, action, ""));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write_if_changed(
        &self,
        path: &Path,
        what: &str,
        content: &str,
        same: impl Fn(&str) -> bool,
        secret: bool,
        mode: Mode,
        report: &mut Report,
    ) -> Result<(), SiteError> {
        let action = match std::fs::read_to_string(path) {
            Ok(old) if same(&old) => Action::Unchanged,
            Ok(_) => Action::Update,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Action::Create,
            Err(e) => return Err(SiteError::io("read", path, e)),
        };
        if action != Action::Unchanged && mode == Mode::Apply {
            write_file(path, content, secret)?;
        }
        report.push(Change::new(what, action, ""));
        Ok(())
    }
}

/// The `nats` claims of a user JWT: its permissions, no other limit.
fn user_claims(id: &Identity) -> Result<Value, SiteError> {
    // Always explicit (the admin's is `>`): a user without permissions would get the
    // account's default, which denies everything.
    let p = id.permissions()?;
    let (publish, subscribe) = (
        json!({ "allow": p.publish }),
        json!({ "allow": p.subscribe }),
    );
    let mut claims = json!({
        "type": "user",
        "version": 2,
        "pub": publish,
        "sub": subscribe,
        "subs": -1,
        "data": -1,
        "payload": -1,
    });
    if let Some(r) = p.responses {
        // nats-server's `ResponsePermission`: `ttl` is a Go duration, in nanoseconds.
        claims["resp"] = json!({
            "max": r.max_msgs,
            "ttl": u64::try_from(r.ttl.as_nanos()).unwrap_or(u64::MAX),
        });
    }
    Ok(claims)
}

/// Account limits: everything unlimited; with `jetstream`, JetStream enabled.
fn account_limits(jetstream: bool) -> Value {
    let js = if jetstream { -1 } else { 0 };
    json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js,
    })
}

/// The server's part: the operator, the system account and the site's account, preloaded.
fn server_conf(
    site: &SiteDescription,
    operator: &KeyPair,
    system: &KeyPair,
    account: &KeyPair,
) -> Result<String, SiteError> {
    let operator_jwt = jwt::encode(
        operator,
        &operator.public_key(),
        &format!("wnodes-{}", site.site),
        json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    )?;
    let system_jwt = jwt::encode(
        operator,
        &system.public_key(),
        "SYS",
        json!({
            "type": "account", "version": 2,
            "limits": account_limits(false),
            "default_permissions": { "pub": {}, "sub": {} },
            "exports": [
                { "name": "account-monitoring-services", "subject": "$SYS.REQ.ACCOUNT.*.*",
                  "type": "service", "response_type": "Stream", "account_token_position": 4 },
                { "name": "account-monitoring-streams", "subject": "$SYS.ACCOUNT.*.>",
                  "type": "stream", "account_token_position": 3 }
            ]
        }),
    )?;
    let account_jwt = jwt::encode(
        operator,
        &account.public_key(),
        "WNODES",
        json!({
            "type": "account", "version": 2,
            "limits": account_limits(true),
            // A user without explicit permissions may do nothing.
            "default_permissions": { "pub": { "deny": [">"] }, "sub": { "deny": [">"] } },
        }),
    )?;
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    Ok(format!(
        "# Written by `wnodesctl provision`: do not edit; run it again instead.\n\
         operator: {op}\n\
         system_account: {sys}\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n  {sys}: {sys_jwt}\n  {acc}: {acc_jwt}\n}}\n",
        op = q(&operator_jwt),
        sys = system.public_key(),
        sys_jwt = q(&system_jwt),
        acc = account.public_key(),
        acc_jwt = q(&account_jwt),
    ))
}

/// Two server configurations are the same when every JWT in them has the same content.
fn same_server_conf(old: &str, new: &str) -> bool {
    let jwts = |s: &str| -> Vec<Option<Value>> {
        s.split('"')
            .filter(|t| t.starts_with("eyJ"))
            .map(jwt::claims)
            .collect()
    };
    let (a, b) = (jwts(old), jwts(new));
    let strip_jwts = |s: &str| -> String {
        s.split('"')
            .filter(|t| !t.starts_with("eyJ"))
            .collect::<Vec<_>>()
            .join("\"")
    };
    a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => jwt::same_content(x, y),
            _ => false,
        })
        && strip_jwts(old) == strip_jwts(new)
}

/// Writes `content` to `path` through a temporary file and a rename; `secret`: mode 0600.
fn write_file(path: &Path, content: &str, secret: bool) -> Result<(), SiteError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SiteError::io("create", dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| SiteError::io("create", &tmp, e))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| SiteError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SiteError::io("rename into place", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_serving_identity_may_answer_requests_and_only_as_many_as_its_permission_says() {
        let image = Identity::role(&wnodes_bus::roles::IMAGE, "hv1.x").unwrap();
        let claims = user_claims(&image).unwrap();
        assert_eq!(
            claims["resp"],
            json!({ "max": 4096, "ttl": 3_600_000_000_000u64 })
        );
        assert_eq!(
            claims["sub"]["allow"],
            json!(["_INBOX.image-hv1_x.>", "wnodes.ctl.hv1_x.image.prefetch"])
        );
        let scratch = Identity::role(&wnodes_bus::roles::SCRATCH, "hv1.x").unwrap();
        assert!(user_claims(&scratch).unwrap().get("resp").is_none());
        assert!(
            user_claims(&Identity::admin())
                .unwrap()
                .get("resp")
                .is_none()
        );
    }

    #[test]
    fn second_run_writes_nothing_and_a_new_host_is_one_change_per_identity() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthDir::new(dir.path());
        let mut site = SiteDescription::new("T1", &["hv1.x"]);
        let first = auth.provision(&site, Mode::Apply).unwrap();
        assert!(first.count(&Action::Create) > 5, "{first:?}");
        let conf = std::fs::read_to_string(auth.server_conf()).unwrap();
        let creds = std::fs::read_to_string(auth.admin_creds()).unwrap();

        let second = auth.provision(&site, Mode::Apply).unwrap();
        assert!(
            second.is_noop(),
            "{:?}",
            second.notable().collect::<Vec<_>>()
        );
        assert_eq!(std::fs::read_to_string(auth.server_conf()).unwrap(), conf);
        assert_eq!(std::fs::read_to_string(auth.admin_creds()).unwrap(), creds);

        site.hosts.push("hv2.x".into());
        let dry = auth.provision(&site, Mode::DryRun).unwrap();
        let created: Vec<_> = dry.notable().map(|c| c.object.clone()).collect();
        assert_eq!(created.len(), 6, "{created:?}");
        assert!(created.contains(&"creds launcher-hv2_x".to_string()));
        assert!(!auth.creds_dir().join("launcher-hv2_x.creds").exists());

        site.hosts.remove(0);
        let stale = auth.provision(&site, Mode::DryRun).unwrap();
        assert!(
            stale
                .notable()
                .any(|c| c.object == "creds image-hv1_x" && c.action == Action::Stale)
        );
        let mode = std::fs::metadata(auth.admin_creds()).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
