//! Replays the committed fuzz seeds and corpus and every crash input ever found
//! (`fuzz/{seeds,corpus,artifacts}/launch/`) through the fuzz target's checks
//! (`wnodes_launcher::fuzzing`). No fuzzing happens here: campaigns run by hand with
//! `scripts/fuzz.sh launch`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::path::PathBuf;

use wnodes_launcher::fuzzing::exercise_launch;

fn inputs(dir: &str) -> Vec<PathBuf> {
    wnodes_testkit::files::fuzz_inputs(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        dir,
        "launch",
    )
}

#[test]
fn committed_launch_corpus_and_crash_inputs_pass_the_checks() {
    let seeds = inputs("seeds");
    assert!(seeds.len() >= 5, "the seeds are missing ({})", seeds.len());
    let corpus = inputs("corpus");
    assert!(
        corpus.len() >= 5,
        "the committed corpus is missing ({} files)",
        corpus.len()
    );
    let all: Vec<Vec<u8>> = seeds
        .iter()
        .chain(&corpus)
        .chain(&inputs("artifacts"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let built = all.iter().filter(|d| exercise_launch(d)).count();
    assert!(built > 0, "no input made a qemu command line");
    assert!(built < all.len(), "no input was refused");
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
