//! Fuzz target: a job's request through the site policy (checks in
//! `wnodes_launcher::fuzzing::exercise_policy`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wnodes_launcher::fuzzing::exercise_policy(data);
});
