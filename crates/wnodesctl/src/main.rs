//! `wnodesctl`: the operator's CLI.
//!
//! `wnodesctl provision --site site.toml --out /etc/wnodes/nats [--nats URL] [--dry-run|--check]`
//! makes (or checks) the site's keys, nats-server's authorization file and every identity's
//! creds under `--out`, then, with `--nats`, the streams and durable consumers (as the admin,
//! `<out>/creds/admin.creds`). A second run with the same description changes nothing; with
//! `--dry-run` it only says what it would change. Exit codes: 0 done (or nothing to do), 1
//! `--check` found changes to make, 65 the description is invalid, 69 NATS unreachable,
//! 70 another failure.
//!
//! `wnodesctl backlog` (as the monitor) and `wnodesctl dlq list|show|redrive` (as the admin):
//! `docs/operations.md`. `wnodesctl accounting report`: usage from accounting's report API.
//! `wnodesctl prefetch` (as the admin): asks hosts' image services to fetch an image now.
//!
//! | module | subcommand |
//! |---|---|
//! | `provision` | `provision` |
//! | `backlog` | `backlog` |
//! | `dlq` | `dlq list`, `dlq show`, `dlq redrive` |
//! | `job` | `job RUN` |
//! | `accounting` | `accounting report` |
//! | `vms` | `vms [--host H] [--all]` |
//! | `hosts` | `hosts [--host H] [--check]` |
//! | `prefetch` | `prefetch --image I --hosts H1,H2` |

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod accounting;
mod backlog;
mod dlq;
mod hosts;
mod job;
mod prefetch;
mod provision;
mod vms;

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
    /// How far behind each durable consumer is, the dead letters and the VMs per host (as the
    /// `monitor` identity); with `--serve`, a Prometheus exporter of the same.
    Backlog(BacklogArgs),
    /// Dead letters: list, show, redrive (as the admin).
    Dlq(DlqArgs),
    /// One run's events, per-phase durations and trace id (as the monitor).
    Job(JobArgs),
    /// Usage reports from accounting's report API (gRPC).
    Accounting(accounting::AccountingArgs),
    /// The VMs in the events stream: run, host, state, age, image, resources (as the monitor).
    Vms(VmsArgs),
    /// Every service's last heartbeat, by host: state, readiness, version (as the monitor).
    Hosts(HostsArgs),
    /// Ask hosts' image services to fetch an image into their caches now, with progress (as
    /// the admin).
    Prefetch(PrefetchArgs),
}

#[derive(Debug, clap::Args)]
struct HostsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Only this host's services.
    #[arg(long)]
    host: Option<String>,
    /// Exit 1 when any service shown is stale, stopped or not ready.
    #[arg(long)]
    check: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct PrefetchArgs {
    #[command(flatten)]
    connection: Connection,
    /// The image's catalog name.
    #[arg(long)]
    image: String,
    /// The hosts, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "site")]
    hosts: Option<Vec<String>>,
    /// Every host of this site description.
    #[arg(long)]
    site: Option<PathBuf>,
    /// How long to wait for each host to finish.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// A host whose image service does not answer within this long has none running.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    answer_within: std::time::Duration,
    /// One JSON array (one object per host) on stdout instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct VmsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Only this host's VMs.
    #[arg(long)]
    host: Option<String>,
    /// Also the VMs that stopped or failed (within the stream's retention).
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct JobArgs {
    #[command(flatten)]
    connection: Connection,
    /// The run key, as the job starter and the demo print it: SITE/lrms/JOB/ATTEMPT.
    run: String,
    /// Only this host's events (faster on a busy stream).
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    json: bool,
}

/// Where NATS is and whose credentials to use.
#[derive(Debug, clap::Args)]
struct Connection {
    /// The NATS server.
    #[arg(long)]
    nats: String,
    /// The creds file (`<out>/creds/admin.creds`; `monitor.creds` is enough to read).
    #[arg(long)]
    creds: PathBuf,
    /// PEM CA that signed the NATS servers' certificate (a `tls://` URL with a private CA).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

/// The `[nats] tls` of `--tls-ca`.
fn tls_of(ca: Option<&PathBuf>) -> Option<wnodes_bus::TlsConfig> {
    ca.map(|ca| wnodes_bus::TlsConfig {
        ca_file: Some(ca.clone()),
        ..Default::default()
    })
}

impl Connection {
    /// A bus on this connection named `name`; on failure the message is printed and the
    /// exit code returned.
    async fn bus(&self, name: &str) -> Result<wnodes_bus::Bus, u8> {
        wnodes_bus::connect::install_crypto_provider();
        let cfg = wnodes_bus::NatsConfig {
            url: self.nats.clone(),
            creds_file: Some(self.creds.clone()),
            tls: tls_of(self.tls_ca.as_ref()),
            ..Default::default()
        };
        wnodes_bus::Bus::connect(&cfg, name, wnodes_bus::BusMetrics::unregistered())
            .await
            .map_err(|e| {
                eprintln!("wnodesctl: {}", wnodes_bus::ErrorChain(&e));
                UNAVAILABLE
            })
    }
}

#[derive(Debug, clap::Args)]
struct DlqArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead letter (of one consumer with `--consumer`).
    List {
        #[arg(long)]
        consumer: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, its headers and its event.
    Show {
        sequence: u64,
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again to their original subjects, then delete them.
    Redrive {
        /// Dead-letter sequences (from `list`).
        sequences: Vec<u64>,
        /// Every dead letter (of `--consumer`).
        #[arg(long, conflicts_with = "sequences")]
        all: bool,
        #[arg(long, requires = "all")]
        consumer: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, clap::Args)]
struct BacklogArgs {
    #[command(flatten)]
    connection: Connection,
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
    /// PEM CA that signed the NATS servers' certificate (a `tls://` URL with a private CA).
    #[arg(long, requires = "nats")]
    tls_ca: Option<PathBuf>,
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
const USAGE: u8 = 64;

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
            Command::Provision(args) => provision::provision(args).await,
            Command::Backlog(args) => backlog::backlog(args).await,
            Command::Dlq(args) => dlq::dlq(args).await,
            Command::Job(args) => job::job(args).await,
            Command::Accounting(args) => accounting::accounting(args).await,
            Command::Vms(args) => vms::vms(args).await,
            Command::Hosts(args) => hosts::hosts(args).await,
            Command::Prefetch(args) => prefetch::prefetch(args).await,
        }
    });
    ExitCode::from(code)
}
