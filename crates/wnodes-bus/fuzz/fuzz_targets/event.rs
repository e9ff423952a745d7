//! Fuzz target: bytes as a consumer receives them (checks in `wnodes_bus::fuzzing::exercise_event`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wnodes_bus::fuzzing::exercise_event(data);
});
