//! Fuzz target: a string as a host, service or subject token (checks in
//! `wnodes_bus::fuzzing::exercise_names`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wnodes_bus::fuzzing::exercise_names(data);
});
