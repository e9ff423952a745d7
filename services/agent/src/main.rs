//! `wnodes-agent`: the host agent (see the library docs).

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_agent::HostAgent>()
}
