//! What can go wrong provisioning a site. `Display` never repeats the source.

/// A provisioning error, naming the file, key or server object concerned.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("site description `{path}`")]
    Description {
        path: String,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("site description: {0}")]
    Invalid(String),
    #[error("cannot {action} `{path}`")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nkey: {0}")]
    Key(String),
    #[error("JSON")]
    Json(#[source] serde_json::Error),
    #[error("a name in the site description")]
    Name(#[from] wnodes_bus::BusError),
    #[error("JetStream: cannot {action} {what}")]
    JetStream {
        action: &'static str,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SiteError {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn js(
        action: &'static str,
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::JetStream {
            action,
            what: what.into(),
            source: Box::new(source),
        }
    }
}
