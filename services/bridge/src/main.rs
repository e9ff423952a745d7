//! `wnodes-bridge`: the bridge service (`serve`, the default) and the job starter (`submit`).
//! See the library docs for both, and for the exit codes of `submit`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wnodes_bridge::{
    BridgeError, Config,
    server::{self, BridgeService},
    submit::{self, SubmitArgs},
};
use wnodes_bus::ErrorChain;
use wnodes_runtime::{Telemetry, exit};

/// WNoDeS bridge: the LRMS side of the event bus.
#[derive(Debug, Parser)]
#[command(name = "wnodes-bridge", version)]
struct Cli {
    /// Configuration file (TOML; `[bridge] grpc_addr = ...`).
    #[arg(short, long, env = "WNODES_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC service (the default).
    Serve,
    /// Start a job in a VM on this host and wait for it: the minimal job starter.
    Submit(Box<SubmitArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = match wnodes_runtime::config::load::<Config>("bridge", cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wnodes-bridge: configuration error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wnodes-bridge: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let tls = match server::tls_config(&cfg.service) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("wnodes-bridge: configuration error: {}", ErrorChain(&e));
                    return ExitCode::from(exit::CONFIG);
                }
            };
            rt.block_on(serve(cfg, tls))
        }
        Command::Submit(args) => {
            cfg.common.log_level = args.log_level.clone();
            rt.block_on(async move {
                wnodes_bus::connect::install_crypto_provider();
                let telemetry = match Telemetry::init("bridge", &cfg.common) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("wnodes-bridge: telemetry: {}", ErrorChain(&e));
                        return exit::CONFIG;
                    }
                };
                let code = Box::pin(submit::run(*args, &cfg.common)).await;
                let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
                code
            })
        }
    };
    ExitCode::from(code)
}

async fn serve(
    cfg: wnodes_runtime::Config<Config>,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> u8 {
    wnodes_runtime::run_with_config("bridge", 0, cfg, |ctx| async move {
        let listener = server::bind(ctx.config.grpc_addr).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| BridgeError::Listen {
                addr: ctx.config.grpc_addr,
                source,
            })?;
        let service = BridgeService::new(ctx.bus.clone(), ctx.source(), ctx.shutdown.clone());
        ctx.ready.set_ready();
        tracing::info!(%addr, tls = tls.is_some(), "Bridge gRPC service listening.");
        server::serve(listener, service, tls, ctx.shutdown.clone()).await?;
        Ok(())
    })
    .await
}
