//! Fuzz target: an event's values through the launcher's validators (checks in
//! `wnodes_launcher::fuzzing::exercise_launch`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wnodes_launcher::fuzzing::exercise_launch(data);
});
