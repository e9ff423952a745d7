//! APEL accounting messages for WNoDeS usage records, and the SSM outgoing queue they go into.
//!
//! WLCG/EGI sites report usage to the APEL repository by dropping text messages into a
//! directory queue that `ssmsend` reads and sends. This crate turns
//! [`wnodes_accounting_types::UsageRecord`]s into those messages; it knows nothing of a
//! database (the accounting service's `apel-export` subcommand selects the records and keeps
//! what was exported).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`ApelConfig`]: site name, submit host, benchmark per core, descriptions |
//! | [`fqan`] | VO, group and role from a VOMS FQAN, as APEL derives them |
//! | [`records`] | the four record kinds (job v0.3, normalised summary v0.3, cloud v0.4, sync), built from usage records, in APEL's units |
//! | [`message`] | rendering records into messages under a size limit, and parsing messages back into field maps |
//! | [`dirq`] | [`OutgoingQueue`]: the `dirq` `QueueSimple` layout `ssmsend` reads, written with staged files and a no-replace rename |

pub mod config;
pub mod dirq;
#[cfg(test)]
mod error_rule;
pub mod fqan;
pub mod message;
pub mod records;

pub use config::{ApelConfig, Benchmark, BenchmarkKind};
pub use dirq::OutgoingQueue;
pub use message::{Kind, Message, ParsedMessage, RecordFields};
pub use records::{CloudRecord, JobRecord, SummaryRecord, SyncRecord};

/// What can go wrong building, writing or parsing APEL messages.
#[derive(Debug, thiserror::Error)]
pub enum ApelError {
    /// A usage record cannot be expressed as an APEL record.
    #[error("usage record {run_key} cannot be exported to APEL: {reason}")]
    Unexportable {
        run_key: String,
        reason: &'static str,
    },
    /// One record alone is larger than a message may be.
    #[error("a {kind} record of {bytes} bytes does not fit in a message of at most {limit} bytes")]
    RecordTooLarge {
        kind: &'static str,
        bytes: usize,
        limit: usize,
    },
    /// A value would break the `Key: value` line format.
    #[error("field {field} of a {kind} record holds a line break")]
    LineBreak {
        kind: &'static str,
        field: &'static str,
    },
    /// The text is not an APEL message.
    #[error("not an APEL message: line {line}: {reason}")]
    Parse { line: usize, reason: String },
    /// The configuration is invalid.
    #[error("invalid APEL configuration: {0}")]
    Config(String),
    /// A file or directory of the outgoing queue.
    #[error("cannot {op} {path}")]
    Queue {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ApelError {
    pub(crate) fn queue(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Queue {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}
