//! What the three preparers (scratch, network, gateway) share: each holds host resources for a
//! VM between `vm.requested` and the VM's end, answers with a ready or failed event, releases
//! them with `resource.released`, and keeps a tombstone so that a late request creates nothing.
//!
//! | module | what it holds |
//! |---|---|
//! | [`row`] | [`Row`]: resource [`Kind`], VM id, run key, [`State`] (`pending` / `prepared` / `released`), the service's detail, timestamps; [`Released`] |
//! | [`table`] | [`Table`]: one row per (kind, VM) in the service's key store (`wnodes_resources`), the detail as JSON; the state transitions |
//! | [`migrate`] | [`Table::migrate`]: the one-time migration from a service's own table of an earlier version |
//! | [`events`] | [`Incoming`]: a VM requested or ended; [`Events`]: the ready / failed / released events of a kind, derived from the event that caused them |
//! | [`reconcile`] | [`HostResources`] and [`reconcile()`]: at start, what the host holds that no prepared row accounts for is removed, and what a prepared row holds in the process is brought back |
//!
//! The table lives in the same SQLite file as the bus's idempotency keys: handlers write it
//! through [`wnodes_bus::HandlerCtx::tx`], so a row and the key of the message that wrote it
//! commit together. Each service opens its own key store, so a file holds one kind's rows; the
//! kind is in the key all the same, so that a row says what it is.

pub mod events;
pub mod migrate;
pub mod reconcile;
pub mod row;
pub mod table;

#[cfg(test)]
mod error_rule;

pub use events::{Events, Incoming, ReadyBody};
pub use reconcile::{HostResources, ReconcileError, Reconciled, reconcile};
pub use row::{Kind, Released, Row, State};
pub use table::{Table, TableError};
