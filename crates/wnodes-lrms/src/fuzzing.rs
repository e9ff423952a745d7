//! What the fuzz targets (`fuzz/`, cargo fuzz) run on each input, and what the regression test
//! (`tests/fuzz_corpus.rs`) replays over the committed corpora and crash inputs.
//!
//! [`exercise`] feeds arbitrary bytes to a parser line by line, as a replay does, and checks
//! what must hold for any input: no panic; after the end of input nothing is pending; every
//! malformed record names a line that exists; every event has a job id and an attempt, converts
//! to a `wnodes.v1.Event` whose id starts with its type, and survives a JSON round trip; the
//! parser's saved state loads back; and a second parse of the same bytes gives the same items
//! (ids and cursors rely on parsing being deterministic).

use jiff::tz::TimeZone;

use crate::{
    convert::to_event,
    event::{LrmsEvent, LrmsKind},
    parse::{Item, ParseOptions, parser_for},
    replay::feed_line,
};

fn options() -> ParseOptions {
    ParseOptions {
        // A zone with DST, so gaps and folds are reachable; no zoneinfo database needed.
        tz: TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap_or(TimeZone::UTC),
        year: 2025,
        ..Default::default()
    }
}

fn parse(lrms: LrmsKind, data: &[u8]) -> (Vec<Item>, u64) {
    let mut p = parser_for(lrms, options());
    let mut out = Vec::new();
    let mut n = 0;
    for line in data.split(|b| *b == b'\n') {
        n += 1;
        feed_line(&mut *p, line, n, &mut out);
    }
    p.finish(&mut out);
    assert_eq!(
        p.pending_since(),
        None,
        "something pending after the end of input"
    );
    // Saved state must load back.
    let st = p.save_state();
    let mut q = parser_for(lrms, options());
    assert!(q.load_state(&st), "saved state does not load");
    (out, n)
}

/// Runs one fuzz input through the `lrms` parser and checks the invariants (panics if one
/// does not hold). Returns the number of events.
pub fn exercise(lrms: LrmsKind, data: &[u8]) -> usize {
    let (items, lines) = parse(lrms, data);
    let mut events = 0;
    for item in &items {
        match item {
            Item::Event(e) => {
                events += 1;
                check_event(e);
            }
            Item::Malformed(m) => {
                assert!(
                    m.line >= 1 && m.line <= lines,
                    "malformed line {} of {lines}",
                    m.line
                );
                assert!(!m.reason.is_empty());
            }
            Item::Skipped { line, .. } => assert!(*line >= 1 && *line <= lines),
        }
    }
    // Deterministic: the same bytes give the same items.
    let (again, _) = parse(lrms, data);
    assert_eq!(items, again, "two parses of the same input differ");
    events
}

fn check_event(e: &LrmsEvent) {
    assert!(!e.job_id.is_empty(), "event without a job id");
    assert!(e.run_attempt >= 1, "run attempt 0");
    let wire = to_event(e, "FUZZ", "fuzz@fuzz");
    let ty = wnodes_bus::EventType::of(wire.body.as_ref().unwrap_or_else(|| unreachable!()));
    assert!(wire.id.starts_with(ty.name()), "id {} of a {ty}", wire.id);
    assert!(wire.id.contains(&e.job_id));
    if !wire.host.is_empty() {
        assert!(
            wnodes_bus::subject::validate_host(&wire.host).is_ok(),
            "host {:?}",
            wire.host
        );
    }
    let json = serde_json::to_string(e).unwrap_or_else(|err| panic!("serialise: {err}"));
    let back: LrmsEvent =
        serde_json::from_str(&json).unwrap_or_else(|err| panic!("deserialise {json}: {err}"));
    assert_eq!(&back, e, "JSON round trip");
}
