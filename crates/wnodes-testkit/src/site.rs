//! The test site: every [`NatsServer::start`](crate::NatsServer::start) runs with
//! authorization on, provisioned through the same code as `wnodesctl provision`
//! (`wnodes-site`): an operator, the site's account, and per (role, host) an identity with the
//! permissions a site would give it. A test connects as what it is testing:
//!
//! ```ignore
//! let nats = NatsServer::start().await?;
//! let conf = ServiceConfig::new(HOST, &nats.identity(&roles::IMAGE, HOST).await?, &state);
//! let driver = bus::connect(&nats.admin(), "test@local").await?;   // the test itself: admin
//! ```

use std::path::Path;

use anyhow::Context;
use parking_lot::Mutex;
use wnodes_bus::{ConsumerTuning, NatsConfig, Role, layout};
use wnodes_site::{AuthDir, Identity, Mode, SiteDescription, streams};

/// The keys, creds and description of one test server's site.
#[derive(Debug)]
pub struct TestSite {
    auth: AuthDir,
    site: Mutex<SiteDescription>,
    /// Holds the auth directory; removed on drop.
    _dir: tempfile::TempDir,
}

impl TestSite {
    /// A site with no hosts yet: keys, the server's authorization text and the central
    /// identities' creds.
    pub fn new() -> anyhow::Result<(Self, String)> {
        let dir = tempfile::Builder::new()
            .prefix("wnodes-site-")
            .tempdir()
            .context("creating the test site's dir")?;
        let auth = AuthDir::new(dir.path());
        // No optional role: one joins when a test asks for its identity (so that no durable
        // waits for a consumer the test does not run).
        let site = SiteDescription::new("T1", &[]);
        auth.provision(&site, Mode::Apply)
            .context("provisioning the test site's keys and creds")?;
        let conf = std::fs::read_to_string(auth.server_conf())
            .with_context(|| format!("reading {}", auth.server_conf().display()))?;
        Ok((
            Self {
                auth,
                site: Mutex::new(site),
                _dir: dir,
            },
            conf,
        ))
    }

    /// The provisioning directory (keys, `nats-auth.conf`, `creds/`).
    pub fn dir(&self) -> &Path {
        self.auth.root()
    }

    /// The operator's connection settings on `url`.
    pub fn admin(&self, url: &str) -> NatsConfig {
        self.config(url, self.auth.admin_creds())
    }

    /// The monitor's.
    pub fn monitor(&self, url: &str) -> NatsConfig {
        self.config(url, self.auth.creds(&Identity::monitor()))
    }

    fn config(&self, url: &str, creds: std::path::PathBuf) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            creds_file: Some(creds),
            ..Default::default()
        }
    }

    /// `role`'s connection settings on `host`: the host joins the site (its identities'
    /// creds are written) and `role`'s durable is provisioned with `tuning`.
    pub async fn identity(
        &self,
        url: &str,
        role: &'static Role,
        host: &str,
        tuning: &ConsumerTuning,
    ) -> anyhow::Result<NatsConfig> {
        let config = self.creds(url, role, host)?;
        if let Some(durable) = role.durable(host)? {
            let admin = self.admin_client(url).await?;
            let expected = layout::durable_consumer(&durable, role.filters(host)?, tuning, 0);
            streams::provision_durable(&admin, expected, Mode::Apply)
                .await
                .with_context(|| format!("provisioning durable {durable}"))?;
        }
        Ok(config)
    }

    /// `role`'s connection settings on `host` (the host joins the site), without provisioning
    /// its durable: for roles that have none (the job starter, the bridge).
    pub fn creds(&self, url: &str, role: &'static Role, host: &str) -> anyhow::Result<NatsConfig> {
        let id = Identity::role(role, host)?;
        let mut site = self.site.lock();
        if role.host_of(host).is_some() && !site.hosts.iter().any(|h| h == host) {
            site.hosts.push(host.to_owned());
            self.auth
                .provision(&site, Mode::Apply)
                .with_context(|| format!("adding host {host} to the test site"))?;
        }
        if role.optional && !site.optional.iter().any(|o| o == role.name) {
            site.optional.push(role.name.to_owned());
            self.auth.provision(&site, Mode::Apply).with_context(|| {
                format!("adding the optional role {} to the test site", role.name)
            })?;
        }
        Ok(self.config(url, self.auth.creds(&id)))
    }

    /// Makes the streams (and the durables of the hosts added so far).
    pub async fn provision_streams(&self, url: &str) -> anyhow::Result<()> {
        let admin = self.admin_client(url).await?;
        let site = self.site.lock().clone();
        streams::provision(&admin, &site, Mode::Apply)
            .await
            .context("provisioning the test site's streams")?;
        Ok(())
    }

    async fn admin_client(&self, url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
        wnodes_bus::connect::install_crypto_provider();
        let client = wnodes_bus::connect::connect(&self.admin(url), "testkit-admin", None, None)
            .await
            .context("connecting as the test site's admin")?;
        Ok(async_nats::jetstream::new(client))
    }
}
