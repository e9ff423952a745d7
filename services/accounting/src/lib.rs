//! WNoDeS accounting: one usage record per job run whose VM started.
//!
//! The `accounting` durable consumer reads, on every host (`wnodes.evt.*.<type>`):
//!
//! | event | effect (in the same transaction as the idempotency key) |
//! |---|---|
//! | `job.started` | stores the job's identity (owner, VO, DN, FQANs, queue, submit time) in `accounting_jobs`; fills a record written before it |
//! | `vm.requested` | stores what the VM was given (image, guest RAM, scratch size, network mode); fills a record written before it |
//! | `image.ready` | stores the image's verified digest; fills a record written before it |
//! | `vm.running` | stores when the VM started |
//! | `vm.stopped` | rejects impossible usage (dead letter); inserts the usage record (`usage_records`, PRIMARY KEY = run key) with its host's benchmark, and stages `UsageRecorded` carrying the whole record |
//! | `job.finished` | sets the record's LRMS exit code, or keeps it for the record still to come |
//! | `resource.released` (storage) | the bytes the gateway carried to and from the VM, when it counted them all; onto the record, or kept for it (other kinds: ignored) |
//! | `vm.failed` | no record (the VM never ran): counted in `wnodes_accounting_vm_failed_total` by phase |
//!
//! The record is keyed by the run key (`site/lrms/job_id/attempt`, brief §7): a second insert
//! is impossible (`INSERT ... ON CONFLICT DO NOTHING`), whatever `Nats-Msg-Id` a republished
//! `VmStopped` carries. Accounting never waits for `JobFinished`; it enriches the record when it
//! comes. A run that failed before its VM started (`VmFailed`) gets no record. On PostgreSQL the
//! transactions of one run are serialised by an advisory lock on its run key (SQLite serialises
//! every write transaction anyway).
//!
//! The usage tables live in the consumer's idempotency store ([`Config::database`]: SQLite by
//! default, PostgreSQL at a site), so each effect commits together with its key
//! ([`wnodes_bus::HandlerCtx::db`]); the handler's SQL is the same text on both
//! ([`wnodes_bus::db`]).
//!
//! The handler takes its events in batches ([`wnodes_bus::Handler::BATCHED`]): a batch is one
//! transaction, each statement runs once for all the batch's events of its type, and every
//! key of the batch commits with the effects (a message alone runs the same code as a batch
//! of one). Within a batch the effects are ordered by kind, not by arrival: the job rows
//! first, then the fill-ins of records written earlier, then the new records, which read what
//! the same batch stored; what the table above says holds for any order.

//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[accounting]` section (with `[accounting.apel]` and `[accounting.apel_export]`) |
//! | [`store`] | the store URL (`sqlite://`, `postgres://`), the embedded migrations, opening the store the keys share |
//! | [`handler`] | the consumer's handler: one effect per event type, one record per run, a batch of events at a time |
//! | `ingest` | its set-based statements: multi-row upserts per event type, fill-ins, the records' insert |
//! | [`metrics`] | `wnodes_accounting_*` |
//! | [`report`] | usage summed per VO, user, queue, day or month, on either store, and the gRPC report API that serves it |
//! | [`records`] | reading records back (`records` subcommand) |
//! | [`apel`] | the `apel-export` subcommand and the periodic export (`[accounting.apel_export]`): APEL messages into an SSM outgoing queue, exported once (jobs) or again when changed (summaries, cloud, sync) |
//! | `service` | [`Accounting`], the service as the runtime runs it |

pub mod apel;
pub mod config;
#[cfg(test)]
mod error_rule;
pub mod handler;
mod ingest;
pub mod metrics;
pub mod records;
pub mod report;
mod service;
pub mod store;

pub use config::Config;
pub use handler::{AccountingHandler, WAIT_FOR_JOB_ATTEMPTS};
pub use metrics::Metrics;
pub use service::{Accounting, AccountingCommand};
pub use store::{StoreUrl, migrate, open_store};

/// What can go wrong in accounting.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("database {store}")]
    Database {
        store: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("accounting database query failed")]
    Sql(#[from] sqlx::Error),
    #[error("accounting database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    StoreUrl(#[from] store::StoreUrlError),
    #[error(transparent)]
    Bus(#[from] wnodes_bus::BusError),
}
