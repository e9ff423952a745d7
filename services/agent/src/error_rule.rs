//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::{
    slurm::SlurmError,
    token::{IssuerConfigError, TokenError},
};

wnodes_testkit::error_rule! {
    SlurmError {
        SlurmError::NotInJob { .. } => SlurmError::NotInJob {
            pid: 4242,
            said: "Failed to locate job for requested pid".into(),
        },
        SlurmError::Spawn { .. } => SlurmError::Spawn {
            command: "scontrol pidinfo 4242".into(),
            source: io_source(),
        },
        SlurmError::Timeout { .. } => SlurmError::Timeout {
            command: "squeue -h -j 42".into(),
            secs: 20,
        },
        SlurmError::Failed { .. } => SlurmError::Failed {
            command: "squeue".into(),
            said: "slurm_load_jobs error: Unable to contact slurm controller".into(),
        },
        SlurmError::Parse { .. } => SlurmError::Parse {
            command: "squeue".into(),
            said: "1|x|".into(),
            what: "2 fields where 10 were asked for".into(),
        },
    }
    TokenError {
        TokenError::Malformed(_) => TokenError::Malformed("not three dot-separated parts".into()),
        TokenError::UnknownIssuer(_) => TokenError::UnknownIssuer("https://rogue.example/".into()),
        TokenError::Algorithm(_) => TokenError::Algorithm("none".into()),
        TokenError::Signature(_) => TokenError::Signature("https://atlas-auth.cern.ch/".into()),
        TokenError::Expired { .. } => TokenError::Expired { exp: 1, now: 2 },
        TokenError::NotYetValid { .. } => TokenError::NotYetValid { nbf: 3, now: 2 },
        TokenError::Audience { .. } => TokenError::Audience {
            aud: "https://other.example".into(),
            accepted: vec!["https://wlcg.cern.ch/jwt/v1/any".into()],
        },
        TokenError::Missing(_) => TokenError::Missing("exp"),
        TokenError::Version { .. } => TokenError::Version {
            claim: "wlcg.ver",
            value: "2.0".into(),
        },
        TokenError::Group { .. } => TokenError::Group {
            group: "/cms".into(),
            vo: "atlas".into(),
        },
    }
    IssuerConfigError {
        IssuerConfigError::Read { .. } => IssuerConfigError::Read {
            path: "/etc/wnodes/issuers/atlas.jwks".into(),
            source: io_source(),
        },
        IssuerConfigError::Keys { .. } => IssuerConfigError::Keys {
            path: "/etc/wnodes/issuers/atlas.jwks".into(),
            why: "no keys".into(),
        },
        IssuerConfigError::Duplicate(_) => {
            IssuerConfigError::Duplicate("https://atlas-auth.cern.ch/".into())
        }
    }
}
