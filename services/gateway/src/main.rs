//! `wnodes-gateway`: see the library ([`wnodes_gateway`]) for what it does.

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_gateway::Gateway>()
}
