//! Fuzz target: the gateway's own checks, its first line naming which (`plan`, `config`,
//! `path`, `exportfs`, `ganesha`, `tcp`, `ldd`; checks in
//! `wnodes_gateway::fuzzing::exercise_gateway`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wnodes_gateway::fuzzing::exercise_gateway(data);
});
