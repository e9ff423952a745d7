//! Replays the committed fuzz seeds and corpora and every crash input ever found
//! (`fuzz/{seeds,corpus,artifacts}/<target>/`) through the fuzz targets' checks
//! (`wnodes_bus::fuzzing`). No fuzzing happens here: campaigns run by hand with
//! `scripts/fuzz.sh event|names`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::path::PathBuf;

use wnodes_bus::fuzzing::{exercise_event, exercise_names};

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    wnodes_testkit::files::fuzz_inputs(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        dir,
        target,
    )
}

fn all(target: &str) -> Vec<Vec<u8>> {
    let corpus = inputs("corpus", target);
    assert!(
        corpus.len() >= 5,
        "{target}: the committed corpus is missing ({} files)",
        corpus.len()
    );
    let seeds = inputs("seeds", target);
    assert!(!seeds.is_empty(), "{target}: no seeds");
    seeds
        .iter()
        .chain(&corpus)
        .chain(&inputs("artifacts", target))
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[test]
fn committed_event_corpus_and_crash_inputs_pass_the_checks() {
    let decoded = all("event").iter().filter(|d| exercise_event(d)).count();
    assert!(
        decoded > 0,
        "no corpus input decodes to an event with a body"
    );
}

#[test]
fn committed_names_corpus_and_crash_inputs_pass_the_checks() {
    let accepted: usize = all("names").iter().map(|d| exercise_names(d)).sum();
    assert!(accepted > 0, "no corpus input is a valid name");
}
