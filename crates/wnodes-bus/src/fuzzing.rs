//! What the fuzz targets check (`fuzz/`, run by hand with `scripts/fuzz.sh`), shared with the
//! test that replays their committed corpora (`tests/fuzz_corpus.rs`), so a crash input stays a
//! regression test.
//!
//! - [`exercise_event`]: bytes as a consumer receives them, through the same decoding and the
//!   accessors every handler and the dead-letter path use. It must never panic; an event that
//!   decodes has a subject only if its host is a valid name, and its subject then passes
//!   [`subject::validate_token`] token by token.
//! - [`exercise_names`]: a string as a host name, a service or a verb: the validators accept
//!   only what the subject and durable builders can use, and a valid host name round-trips
//!   through its subject token.

use prost::Message;
use wnodes_proto::v1::Event;

use crate::{event::EventExt, subject};

/// Decodes `data` as an [`Event`] and, if it decodes, asks it what the consumer and the
/// handlers ask. Returns whether it decoded with a body.
pub fn exercise_event(data: &[u8]) -> bool {
    let Ok(event) = Event::decode(data) else {
        return false;
    };
    let _ = event.event_type();
    let _ = event.run_key();
    let _ = event.cloudevent().map(|c| c.headers().len());
    if let Ok(s) = event.subject() {
        assert!(
            subject::validate_host(&event.host).is_ok() || event.host.is_empty(),
            "a subject was built for the invalid host {:?}",
            event.host
        );
        for token in s.split('.') {
            assert!(
                !token.is_empty() && !token.contains(['*', '>', ' ']),
                "subject {s:?} has a bad token"
            );
        }
    }
    event.body.is_some()
}

/// `data` (lossy UTF-8) through every name validator and builder. Returns how many accepted it.
pub fn exercise_names(data: &[u8]) -> usize {
    let name = String::from_utf8_lossy(data);
    let mut accepted = 0;
    if subject::validate_host(&name).is_ok() {
        accepted += 1;
        let token = subject::encode_host(&name);
        assert!(token.is_ok(), "the valid host {name:?} does not encode");
        let token = token.unwrap_or_default();
        assert_eq!(subject::decode_host(&token), name, "the host round-trips");
        assert!(!token.contains(['.', '*', '>', ' ']), "{token:?}");
        assert!(
            subject::host_filter(&name).is_ok(),
            "the valid host {name:?} has no filter"
        );
    } else {
        assert!(subject::encode_host(&name).is_err());
    }
    if subject::validate_token("service", &name).is_ok() {
        accepted += 1;
        assert!(
            !name.contains(['.', '*', '>']),
            "{name:?} accepted as a token"
        );
        let _ = subject::durable_name(&name, None);
        let _ = subject::control_subject("hv1.example.org", &name, "ping");
    }
    if let Ok(s) = subject::event_subject(&name, "vm.requested") {
        accepted += 1;
        assert!(s.starts_with("wnodes.evt."), "{s}");
        assert!(!s.contains(['*', '>', ' ']), "{s}");
    }
    accepted
}
