//! `wnodes-accounting`: the accounting service (`serve`, the default) and a reader for its usage
//! records (`records [--json]`). See the library docs for what is recorded and when.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wnodes_accounting::{
    Accounting, Config, DURABLE, Metrics, filter_subjects, open_store, records,
};
use wnodes_bus::{Consumer, ErrorChain};
use wnodes_runtime::exit;

/// WNoDeS accounting: one usage record per job run whose VM started.
#[derive(Debug, Parser)]
#[command(name = "wnodes-accounting", version)]
struct Cli {
    /// Configuration file (TOML; `[accounting] database = ...`).
    #[arg(short, long, env = "WNODES_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: the `accounting` consumer on every host's events (the default).
    Serve,
    /// Print the usage records in the database.
    Records {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match wnodes_runtime::config::load::<Config>("accounting", cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wnodes-accounting: configuration error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wnodes-accounting: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => rt.block_on(serve(cfg)),
        Command::Records { json } => rt.block_on(print_records(cfg, json)),
    };
    ExitCode::from(code)
}

async fn serve(cfg: wnodes_runtime::Config<Config>) -> u8 {
    wnodes_runtime::run_with_config("accounting", 0, cfg, |ctx| async move {
        let path = ctx.config.database_path(&ctx.state_dir);
        let store = open_store(&path).await?;
        let spec = ctx.consumer_spec(DURABLE.into(), filter_subjects()?);
        let metrics = match ctx.registry.lock() {
            Ok(mut r) => Metrics::register(&mut r),
            Err(_) => anyhow::bail!("the metrics registry is poisoned"),
        };
        let handler = Accounting {
            source: ctx.source(),
            metrics,
        };
        let consumer = Consumer::create(ctx.bus.clone(), store, spec, handler).await?;
        ctx.ready.set_ready();
        tracing::info!(database = %path.display(), "Accounting ready.");
        consumer.run(ctx.shutdown.clone()).await?;
        Ok(())
    })
    .await
}

async fn print_records(cfg: wnodes_runtime::Config<Config>, json: bool) -> u8 {
    let state_dir = cfg
        .common
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/wnodes/accounting"));
    let path = cfg.service.database_path(&state_dir);
    let result = async {
        let pool = records::open_read_only(&path).await?;
        records::list(&pool).await
    }
    .await;
    match result {
        Ok(recs) if json => {
            for r in &recs {
                match serde_json::to_string(r) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("wnodes-accounting: cannot render a record: {e}");
                        return exit::SOFTWARE;
                    }
                }
            }
            exit::OK
        }
        Ok(recs) => {
            print!("{}", records::render_table(&recs));
            exit::OK
        }
        Err(e) => {
            eprintln!("wnodes-accounting: {}", ErrorChain(&e));
            exit::UNAVAILABLE
        }
    }
}
