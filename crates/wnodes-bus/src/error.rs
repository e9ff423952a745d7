//! The bus's error type. Variants carry the context (subject, stream, consumer); the `Display`
//! text never repeats the `#[source]`: log the whole chain with [`ErrorChain`].

use std::fmt;

/// Everything that can go wrong talking to NATS through the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid bus configuration: {0}")]
    Config(String),
    #[error("cannot read {what} from `{path}`")]
    ReadFile {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration is invalid: {0}")]
    Tls(String),
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("{what} is not provisioned (`wnodesctl provision` makes it)")]
    NotProvisioned {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what} differs from what this service expects: {differences}")]
    Mismatch { what: String, differences: String },
    #[error("NATS refused: {0}")]
    PermissionDenied(String),
    #[error(
        "publishing to `{subject}` was not acknowledged after {attempts} attempts over {elapsed_ms} ms"
    )]
    Publish {
        subject: String,
        attempts: u32,
        elapsed_ms: u128,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A control request or its answer (`what`: "subscribe to", "answer on", …).
    #[error("cannot {what} `{subject}`")]
    Control {
        what: &'static str,
        subject: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("event has no body")]
    EmptyEvent,
    #[error("idempotency store at `{path}`")]
    Store {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("idempotency store at `{store}` would not be durable: {reason}")]
    NotDurable { store: String, reason: String },
    #[error("idempotency store at `{path}`: group commit")]
    KeyCommit {
        path: String,
        #[source]
        source: std::sync::Arc<rusqlite::Error>,
    },
    /// `what`: "run SITE/lrms/JOB/ATTEMPT", "the VMs", …
    #[error("reading the events of {what}")]
    EventsRead {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("putting the heartbeat of {identity}")]
    Heartbeat {
        identity: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the dead-letter stream")]
    DeadLetterRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("deleting dead letter {sequence} after its redrive")]
    DeadLetterDelete {
        sequence: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Renders an error and its `source()` chain as `outer: inner: innermost`, for logs and CLIs.
///
/// Each message appears once. Our errors never repeat their source (the rule in
/// `docs/errors-and-logging.md`), but some of our dependencies' errors do (`async_nats`'
/// `"{kind}: {source}"`, sqlx's `"error communicating with database: {0}"`): a link whose text the
/// previous link's text already ends with is not written again.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            let text = e.to_string();
            if !previous.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            previous = text;
            cur = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store")]
    struct Open(#[source] std::io::Error);

    /// A dependency's error that repeats its source, as `async_nats::Error` does.
    #[derive(Debug, thiserror::Error)]
    #[error("IO error: {0}")]
    struct Repeats(#[source] Open);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect")]
    struct Connect(#[source] Repeats);

    #[test]
    fn renders_every_link_once() {
        let e = Open(std::io::Error::other("disk on fire"));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot open the store: disk on fire"
        );
        let e = Connect(Repeats(Open(std::io::Error::other("disk on fire"))));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot connect: IO error: cannot open the store: disk on fire"
        );
    }
}
