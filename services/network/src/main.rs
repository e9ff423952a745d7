//! `wnodes-network`: see the library ([`wnodes_network`]) for what it does.

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_network::Network>()
}
