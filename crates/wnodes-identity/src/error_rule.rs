//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::{
    CredentialError,
    proxy::ProxyError,
    token::{IssuerConfigError, TokenError},
};

wnodes_testkit::error_rule! {
    CredentialError {
        CredentialError::Token(_) => CredentialError::Token(TokenError::Expired { exp: 1, now: 2 }),
        CredentialError::Proxy(_) => CredentialError::Proxy(ProxyError::NoVoms),
        CredentialError::VoMismatch { .. } => CredentialError::VoMismatch {
            proxy: "atlas".into(),
            token: "cms".into(),
        },
        CredentialError::Missing => CredentialError::Missing,
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
    ProxyError {
        ProxyError::Unreadable(_) => ProxyError::Unreadable("no CERTIFICATE block".into()),
        ProxyError::NotValidNow { .. } => ProxyError::NotValidNow {
            subject: "/C=IT/O=T/CN=Alice/CN=123".into(),
            not_after: "Dec  2 18:00:00 2026 +00:00".into(),
        },
        ProxyError::BadSignature { .. } => ProxyError::BadSignature {
            subject: "/C=IT/O=T/CN=Alice/CN=123".into(),
            issuer: "/C=IT/O=T/CN=Alice".into(),
        },
        ProxyError::ProxyName { .. } => ProxyError::ProxyName {
            subject: "/C=IT/O=T/CN=Bob/CN=123".into(),
            issuer: "/C=IT/O=T/CN=Alice".into(),
        },
        ProxyError::UntrustedCa { .. } => ProxyError::UntrustedCa {
            subject: "/C=IT/O=T/CN=Mallory".into(),
            issuer: "/C=IT/O=T/CN=Mallory".into(),
            ca_dir: "/etc/grid-security/certificates".into(),
        },
        ProxyError::NoVoms => ProxyError::NoVoms,
        ProxyError::AcMalformed(_) => ProxyError::AcMalformed("no FQAN".into()),
        ProxyError::UntrustedVoms { .. } => ProxyError::UntrustedVoms {
            vo: "atlas".into(),
            subject: "/C=IT/O=T/CN=voms.example.org".into(),
            issuer: "/C=IT/O=T/CN=voms.example.org".into(),
            why: "the LSC names another server".into(),
        },
        ProxyError::AcSignature => ProxyError::AcSignature,
        ProxyError::AcNotValidNow { .. } => ProxyError::AcNotValidNow {
            not_before: 1,
            not_after: 2,
        },
        ProxyError::AcHolder(_) => ProxyError::AcHolder("01:02".into()),
        ProxyError::Fqan { .. } => ProxyError::Fqan {
            fqan: "/cms".into(),
            vo: "atlas".into(),
        },
    }
}
