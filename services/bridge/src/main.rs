//! `wnodes-bridge`: the bridge service (`serve`, the default), the operator's `submit` and
//! `replay`, and the job starter (`job-starter`). See the library docs for each, and for the
//! exit codes. `job-starter` runs as the job's user: it reads no WNoDeS configuration and
//! starts no telemetry, so it is dispatched before the service runtime loads either.

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os();
    let argv0 = args.next();
    let mut rest = args.peekable();
    if rest.peek().is_some_and(|a| a == "job-starter") {
        let args = argv0.into_iter().chain(rest.skip(1));
        return std::process::ExitCode::from(wnodes_bridge::job_starter::main(args));
    }
    wnodes_runtime::main::<wnodes_bridge::Bridge>()
}
