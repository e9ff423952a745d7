//! `wnodesctl`: the operator's CLI.
//!
//! `wnodesctl provision --site site.toml --out /etc/wnodes/nats [--nats URL] [--dry-run|--check]`
//! makes (or checks) the site's keys, nats-server's authorization file and every identity's
//! creds under `--out`, then, with `--nats`, the streams and durable consumers (as the admin,
//! `<out>/creds/admin.creds`). A second run with the same description changes nothing; with
//! `--dry-run` it only says what it would change. Exit codes: 0 done (or nothing to do), 1
//! `--check` found changes to make, 65 the description is invalid, 69 NATS unreachable,
//! 70 another failure.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wnodes_bus::ErrorChain;
use wnodes_site::{Action, AuthDir, Mode, Report, SiteDescription, SiteError, streams};

#[derive(Debug, Parser)]
#[command(name = "wnodesctl", version, about = "Operate a WNoDeS site")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make or check the site's NATS identities, authorization file, streams and durables.
    Provision(ProvisionArgs),
    /// How far behind each durable consumer is (as the `monitor` identity); with `--serve`, a
    /// Prometheus exporter of the same.
    Backlog(BacklogArgs),
}

#[derive(Debug, clap::Args)]
struct BacklogArgs {
    /// The NATS server.
    #[arg(long)]
    nats: String,
    /// The monitor's (or admin's) creds file.
    #[arg(long)]
    creds: PathBuf,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Serve `/metrics` on this address, measuring every `--every`, until SIGTERM.
    #[arg(long)]
    serve: Option<std::net::SocketAddr>,
    /// How often `--serve` measures.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    every: std::time::Duration,
}

#[derive(Debug, clap::Args)]
struct ProvisionArgs {
    /// The site description (TOML: site, hosts, [streams], [consumer]).
    #[arg(long)]
    site: PathBuf,
    /// Where the keys, `nats-auth.conf` and `creds/` live.
    #[arg(long)]
    out: PathBuf,
    /// Also make or check the streams and durables on this server (as the admin).
    #[arg(long)]
    nats: Option<String>,
    /// The admin's creds (default `<out>/creds/admin.creds`).
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Say what would change; change nothing.
    #[arg(long, conflicts_with = "check")]
    dry_run: bool,
    /// Like `--dry-run`, and exit 1 when anything would change.
    #[arg(long)]
    check: bool,
}

const DATAERR: u8 = 65;
const UNAVAILABLE: u8 = 69;
const SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wnodesctl: cannot start the runtime: {e}");
            return ExitCode::from(SOFTWARE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Provision(args) => provision(args).await,
            Command::Backlog(args) => backlog(args).await,
        }
    });
    ExitCode::from(code)
}

fn print(title: &str, report: &Report) {
    for change in report.notable() {
        println!("{change}");
    }
    println!("{title}: {}", report.summary());
}

async fn provision(args: ProvisionArgs) -> u8 {
    wnodes_bus::connect::install_crypto_provider();
    let mode = if args.dry_run || args.check {
        Mode::DryRun
    } else {
        Mode::Apply
    };
    let site = match SiteDescription::load(&args.site) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return DATAERR;
        }
    };
    let auth = AuthDir::new(&args.out);
    let mut changed = false;
    match auth.provision(&site, mode) {
        Ok(report) => {
            print("identities", &report);
            changed |= !report.is_noop();
        }
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return SOFTWARE;
        }
    }
    if let Some(url) = &args.nats {
        let creds = args.creds.clone().unwrap_or_else(|| auth.admin_creds());
        let cfg = wnodes_bus::NatsConfig {
            url: url.clone(),
            creds_file: Some(creds),
            ..Default::default()
        };
        let client = match wnodes_bus::connect::connect(&cfg, "wnodesctl", None, None).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return UNAVAILABLE;
            }
        };
        let js = async_nats::jetstream::new(client);
        match streams::provision(&js, &site, mode).await {
            Ok(report) => {
                print("streams and consumers", &report);
                changed |= !report.is_noop();
                if report.count(&Action::CannotChange) > 0 {
                    eprintln!(
                        "wnodesctl: some settings cannot be changed in place (see `cannot change` above)"
                    );
                    return SOFTWARE;
                }
            }
            Err(e @ SiteError::JetStream { .. }) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return UNAVAILABLE;
            }
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return SOFTWARE;
            }
        }
    }
    if mode == Mode::DryRun {
        println!("(dry run: nothing was changed)");
    }
    if args.check && changed { 1 } else { 0 }
}

async fn backlog(args: BacklogArgs) -> u8 {
    wnodes_bus::connect::install_crypto_provider();
    let cfg = wnodes_bus::NatsConfig {
        url: args.nats.clone(),
        creds_file: Some(args.creds.clone()),
        ..Default::default()
    };
    let client = match wnodes_bus::connect::connect(&cfg, "wnodesctl-backlog", None, None).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    let js = async_nats::jetstream::new(client);
    if let Some(addr) = args.serve {
        return serve_backlog(js, addr, args.every).await;
    }
    let report = match wnodes_site::backlog::measure(&js).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return UNAVAILABLE;
        }
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("wnodesctl: {e}");
                return SOFTWARE;
            }
        }
    } else {
        println!(
            "{:<40} {:>9} {:>11} {:>14}  retention",
            "durable", "pending", "ack pending", "oldest (s)"
        );
        for c in &report.consumers {
            println!(
                "{:<40} {:>9} {:>11} {:>14}  {}",
                c.durable,
                c.pending,
                c.ack_pending,
                c.oldest_unprocessed_age_seconds
                    .map_or("-".to_string(), |a| format!("{a:.0}")),
                if c.behind_retention {
                    "LOST MESSAGES (see docs/operations.md)"
                } else {
                    "ok"
                }
            );
        }
        println!(
            "events stream keeps messages {:.0} s",
            report.events_max_age_seconds
        );
    }
    0
}

/// Serves `/metrics` with the last measurement, measuring every `every`.
async fn serve_backlog(
    js: async_nats::jetstream::Context,
    addr: std::net::SocketAddr,
    every: std::time::Duration,
) -> u8 {
    use parking_lot::Mutex;
    use std::sync::Arc;
    let last = Arc::new(Mutex::new(String::new()));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wnodesctl: cannot bind {addr}: {e}");
            return 78;
        }
    };
    let metrics = last.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { m.lock().clone() }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    eprintln!("wnodesctl: serving /metrics on {addr}, measuring every {every:?}");
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return 0,
        }
        match wnodes_site::backlog::measure(&js).await {
            Ok(r) => {
                *last.lock() = wnodes_site::backlog::prometheus_text(&r);
            }
            Err(e) => eprintln!("wnodesctl: measuring the backlog: {}", ErrorChain(&e)),
        }
    }
}
