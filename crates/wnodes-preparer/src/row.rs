//! A row of the resource table: the [`Kind`] of resource, the VM's [`State`], the service's
//! detail ([`Row`]), and what a release found ([`Released`]).

use std::fmt;

use wnodes_bus::proto;

/// What kind of host resource a row holds: one per preparer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The scratch service's volume.
    Scratch,
    /// The network service's lease, MAC and tap.
    Network,
    /// The gateway's export listener.
    Storage,
}

impl Kind {
    /// The name stored in the table and used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Scratch => "scratch",
            Kind::Network => "network",
            Kind::Storage => "storage",
        }
    }

    /// The kind in `resource.released`.
    pub const fn proto(self) -> proto::ResourceKind {
        match self {
            Kind::Scratch => proto::ResourceKind::Scratch,
            Kind::Network => proto::ResourceKind::Network,
            Kind::Storage => proto::ResourceKind::Storage,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A row's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Known, nothing held yet.
    Pending,
    /// Held on the host.
    Prepared,
    /// Released; a tombstone.
    Released,
}

impl State {
    /// The name stored in the table.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Prepared => "prepared",
            State::Released => "released",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [State::Pending, State::Prepared, State::Released]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row, its detail decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<D> {
    pub kind: Kind,
    pub vm_id: String,
    /// The run that wrote the row first (`site/lrms/job_id/attempt`); empty when unknown.
    pub run_key: String,
    pub state: State,
    /// What the service keeps about the resource (a path, a lease, a listener).
    pub detail: D,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

impl<D> Row<D> {
    /// True while the resource is held.
    pub fn is_prepared(&self) -> bool {
        self.state == State::Prepared
    }

    /// True for a tombstone.
    pub fn is_released(&self) -> bool {
        self.state == State::Released
    }
}

/// What [`Table::release`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released<D> {
    /// The row was pending or prepared and says released now; the row as it was.
    Now(Row<D>),
    /// The row said released already: nothing changed (a redelivery).
    Already(Row<D>),
    /// There was no row: a tombstone was written.
    Tombstone,
}
