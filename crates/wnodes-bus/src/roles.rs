//! Who publishes and consumes what: the one table that the services (their durable consumer),
//! provisioning (the consumers it makes) and the NATS permissions (`wnodes-site`) are derived
//! from. `docs/job-flow-contract.md` is the prose version of [`ALL`].

use crate::{error::BusError, event::EventType, subject};

/// Where a participant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One instance per hypervisor: durable `<name>-<host>`, only its host's events.
    PerHost,
    /// One instance per site: durable `<name>`, every host's events.
    Central,
}

/// One participant of the event flow.
#[derive(Debug, PartialEq, Eq)]
pub struct Role {
    /// The service name (binary `wnodes-<name>`, durable `<name>[-<host>]`).
    pub name: &'static str,
    pub scope: Scope,
    /// The events its durable consumer receives; empty: no durable consumer.
    pub consumes: &'static [EventType],
    /// The events it may publish (for its own host when [`Scope::PerHost`]).
    pub publishes: &'static [EventType],
    /// Whether it follows a run's events through short-lived ordered consumers (the job
    /// starter's wait, the bridge's `WaitJob`): on its own host when per host.
    pub watches_runs: bool,
    /// A role a site opts into (its site description's `optional`): not provisioned
    /// otherwise, so that no durable waits for a consumer the site does not run.
    pub optional: bool,
}

impl Role {
    /// Its durable consumer's name on `host` (ignored for a central role), `None` when it
    /// consumes nothing.
    pub fn durable(&self, host: &str) -> Result<Option<String>, BusError> {
        if self.consumes.is_empty() {
            return Ok(None);
        }
        subject::durable_name(self.name, self.host_of(host)).map(Some)
    }

    /// The filter subjects of its durable consumer on `host` (one per consumed type).
    pub fn filters(&self, host: &str) -> Result<Vec<String>, BusError> {
        self.consumes
            .iter()
            .map(|t| subject::consumer_filter(*t, self.host_of(host)))
            .collect()
    }

    /// `Some(host)` for a per-host role, `None` for a central one.
    pub fn host_of<'h>(&self, host: &'h str) -> Option<&'h str> {
        match self.scope {
            Scope::PerHost => Some(host),
            Scope::Central => None,
        }
    }

    /// The name of its identity on `host`: `<name>-<host token>` per host, `<name>` central
    /// (the same as its durable name, and its inbox token: `_INBOX.<identity>.`).
    pub fn identity(&self, host: &str) -> Result<String, BusError> {
        subject::durable_name(self.name, self.host_of(host))
    }
}

use EventType::*;

pub const LAUNCHER: Role = Role {
    name: "launcher",
    scope: Scope::PerHost,
    consumes: &[
        JobStarted,
        JobCancelled,
        ImageReady,
        ImageFailed,
        ScratchReady,
        ScratchFailed,
        NetworkReady,
        NetworkFailed,
        StorageReady,
        StorageFailed,
    ],
    publishes: &[VmRequested, VmRunning, VmStopped, VmFailed],
    watches_runs: false,
    optional: false,
};

pub const IMAGE: Role = Role {
    name: "image",
    scope: Scope::PerHost,
    // vm.stopped / vm.failed: a VM's image may be evicted from the cache again.
    consumes: &[VmRequested, VmStopped, VmFailed, JobQueued],
    publishes: &[ImageReady, ImageFailed],
    watches_runs: false,
    optional: false,
};

pub const SCRATCH: Role = Role {
    name: "scratch",
    scope: Scope::PerHost,
    consumes: &[VmRequested, VmStopped, VmFailed],
    publishes: &[ScratchReady, ScratchFailed, ResourceReleased],
    watches_runs: false,
    optional: false,
};

pub const NETWORK: Role = Role {
    name: "network",
    scope: Scope::PerHost,
    consumes: &[VmRequested, VmStopped, VmFailed],
    publishes: &[NetworkReady, NetworkFailed, ResourceReleased],
    watches_runs: false,
    optional: false,
};

pub const GATEWAY: Role = Role {
    name: "gateway",
    scope: Scope::PerHost,
    consumes: &[VmRequested, NetworkReady, VmStopped, VmFailed],
    publishes: &[StorageReady, StorageFailed, ResourceReleased],
    watches_runs: false,
    optional: false,
};

pub const ACCOUNTING: Role = Role {
    name: "accounting",
    scope: Scope::Central,
    consumes: &[
        JobStarted,
        VmRequested,
        ImageReady,
        VmRunning,
        VmStopped,
        JobFinished,
        VmFailed,
        ResourceReleased,
    ],
    publishes: &[UsageRecorded],
    watches_runs: false,
    optional: false,
};

/// The usage exporter (an example consumer of usage events for sites): usage counters on
/// Prometheus from every host's `usage.recorded`.
pub const USAGE: Role = Role {
    name: "usage",
    scope: Scope::Central,
    consumes: &[UsageRecorded],
    publishes: &[],
    watches_runs: false,
    optional: true,
};

/// The central bridge: job events from LRMS records and its gRPC API, for every host.
pub const BRIDGE: Role = Role {
    name: "bridge",
    scope: Scope::Central,
    consumes: &[],
    publishes: &[
        JobQueued,
        JobStarted,
        JobFinished,
        JobCancelled,
        JobHeld,
        JobReleased,
        JobEvicted,
        JobStartObserved,
    ],
    watches_runs: true,
    optional: false,
};

/// The host agent on a hypervisor (`wnodes-agent`, serving the LRMS's job starters over its
/// unix socket; also the identity of the operator's `wnodes-bridge submit`): its own host's job
/// events, and the outcome of its own host's runs.
pub const AGENT: Role = Role {
    name: "agent",
    scope: Scope::PerHost,
    consumes: &[],
    publishes: &[JobStarted, JobFinished, JobCancelled],
    watches_runs: true,
    optional: false,
};

/// Every participant: the services and the job starter.
pub const ALL: [&Role; 9] = [
    &IMAGE,
    &SCRATCH,
    &NETWORK,
    &GATEWAY,
    &LAUNCHER,
    &ACCOUNTING,
    &USAGE,
    &BRIDGE,
    &AGENT,
];

/// The role called `name`.
pub fn by_name(name: &str) -> Option<&'static Role> {
    ALL.into_iter().find(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_consumed_event_has_a_publisher_and_names_are_unique() {
        for role in ALL {
            for t in role.consumes {
                assert!(
                    ALL.iter().any(|p| p.publishes.contains(t)),
                    "{} consumes {} which nobody may publish",
                    role.name,
                    t.name()
                );
            }
            assert_eq!(by_name(role.name), Some(role));
        }
    }

    #[test]
    fn durables_and_identities() {
        assert_eq!(
            LAUNCHER.durable("hv1.x").unwrap().as_deref(),
            Some("launcher-hv1_x")
        );
        assert_eq!(
            ACCOUNTING.durable("hv1.x").unwrap().as_deref(),
            Some("accounting")
        );
        assert_eq!(BRIDGE.durable("hv1.x").unwrap(), None);
        assert_eq!(AGENT.identity("hv1.x").unwrap(), "agent-hv1_x");
        assert_eq!(
            IMAGE.filters("hv1.x").unwrap(),
            [
                "wnodes.evt.hv1_x.vm.requested",
                "wnodes.evt.hv1_x.vm.stopped",
                "wnodes.evt.hv1_x.vm.failed",
                "wnodes.evt._queued.job.queued"
            ]
        );
    }
}
