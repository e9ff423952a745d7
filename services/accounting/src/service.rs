//! [`Accounting`]: the service as the runtime runs it (`serve`, the default, and `records`).

use std::path::Path;

use wnodes_bus::{ErrorChain, EventType};
use wnodes_runtime::{Parts, Scope, Service, ServiceCtx, StartError, exit};

use crate::{AccountingHandler, Config, Metrics, open_store, records};

/// The accounting service: one central consumer on every host's events.
#[derive(Debug)]
pub struct Accounting;

/// Accounting's subcommands besides `serve`.
#[derive(Debug, clap::Subcommand)]
pub enum AccountingCommand {
    /// Print the usage records in the database.
    Records {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl Service for Accounting {
    const NAME: &'static str = "accounting";
    const ABOUT: &'static str = "WNoDeS accounting: one usage record per job run whose VM started";
    const SCOPE: Scope = Scope::Central;
    const CONSUMES: &'static [EventType] = &[
        EventType::JobStarted,
        EventType::VmRunning,
        EventType::VmStopped,
        EventType::JobFinished,
        EventType::VmFailed,
    ];
    type Config = Config;
    type Handler = AccountingHandler;
    type Command = AccountingCommand;

    /// Opens the records database (which also holds the consumer's keys, so that a record
    /// commits with its key).
    async fn build(ctx: &ServiceCtx<Config>) -> Result<Parts<AccountingHandler>, StartError> {
        let path = ctx.config.database_path(&ctx.state_dir);
        let store = open_store(&path)
            .await
            .map_err(|e| StartError::config(Self::NAME, e))?;
        let metrics = Metrics::register(&mut ctx.registry.lock());
        tracing::info!(database = %path.display(), "Accounting database open.");
        Ok(Parts::consumer(AccountingHandler {
            source: ctx.source(),
            metrics,
        })
        .with_store(store))
    }

    async fn run_command(command: AccountingCommand, config: wnodes_runtime::Config<Config>) -> u8 {
        match command {
            AccountingCommand::Records { json } => {
                let state_dir = config.common.state_dir_of(Self::NAME);
                print_records(&config.service.database_path(&state_dir), json).await
            }
        }
    }
}

async fn print_records(path: &Path, json: bool) -> u8 {
    let result = async {
        let pool = records::open_read_only(path).await?;
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
