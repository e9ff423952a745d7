//! Replays the committed fuzz seeds and corpus and every crash input ever found
//! (`fuzz/{seeds,corpus,artifacts}/{launch,policy}/`) through the fuzz targets' checks
//! (`wnodes_launcher::fuzzing`). No fuzzing happens here: campaigns run by hand with
//! `scripts/fuzz.sh launch` and `scripts/fuzz.sh policy`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::path::PathBuf;

use wnodes_launcher::fuzzing::{exercise_launch, exercise_policy};

fn target_inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    wnodes_testkit::files::fuzz_inputs(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        dir,
        target,
    )
}

/// Runs every committed input of `target` (seeds, corpus, crash inputs) through `check`;
/// returns how many it accepted and how many there were.
fn replay(target: &str, check: fn(&[u8]) -> bool) -> (usize, usize) {
    let seeds = target_inputs("seeds", target);
    assert!(seeds.len() >= 5, "the seeds are missing ({})", seeds.len());
    let corpus = target_inputs("corpus", target);
    assert!(
        corpus.len() >= 5,
        "the committed corpus is missing ({} files)",
        corpus.len()
    );
    let all: Vec<Vec<u8>> = seeds
        .iter()
        .chain(&corpus)
        .chain(&target_inputs("artifacts", target))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    (all.iter().filter(|d| check(d)).count(), all.len())
}

#[test]
fn committed_launch_corpus_and_crash_inputs_pass_the_checks() {
    let (built, all) = replay("launch", exercise_launch);
    assert!(built > 0, "no input made a qemu command line");
    assert!(built < all, "no input was refused");
}

#[test]
fn the_seeded_attacks_are_refused_and_the_real_values_accepted() {
    let read = |name: &str| {
        std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seeds/launch")
                .join(name),
        )
        .unwrap()
    };
    assert!(exercise_launch(&read("tap-ok")));
    assert!(exercise_launch(&read("user-ok")));
    assert!(!exercise_launch(&read("comma-injection")));
    assert!(!exercise_launch(&read("traversal")));
}

#[test]
fn committed_policy_corpus_and_crash_inputs_pass_the_checks() {
    let (made, all) = replay("policy", exercise_policy);
    assert!(made > 0, "no input made a spec");
    assert!(made < all, "no input was refused");
}

#[test]
fn the_seeded_requests_are_judged_as_the_policy_says() {
    let read = |name: &str| {
        std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seeds/policy")
                .join(name),
        )
        .unwrap()
    };
    for ok in ["defaults-ok", "maxima-ok", "own-image-subsecond-ok"] {
        assert!(exercise_policy(&read(ok)), "{ok}");
    }
    for refused in [
        "negative-walltime",
        "unknown-image",
        "other-vo-image",
        "vo-without-image",
        "too-many-cores",
        "script-ref",
        "no-run",
        "no-payload",
    ] {
        assert!(!exercise_policy(&read(refused)), "{refused}");
    }
}
