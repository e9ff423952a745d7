//! `wnodes-accounting`: the accounting service (`serve`, the default) and a reader for its usage
//! records (`records [--json]`). See the library docs for what is recorded and when.

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_accounting::Accounting>()
}
