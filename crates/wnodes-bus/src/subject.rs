//! Every NATS subject, stream and consumer name the system uses, in one place.
//!
//! Scheme (ARCHITECTURE.md, "Subjects"):
//!
//! ```text
//! wnodes.evt.<host>.<domain>.<event>     per-run events, e.g. wnodes.evt.hv01_cnaf_infn_it.vm.requested
//! wnodes.evt._queued.job.queued          JobQueued (no host yet)
//! wnodes.dlq.<consumer>                  dead letters of one durable consumer
//! wnodes.ctl.<host>.<service>.<verb>     control requests to one host's service (core NATS, not stored)
//! ```
//!
//! Host names contain dots, which separate NATS tokens. A host name is validated as an RFC 1123
//! name (lowercase letters, digits, `-`, labels separated by `.`) and encoded by turning every
//! `.` into `_`: `_` cannot occur in a valid host name, so the encoding is reversible, and tokens
//! starting with `_` are free for reserved names such as `_queued`.

use crate::error::BusError;

/// Stream holding every lifecycle event (limits retention: several services read each event).
pub const EVENTS_STREAM: &str = "WNODES_EVENTS";
/// Subjects captured by [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "wnodes.evt.>";
/// Stream holding dead letters.
pub const DLQ_STREAM: &str = "WNODES_DLQ";
/// Subjects captured by [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = "wnodes.dlq.>";
/// Host token for events that have no host yet (JobQueued).
pub const QUEUED_HOST_TOKEN: &str = "_queued";

const EVT_PREFIX: &str = "wnodes.evt";
/// Prefix of control requests: core NATS request/reply, never in a stream ([`crate::control`]).
pub const CTL_PREFIX: &str = "wnodes.ctl";

/// Checks that `host` is a valid RFC 1123 host name (lowercase) and returns it encoded as one
/// NATS subject token.
pub fn encode_host(host: &str) -> Result<String, BusError> {
    validate_host(host)?;
    Ok(host.replace('.', "_"))
}

/// Reverses [`encode_host`].
pub fn decode_host(token: &str) -> String {
    token.replace('_', ".")
}

/// Validates a host name: 1–253 characters, labels of 1–63 `[a-z0-9-]` not starting or ending
/// with `-`.
pub fn validate_host(host: &str) -> Result<(), BusError> {
    let bad = |why: &str| Err(BusError::InvalidName(format!("host name {host:?}: {why}")));
    if host.is_empty() || host.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("every label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label cannot start or end with '-'");
        }
    }
    Ok(())
}

/// Validates a name used as a NATS token or durable consumer name (service names, consumer
/// names): 1–64 of `[A-Za-z0-9_-]`.
pub fn validate_token(kind: &str, name: &str) -> Result<(), BusError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(BusError::InvalidName(format!(
            "{kind} {name:?}: must be 1 to 64 of A-Z a-z 0-9 '-' '_'"
        )));
    }
    Ok(())
}

/// The subject an event of type `event_type` (e.g. `"vm.requested"`) about a run on `host` is
/// published to. An empty host means "not yet placed" ([`QUEUED_HOST_TOKEN`]).
pub fn event_subject(host: &str, event_type: &str) -> Result<String, BusError> {
    let token = if host.is_empty() {
        QUEUED_HOST_TOKEN.to_owned()
    } else {
        encode_host(host)?
    };
    Ok(format!("{EVT_PREFIX}.{token}.{event_type}"))
}

/// Filter for events of `event_type` on one host (`Some`) or on every host (`None`).
pub fn event_filter(host: Option<&str>, event_type: &str) -> Result<String, BusError> {
    let token = match host {
        Some(h) => encode_host(h)?,
        None => "*".to_owned(),
    };
    Ok(format!("{EVT_PREFIX}.{token}.{event_type}"))
}

/// The filter subject through which a consumer receives events of `event_type`: those of
/// `host` for a per-host consumer (`Some`), of every host for a central one (`None`).
/// [`EventType::JobQueued`](crate::EventType::JobQueued) has no host yet: it is always read from
/// the reserved `_queued` token.
pub fn consumer_filter(
    event_type: crate::EventType,
    host: Option<&str>,
) -> Result<String, BusError> {
    if event_type == crate::EventType::JobQueued {
        return event_subject("", event_type.name());
    }
    event_filter(host, event_type.name())
}

/// Filter for every event of one host.
pub fn host_filter(host: &str) -> Result<String, BusError> {
    Ok(format!("{EVT_PREFIX}.{}.>", encode_host(host)?))
}

/// Dead-letter subject of one durable consumer.
pub fn dlq_subject(consumer: &str) -> String {
    format!("wnodes.dlq.{consumer}")
}

/// The subject on which `service` on `host` takes `verb` control requests:
/// `wnodes.ctl.<host token>.<service>.<verb>`.
pub fn control_subject(host: &str, service: &str, verb: &str) -> Result<String, BusError> {
    validate_token("service name", service)?;
    validate_token("control verb", verb)?;
    Ok(format!(
        "{CTL_PREFIX}.{}.{service}.{verb}",
        encode_host(host)?
    ))
}

/// The subject on which the image service of `host` takes prefetch requests.
pub fn image_prefetch_subject(host: &str) -> Result<String, BusError> {
    control_subject(host, "image", "prefetch")
}

/// Durable consumer name of a service: `<service>` for a central service, `<service>-<host>`
/// (host encoded) for a per-hypervisor one.
pub fn durable_name(service: &str, host: Option<&str>) -> Result<String, BusError> {
    validate_token("service name", service)?;
    Ok(match host {
        Some(h) => format!("{service}-{}", encode_host(h)?),
        None => service.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_encoding_round_trips_and_rejects_bad_names() {
        let enc = encode_host("hv01.cnaf.infn.it").unwrap();
        assert_eq!(enc, "hv01_cnaf_infn_it");
        assert_eq!(decode_host(&enc), "hv01.cnaf.infn.it");
        for bad in [
            "",
            "a..b",
            "UPPER.x",
            "a_b",
            "-a.b",
            "a b",
            "a.*",
            "a.>",
            &"x".repeat(64),
        ] {
            assert!(encode_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn subjects_have_one_token_per_host() {
        let s = event_subject("hv01.example.org", "vm.requested").unwrap();
        assert_eq!(s, "wnodes.evt.hv01_example_org.vm.requested");
        assert_eq!(s.split('.').count(), 5);
        assert_eq!(
            event_subject("", "job.queued").unwrap(),
            "wnodes.evt._queued.job.queued"
        );
        assert_eq!(
            event_filter(None, "vm.stopped").unwrap(),
            "wnodes.evt.*.vm.stopped"
        );
        assert_eq!(host_filter("h1").unwrap(), "wnodes.evt.h1.>");
        assert_eq!(
            durable_name("launcher", Some("hv.x")).unwrap(),
            "launcher-hv_x"
        );
        assert!(durable_name("bad.name", None).is_err());
        assert_eq!(
            image_prefetch_subject("hv01.example.org").unwrap(),
            "wnodes.ctl.hv01_example_org.image.prefetch"
        );
        assert!(control_subject("hv.x", "image", "pre.fetch").is_err());
        assert!(image_prefetch_subject("hv.*").is_err());
        use crate::EventType;
        assert_eq!(
            consumer_filter(EventType::VmStopped, Some("hv.x")).unwrap(),
            "wnodes.evt.hv_x.vm.stopped"
        );
        assert_eq!(
            consumer_filter(EventType::VmStopped, None).unwrap(),
            "wnodes.evt.*.vm.stopped"
        );
        assert_eq!(
            consumer_filter(EventType::JobQueued, Some("hv.x")).unwrap(),
            "wnodes.evt._queued.job.queued"
        );
    }
}
