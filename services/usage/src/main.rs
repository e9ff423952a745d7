//! `wnodes-usage`: usage counters on Prometheus from every host's `usage.recorded` (`serve`, the
//! default). See the library docs.

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_usage::Usage>()
}
