//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::SiteError;

wnodes_testkit::error_rule! {
    SiteError {
        SiteError::Description { .. } => SiteError::Description {
            path: "/etc/wnodes/site.toml".into(),
            source: Box::new(figment::Error::from("missing field `site`".to_string())),
        },
        SiteError::Invalid(_) => SiteError::Invalid("hosts: \"hv1\" is listed twice".into()),
        SiteError::Io { .. } => SiteError::Io {
            action: "write",
            path: "/etc/wnodes/nats/creds/admin.creds".into(),
            source: io_source(),
        },
        SiteError::Key(_) => SiteError::Key("/etc/wnodes/nats/keys/account.nk: bad seed".into()),
        SiteError::Json(_) => SiteError::Json(serde_json::from_str::<u8>("x").unwrap_err()),
        SiteError::Name(_) => SiteError::Name(wnodes_bus::BusError::InvalidName("host \"HV_1\"".into())),
        SiteError::JetStream { .. } => SiteError::JetStream {
            action: "create",
            what: "stream WNODES_EVENTS".into(),
            source: Box::new(io_source()),
        },
    }
}
