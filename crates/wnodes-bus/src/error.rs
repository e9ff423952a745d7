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
    #[error("cannot create or update JetStream stream `{stream}`")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create or update consumer `{consumer}` on stream `{stream}`")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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
    #[error("idempotency store at `{path}`: group commit")]
    KeyCommit {
        path: String,
        #[source]
        source: std::sync::Arc<rusqlite::Error>,
    },
    #[error("reading the dead-letter stream")]
    DeadLetterRead(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Renders an error and its `source()` chain as `outer: inner: innermost`, for logs and CLIs.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}
