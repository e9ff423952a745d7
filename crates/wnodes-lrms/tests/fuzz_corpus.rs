//! Replays the committed fuzz seeds and corpora and every crash input ever found
//! (`fuzz/{seeds,corpus,artifacts}/<target>/`) through the fuzz targets' checks. No fuzzing happens here:
//! campaigns run by hand with `scripts/fuzz.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::path::PathBuf;

use wnodes_lrms::{LrmsKind, fuzzing::exercise};

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    wnodes_testkit::files::fuzz_inputs(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        dir,
        target,
    )
}

#[test]
fn committed_corpora_and_crash_inputs_pass_the_checks() {
    for (target, lrms) in [
        ("htcondor", LrmsKind::Htcondor),
        ("pbs", LrmsKind::Pbs),
        ("lsf", LrmsKind::Lsf),
        ("slurm", LrmsKind::Slurm),
    ] {
        let corpus = inputs("corpus", target);
        assert!(
            corpus.len() >= 5,
            "{target}: the committed corpus is missing ({} files)",
            corpus.len()
        );
        let mut events = 0;
        let seeds = inputs("seeds", target);
        assert!(!seeds.is_empty(), "{target}: no seeds");
        for p in seeds
            .iter()
            .chain(&corpus)
            .chain(&inputs("artifacts", target))
        {
            let data = std::fs::read(p).unwrap();
            events += exercise(lrms, &data);
        }
        assert!(events > 0, "{target}: no corpus input yields an event");
    }
}
