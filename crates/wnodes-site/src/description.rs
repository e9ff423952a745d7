//! The site description: the operator's one file saying which hosts run WNoDeS and how the
//! streams and consumers are laid out. `wnodesctl provision --site site.toml` reads it.
//!
//! ```toml
//! site = "INFN-T1"
//! hosts = ["hv01.cnaf.infn.it", "hv02.cnaf.infn.it"]
//! optional = ["usage"]  # roles the site opts into (default none): the usage exporter
//!
//! [streams]            # defaults shown
//! replicas = 1         # 3 on a site's NATS cluster
//! consumer_replicas = 1
//! max_consumers = 100000
//! duplicate_window = "2m"
//! events_max_age = "7days"
//! dlq_max_age = "30days"
//!
//! [consumer]           # the services' `[consumer]` (ack_wait, max_attempts, max_in_flight, max_batch)
//! ```

use std::{path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Format, Toml},
};
use serde::{Deserialize, Serialize};
use wnodes_bus::{ConsumerTuning, NatsConfig, layout::StreamLayout, roles, subject};

use crate::{error::SiteError, identity::Identity};

/// One site.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteDescription {
    /// The site's name (as in GOCDB and the services' `site`).
    pub site: String,
    /// The hypervisors: each gets the per-host services' identities and durables, and a job
    /// starter identity.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The optional roles the site runs (`usage`: the usage exporter): only these get an
    /// identity and a durable, so that no durable waits for a consumer that is not there.
    #[serde(default)]
    pub optional: Vec<String>,
    #[serde(default)]
    pub streams: StreamSettings,
    /// The services' consumer tuning (their `[consumer]`): the durables are made with its
    /// `ack_wait`, `max_attempts`, `max_in_flight` and `max_batch`.
    #[serde(default)]
    pub consumer: ConsumerTuning,
}

/// How the streams and durables are made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Replicas of both streams (the services' `nats.stream_replicas`).
    pub replicas: usize,
    /// Replicas of each durable consumer. 1 keeps a durable off Raft: measured cheap with
    /// thousands of durables on an R3 stream (ARCHITECTURE.md, "Scale").
    pub consumer_replicas: usize,
    /// Consumers the events stream accepts (durables and the short-lived watches). The server's
    /// default is 1,000; it cannot be changed once the stream exists.
    pub max_consumers: i32,
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub dlq_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        let n = NatsConfig::default();
        Self {
            replicas: n.stream_replicas,
            consumer_replicas: 1,
            max_consumers: 100_000,
            duplicate_window: n.duplicate_window,
            events_max_age: n.events_max_age,
            dlq_max_age: n.dlq_max_age,
        }
    }
}

/// One durable consumer the site needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    pub name: String,
    pub filters: Vec<String>,
}

impl SiteDescription {
    /// A description with defaults.
    pub fn new(site: &str, hosts: &[&str]) -> Self {
        Self {
            site: site.into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            optional: Vec::new(),
            streams: StreamSettings::default(),
            consumer: ConsumerTuning::default(),
        }
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, SiteError> {
        let d: Self = Figment::from(Toml::file_exact(path))
            .extract()
            .map_err(|e| SiteError::Description {
                path: path.display().to_string(),
                source: Box::new(e),
            })?;
        d.validate()?;
        Ok(d)
    }

    /// Host names valid and unique, settings consistent.
    pub fn validate(&self) -> Result<(), SiteError> {
        if self.site.trim().is_empty() {
            return Err(SiteError::Invalid("`site` must not be empty".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for h in &self.hosts {
            subject::validate_host(h).map_err(|e| SiteError::Invalid(format!("hosts: {e}")))?;
            if !seen.insert(h) {
                return Err(SiteError::Invalid(format!("hosts: {h:?} is listed twice")));
            }
        }
        for name in &self.optional {
            if !roles::ALL.iter().any(|r| r.optional && r.name == name) {
                let known: Vec<&str> = roles::ALL
                    .iter()
                    .filter(|r| r.optional)
                    .map(|r| r.name)
                    .collect();
                return Err(SiteError::Invalid(format!(
                    "optional: {name:?} is not an optional role (those are: {})",
                    known.join(", ")
                )));
            }
        }
        self.consumer
            .validate()
            .map_err(|e| SiteError::Invalid(format!("consumer: {e}")))?;
        if self.streams.replicas == 0 || self.streams.replicas > 5 {
            return Err(SiteError::Invalid("streams.replicas must be 1 to 5".into()));
        }
        if self.streams.consumer_replicas > self.streams.replicas {
            return Err(SiteError::Invalid(format!(
                "streams.consumer_replicas ({}) cannot exceed streams.replicas ({})",
                self.streams.consumer_replicas, self.streams.replicas
            )));
        }
        if self.streams.duplicate_window > self.streams.events_max_age {
            return Err(SiteError::Invalid(format!(
                "streams.duplicate_window ({}) cannot exceed streams.events_max_age ({}): NATS refuses it",
                humantime_serde::re::humantime::format_duration(self.streams.duplicate_window),
                humantime_serde::re::humantime::format_duration(self.streams.events_max_age),
            )));
        }
        let needed = self.durables()?.len();
        if self.streams.max_consumers > 0 && (self.streams.max_consumers as usize) < needed {
            return Err(SiteError::Invalid(format!(
                "streams.max_consumers ({}) is below the {needed} durable consumers these hosts need",
                self.streams.max_consumers
            )));
        }
        Ok(())
    }

    /// The stream settings services compare with their `[nats]`.
    pub fn layout(&self) -> StreamLayout {
        StreamLayout {
            replicas: self.streams.replicas,
            duplicate_window: self.streams.duplicate_window,
            events_max_age: self.streams.events_max_age,
            dlq_max_age: self.streams.dlq_max_age,
        }
    }

    /// The roles this site provisions: every role but the optional ones it does not list.
    pub fn roles(&self) -> impl Iterator<Item = &'static roles::Role> + '_ {
        roles::ALL
            .into_iter()
            .filter(|r| !r.optional || self.optional.iter().any(|o| o == r.name))
    }

    /// Every durable consumer: the per-host roles' on each host, then the central ones.
    pub fn durables(&self) -> Result<Vec<Durable>, SiteError> {
        let mut out = Vec::new();
        for role in self.roles() {
            match role.scope {
                roles::Scope::PerHost => {
                    for h in &self.hosts {
                        if let Some(name) = role.durable(h)? {
                            out.push(Durable {
                                name,
                                filters: role.filters(h)?,
                            });
                        }
                    }
                }
                roles::Scope::Central => {
                    if let Some(name) = role.durable("")? {
                        out.push(Durable {
                            name,
                            filters: role.filters("")?,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every identity: per host, each per-host role's; then the central roles, the monitor
    /// and the operator's admin.
    pub fn identities(&self) -> Result<Vec<Identity>, SiteError> {
        let mut out = Vec::new();
        for h in &self.hosts {
            for role in self.roles().filter(|r| r.scope == roles::Scope::PerHost) {
                out.push(Identity::role(role, h)?);
            }
        }
        for role in self.roles().filter(|r| r.scope == roles::Scope::Central) {
            out.push(Identity::role(role, "")?);
        }
        out.push(Identity::monitor());
        out.push(Identity::admin());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durables_and_identities_per_host() {
        let d = SiteDescription::new("T1", &["hv1.x", "hv2.x"]);
        d.validate().unwrap();
        let durables = d.durables().unwrap();
        // 5 per host + accounting.
        assert_eq!(durables.len(), 11);
        assert!(durables.iter().any(|c| c.name == "launcher-hv2_x"));
        assert!(durables.iter().any(|c| c.name == "accounting"));
        // 6 per host (5 services + the job starter) + accounting, bridge, monitor, admin.
        assert_eq!(d.identities().unwrap().len(), 16);
        assert!(
            !durables.iter().any(|c| c.name == "usage"),
            "not opted into"
        );
        // Opting into the usage exporter: its durable and identity.
        let with = SiteDescription {
            optional: vec!["usage".into()],
            ..d
        };
        with.validate().unwrap();
        assert!(with.durables().unwrap().iter().any(|c| c.name == "usage"));
        assert_eq!(with.identities().unwrap().len(), 17);
    }

    #[test]
    fn only_optional_roles_can_be_opted_into() {
        for name in ["launcher", "usag"] {
            let d = SiteDescription {
                optional: vec![name.into()],
                ..SiteDescription::new("T1", &[])
            };
            let e = d.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "{name:?} is not an optional role (those are: usage)"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_descriptions_are_refused_with_the_reason() {
        let mut d = SiteDescription::new("T1", &["hv1.x", "hv1.x"]);
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        d.hosts = vec!["HV_1".into()];
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("HV_1"), "{e}");
        d.hosts = vec!["hv1.x".into()];
        d.streams.max_consumers = 2;
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("max_consumers"), "{e}");
    }

    #[test]
    fn loads_toml_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.toml");
        std::fs::write(
            &p,
            "site = \"T1\"\nhosts = [\"hv1.x\"]\n[streams]\nreplicas = 3\nevents_max_age = \"2days\"\n",
        )
        .unwrap();
        let d = SiteDescription::load(&p).unwrap();
        assert_eq!(d.streams.replicas, 3);
        assert_eq!(d.streams.events_max_age, Duration::from_secs(2 * 86400));
        std::fs::write(&p, "site = \"T1\"\nhostz = []\n").unwrap();
        let e = format!("{:?}", SiteDescription::load(&p).unwrap_err());
        assert!(e.contains("hostz"), "{e}");
    }
}
