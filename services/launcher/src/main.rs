//! `wnodes-launcher`: the per-host launcher service binary (see the library crate docs).

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_launcher::LauncherConfig, _, _>("launcher", 0, |ctx| async move {
        wnodes_launcher::service::run(ctx).await
    })
}
