//! `wnodes-bridge`: the bridge service (`serve`, the default) and the job starter (`submit`).
//! See the library docs for both, and for the exit codes of `submit`.

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_bridge::Bridge>()
}
