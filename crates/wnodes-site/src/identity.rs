//! Who may publish and subscribe to what: one identity per role and host, and its NATS
//! permissions, derived from [`wnodes_bus::roles`]. ARCHITECTURE.md, "Trust boundaries", is
//! the prose version.
//!
//! Every identity receives replies only under its own inbox prefix `_INBOX.<identity>.` (the
//! bus sets it from the credentials), so no identity can read another's JetStream answers.

use serde::Serialize;
use wnodes_bus::{
    EventType, Role, control,
    heartbeat::{self, HOSTS_STREAM},
    roles::Scope,
    subject::{self, DLQ_STREAM, EVENTS_STREAM},
};

use crate::error::SiteError;

/// What an identity is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A service or the job starter, on a host or central.
    Role(&'static Role),
    /// Reads stream and consumer state for the backlog metrics (`wnodesctl backlog`).
    Monitor,
    /// The operator: provisioning, dead-letter inspection. Everything.
    Admin,
}

/// One NATS user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: Kind,
    /// The host of a per-host role.
    pub host: Option<String>,
    /// `<role>-<host token>`, `<role>`, `monitor` or `admin`: the user's name, its creds file's
    /// stem and its inbox token.
    pub name: String,
}

/// The subjects an identity may publish to and subscribe to (allow lists; everything else is
/// denied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it receives (NATS `allow_responses`): only an identity that serves
    /// control requests ([`wnodes_bus::control`]).
    pub responses: Option<Responses>,
}

/// The NATS `resp` permission: publish to the reply subject of each message received, at most
/// `max_msgs` times within `ttl` of its arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Responses {
    pub max_msgs: u32,
    pub ttl: std::time::Duration,
}

impl Identity {
    /// The identity of `role` on `host` (ignored for a central role).
    pub fn role(role: &'static Role, host: &str) -> Result<Self, SiteError> {
        let host = role.host_of(host).map(str::to_owned);
        if let Some(h) = &host {
            subject::validate_host(h)?;
        }
        Ok(Self {
            kind: Kind::Role(role),
            name: role.identity(host.as_deref().unwrap_or_default())?,
            host,
        })
    }

    pub fn monitor() -> Self {
        Self {
            kind: Kind::Monitor,
            host: None,
            name: "monitor".into(),
        }
    }

    pub fn admin() -> Self {
        Self {
            kind: Kind::Admin,
            host: None,
            name: "admin".into(),
        }
    }

    /// The file its credentials are written to, under the creds directory.
    pub fn creds_file_name(&self) -> String {
        format!("{}.creds", self.name)
    }

    /// Its permissions.
    pub fn permissions(&self) -> Result<Permissions, SiteError> {
        let inbox = format!("_INBOX.{}.>", self.name);
        let mut publish = Vec::new();
        let mut subscribe = vec![inbox];
        let mut responses = None;
        match self.kind {
            Kind::Admin => {
                return Ok(Permissions {
                    publish: vec![">".into()],
                    subscribe: vec![">".into()],
                    responses: None,
                });
            }
            Kind::Monitor => {
                publish.extend([
                    format!("$JS.API.STREAM.INFO.{EVENTS_STREAM}"),
                    format!("$JS.API.STREAM.INFO.{DLQ_STREAM}"),
                    format!("$JS.API.CONSUMER.LIST.{EVENTS_STREAM}"),
                    format!("$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.*"),
                    format!("$JS.API.DIRECT.GET.{EVENTS_STREAM}"),
                    // `wnodesctl hosts`: every service's last heartbeat.
                    format!("$JS.API.STREAM.INFO.{HOSTS_STREAM}"),
                    format!("$JS.API.DIRECT.GET.{HOSTS_STREAM}"),
                ]);
            }
            Kind::Role(role) => {
                let host = self.host.as_deref();
                // Every service checks the streams at start.
                publish.extend([
                    format!("$JS.API.STREAM.INFO.{EVENTS_STREAM}"),
                    format!("$JS.API.STREAM.INFO.{DLQ_STREAM}"),
                ]);
                // Every role is a long-running service (the host agent too: job starters hold
                // no identity): its own heartbeat key, nothing else of the bucket.
                publish.push(heartbeat::key_subject(&self.name));
                for t in role.publishes {
                    publish.push(publish_subject(*t, role.scope, host)?);
                }
                if let Some(durable) = role.durable(host.unwrap_or_default())? {
                    publish.extend([
                        format!("$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{durable}"),
                        format!("$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}"),
                        // Acks, naks, in-progress and term: the reply subject of its own
                        // messages (v1 and the domain-qualified v2 form).
                        format!("$JS.ACK.{EVENTS_STREAM}.{durable}.>"),
                        format!("$JS.ACK.*.*.{EVENTS_STREAM}.{durable}.>"),
                        subject::dlq_subject(&durable),
                    ]);
                }
                if role.watches_runs {
                    // Short-lived ordered consumers whose filter (in the API subject since
                    // NATS 2.10) is its host's events, or every host's for a central role.
                    let hosts = match host {
                        Some(h) => subject::encode_host(h)?,
                        None => "*".into(),
                    };
                    publish.extend([
                        format!("$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.*.wnodes.evt.{hosts}.>"),
                        format!("$JS.FC.{EVENTS_STREAM}.>"),
                    ]);
                }
                // Control requests to this host's service: it hears them and answers only
                // on each request's reply subject.
                let served = control::served_subjects(role, host)?;
                if !served.is_empty() {
                    subscribe.extend(served);
                    responses = Some(Responses {
                        max_msgs: control::RESPONSE_MAX_MSGS,
                        ttl: control::RESPONSE_TTL,
                    });
                }
            }
        }
        Ok(Permissions {
            publish,
            subscribe,
            responses,
        })
    }
}

/// The subject `scope`'s publisher of `t` may use: its own host's, or every host's.
fn publish_subject(t: EventType, scope: Scope, host: Option<&str>) -> Result<String, SiteError> {
    if t == EventType::JobQueued {
        return Ok(subject::event_subject("", t.name())?);
    }
    Ok(match (scope, host) {
        (Scope::PerHost, Some(h)) => subject::event_subject(h, t.name())?,
        _ => subject::event_filter(None, t.name())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_bus::roles;

    #[test]
    fn a_host_service_publishes_only_its_own_events_for_its_own_host() {
        let id = Identity::role(&roles::SCRATCH, "hv1.x").unwrap();
        assert_eq!(id.name, "scratch-hv1_x");
        let p = id.permissions().unwrap();
        assert!(p.publish.contains(&"wnodes.evt.hv1_x.scratch.ready".into()));
        assert!(
            p.publish
                .contains(&"wnodes.evt.hv1_x.resource.released".into())
        );
        assert!(p.publish.contains(&"wnodes.dlq.scratch-hv1_x".into()));
        assert!(
            p.publish
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.WNODES_EVENTS.scratch-hv1_x".into())
        );
        assert!(!p.publish.iter().any(|s| s.contains("vm.requested")));
        assert!(!p.publish.iter().any(|s| s.contains("CREATE")));
        assert!(
            !p.publish
                .iter()
                .any(|s| s.contains('>') && s.starts_with("wnodes.evt"))
        );
        assert_eq!(p.subscribe, ["_INBOX.scratch-hv1_x.>"]);
        // Its own heartbeat key, and no other key or API of the bucket.
        assert!(p.publish.contains(&"$KV.wnodes_hosts.scratch-hv1_x".into()));
        assert_eq!(
            p.publish
                .iter()
                .filter(|s| s.contains("wnodes_hosts"))
                .count(),
            1,
            "{:?}",
            p.publish
        );
        assert_eq!(p.responses, None);
    }

    #[test]
    fn the_image_service_hears_its_own_hosts_control_requests_and_may_only_answer_them() {
        let p = Identity::role(&roles::IMAGE, "hv1.x")
            .unwrap()
            .permissions()
            .unwrap();
        assert_eq!(
            p.subscribe,
            ["_INBOX.image-hv1_x.>", "wnodes.ctl.hv1_x.image.prefetch"]
        );
        assert!(!p.publish.iter().any(|s| s.starts_with("wnodes.ctl")));
        assert_eq!(
            p.responses,
            Some(Responses {
                max_msgs: 4096,
                ttl: std::time::Duration::from_secs(3600)
            })
        );
        let launcher = Identity::role(&roles::LAUNCHER, "hv1.x")
            .unwrap()
            .permissions()
            .unwrap();
        assert!(
            !launcher
                .subscribe
                .iter()
                .any(|s| s.starts_with("wnodes.ctl"))
        );
        assert_eq!(launcher.responses, None);
    }

    #[test]
    fn central_roles_cover_every_host_and_the_host_agent_only_its_own() {
        let acc = Identity::role(&roles::ACCOUNTING, "ignored.x").unwrap();
        assert_eq!(acc.name, "accounting");
        assert!(
            acc.permissions()
                .unwrap()
                .publish
                .contains(&"wnodes.evt.*.usage.recorded".into())
        );
        let agent = Identity::role(&roles::AGENT, "hv2.x").unwrap();
        let p = agent.permissions().unwrap();
        assert!(p.publish.contains(&"wnodes.evt.hv2_x.job.started".into()));
        assert!(
            p.publish
                .contains(&"$JS.API.CONSUMER.CREATE.WNODES_EVENTS.*.wnodes.evt.hv2_x.>".into())
        );
        assert!(!p.publish.iter().any(|s| s.contains("MSG.NEXT")));
        // The host agent beats like every service, under its own key only.
        let beats: Vec<_> = p
            .publish
            .iter()
            .filter(|s| s.contains("wnodes_hosts"))
            .collect();
        assert_eq!(beats, [&heartbeat::key_subject("agent-hv2_x")], "{beats:?}");
        let bridge = Identity::role(&roles::BRIDGE, "").unwrap();
        let p = bridge.permissions().unwrap();
        assert!(p.publish.contains(&"wnodes.evt._queued.job.queued".into()));
        assert!(p.publish.contains(&"wnodes.evt.*.job.started".into()));
    }
}
