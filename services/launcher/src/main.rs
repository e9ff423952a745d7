//! `wnodes-launcher`: the per-host launcher service binary (see the library crate docs).

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_launcher::Launcher>()
}
