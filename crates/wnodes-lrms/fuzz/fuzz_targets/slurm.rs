//! Fuzz target: the slurm parser on arbitrary bytes (checks in `wnodes_lrms::fuzzing::exercise`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wnodes_lrms::{LrmsKind, fuzzing::exercise};

fuzz_target!(|data: &[u8]| {
    exercise(LrmsKind::Slurm, data);
});
