//! [`Accounting`]: the service as the runtime runs it (`serve`, the default, `records` and
//! `apel-export`).

use wnodes_bus::ErrorChain;
use wnodes_runtime::{Parts, Service, ServiceCtx, StartError, exit};

use crate::{AccountingHandler, Config, Metrics, apel, open_store, records};

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
    /// Write APEL messages for the usage records of a period into an SSM outgoing queue
    /// (`ssmsend`'s dirq). Job records go once each; summaries, cloud and sync records go
    /// again when their figures change. Settings: `[accounting.apel]`.
    ApelExport {
        /// The accounting store: a SQLite path or `sqlite://PATH`, or `postgres://…`.
        #[arg(long, value_name = "PATH_OR_URL")]
        store: String,
        /// First day (UTC, `YYYY-MM-DD`), inclusive: records whose VM stopped from then.
        #[arg(long, value_name = "YYYY-MM-DD")]
        from: String,
        /// Last day (UTC, `YYYY-MM-DD`), exclusive.
        #[arg(long, value_name = "YYYY-MM-DD")]
        to: String,
        /// The outgoing queue directory (created when missing).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// One kind only (job, summary, cloud or sync); all four by default.
        #[arg(long)]
        kind: Option<wnodes_apel::Kind>,
    },
}

impl Service for Accounting {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::ACCOUNTING;
    const ABOUT: &'static str = "WNoDeS accounting: one usage record per job run whose VM started";
    type Config = Config;
    type Handler = AccountingHandler;
    type Command = AccountingCommand;

    fn validate(config: &Config) -> Result<(), wnodes_runtime::ConfigError> {
        config
            .validate()
            .map_err(|e| wnodes_runtime::ConfigError::section(Self::NAME, e))
    }

    /// Opens the records database (which also holds the consumer's keys, so that a record
    /// commits with its key).
    async fn build(ctx: &ServiceCtx<Config>) -> Result<Parts<AccountingHandler>, StartError> {
        let url = ctx.config.store_url(&ctx.state_dir);
        let store = open_store(&url)
            .await
            .map_err(|e| StartError::unavailable("the accounting store", e))?;
        let metrics = Metrics::register(&mut ctx.registry.lock());
        tracing::info!(store = %url, "Accounting store open.");
        let mut parts = Parts::consumer(AccountingHandler {
            source: ctx.source(),
            metrics,
            benchmarks: ctx.config.benchmarks(),
        })
        .with_store(store);
        if let Some(addr) = ctx.config.grpc_addr {
            parts = report_api(ctx, &url, addr, parts).await?;
        }
        if let Some(periodic) = ctx.config.apel_export.clone() {
            ctx.config
                .apel
                .validate()
                .map_err(|e| StartError::config(Self::NAME, e))?;
            tracing::info!(out = %periodic.out.display(), every = ?periodic.every, "APEL export on.");
            let (cfg, shutdown) = (ctx.config.apel.clone(), ctx.shutdown.clone());
            parts = parts.task("apel-export", async move {
                apel::run_periodic(url, cfg, periodic, shutdown)
                    .await
                    .map_err(Into::into)
            });
        }
        Ok(parts)
    }

    async fn run_command(command: AccountingCommand, config: wnodes_runtime::Config<Config>) -> u8 {
        match command {
            AccountingCommand::Records { json } => {
                let state_dir = config.common.state_dir_of(Self::NAME);
                print_records(&config.service.store_url(&state_dir), json).await
            }
            AccountingCommand::ApelExport {
                store,
                from,
                to,
                out,
                kind,
            } => apel_export(&config.service.apel, &store, &from, &to, out, kind).await,
        }
    }
}

async fn apel_export(
    cfg: &wnodes_apel::ApelConfig,
    store: &str,
    from: &str,
    to: &str,
    out: std::path::PathBuf,
    kind: Option<wnodes_apel::Kind>,
) -> u8 {
    use crate::apel::{ApelExportError, ExportRequest};
    let request = || -> Result<(crate::StoreUrl, ExportRequest), ApelExportError> {
        let url: crate::StoreUrl = store.parse()?;
        let (from_ms, to_ms) = (apel::parse_date(from)?, apel::parse_date(to)?);
        if from_ms >= to_ms {
            return Err(ApelExportError::EmptyPeriod {
                from: from.into(),
                to: to.into(),
            });
        }
        let kinds = kind.map_or_else(|| wnodes_apel::Kind::ALL.to_vec(), |k| vec![k]);
        Ok((url, ExportRequest::new(from_ms, to_ms, kinds, out)))
    };
    let (url, req) = match request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wnodes-accounting: {}", ErrorChain(&e));
            return exit::USAGE;
        }
    };
    if let Err(e) = cfg.validate() {
        eprintln!("wnodes-accounting: {}", ErrorChain(&e));
        return exit::CONFIG;
    }
    let result = async {
        let pool = apel::open(&url).await?;
        apel::export(&pool, cfg, &req).await
    }
    .await;
    match result {
        Ok(report) => {
            for (kind, r) in &report.kinds {
                println!(
                    "{kind}: {} records in {} messages, {} unchanged",
                    r.records, r.messages, r.unchanged
                );
            }
            if report.recovered_queued + report.recovered_unqueued > 0 {
                println!(
                    "recovered: {} messages already queued, {} never queued",
                    report.recovered_queued, report.recovered_unqueued
                );
            }
            for (run_key, why) in &report.unexportable {
                println!("not exported: {run_key}: {why}");
            }
            for run_key in &report.waiting {
                println!("not exported yet: {run_key}: waiting for the job's identity");
            }
            println!("queue: {}", req.out.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("wnodes-accounting: {}", ErrorChain(&e));
            exit::UNAVAILABLE
        }
    }
}

async fn print_records(url: &crate::StoreUrl, json: bool) -> u8 {
    let result = async {
        let pool = records::open_read_only(url).await?;
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

/// Binds the report API and adds the task serving it.
async fn report_api(
    ctx: &ServiceCtx<Config>,
    url: &crate::StoreUrl,
    addr: std::net::SocketAddr,
    parts: Parts<AccountingHandler>,
) -> Result<Parts<AccountingHandler>, StartError> {
    use tonic::transport::{Server, server::TcpIncoming};
    use wnodes_proto::v1::accounting_server::AccountingServer;
    let c = &ctx.config;
    let tls = wnodes_runtime::grpc::server_tls(
        "accounting",
        c.tls_cert.as_deref(),
        c.tls_key.as_deref(),
        c.client_ca.as_deref(),
    )
    .map_err(|e| StartError::config(Accounting::NAME, e))?;
    let pool = records::open_read_only(url)
        .await
        .map_err(|e| StartError::unavailable("the accounting store", e))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::config(Accounting::NAME, ReportBind { addr, source: e }))?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, tls = tls.is_some(), "Accounting report API listening.");
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .map_err(|e| StartError::config(Accounting::NAME, e))?;
    }
    let shutdown = ctx.shutdown.clone();
    let router = server.add_service(AccountingServer::new(crate::report::ReportApi { pool }));
    Ok(parts.task("report-api", async move {
        router
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled_owned())
            .await
            .map_err(Into::into)
    }))
}

/// The report API's address cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("accounting.grpc_addr: cannot listen on {addr}")]
pub(crate) struct ReportBind {
    pub(crate) addr: std::net::SocketAddr,
    #[source]
    pub(crate) source: std::io::Error,
}
