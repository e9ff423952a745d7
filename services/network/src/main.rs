//! WNoDeS network service: not built yet (walking-skeleton issue); starts, reports ready, and waits
//! for SIGTERM so the runtime wiring is exercised.

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {}

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<Config, _, _>("network", 0, |ctx| async move {
        ctx.ready.set_ready();
        ctx.shutdown.cancelled().await;
        Ok(())
    })
}
