//! WNoDeS benchmarks. Each prints progress on stderr and one JSON summary as its last stdout
//! line.
//!
//! - `bus`: N persisted messages published and consumed through the bus library (handler API:
//!   idempotency keys stored, a span per message, exporter off) and, in the same run, through
//!   raw async-nats JetStream calls with the same payload size, N and in-flight window (and
//!   with only the bus's two headers: the ceiling).
//! - `keys`: the idempotency key store's group commit alone.
//! - `bridge`: a large generated HTCondor log replayed into JetStream through `wnodes-lrms`, vs
//!   the same events pre-built and published raw with the bus's two headers (`bridge.rs`).
//! - `vm-start`: one job through WNoDeS vs the same guest under a bare qemu.
//! - `accounting`: usage events through NATS into SQLite and PostgreSQL by the accounting
//!   consumer, vs raw JetStream consume+ack and a batched INSERT into each store
//!   (`accounting.rs`).
//! - `gateway`: a file read and written through the WNoDeS sftp gateway vs sshfs to
//!   `sftp-server` behind a plain `socat` (the paper's fastest option), from a client network
//!   namespace, and through the NFS gateway from the test guest (`gateway.rs`).

use clap::{Parser, Subcommand};

mod accounting;
mod bridge;
mod bus;
mod gateway;
mod vm_start;

#[derive(Parser, Debug)]
#[command(about = "WNoDeS benchmarks (JSON summary on the last line)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bus library vs raw JetStream: publish + consume N persisted messages.
    Bus {
        #[arg(long, default_value_t = 20_000)]
        n: usize,
        /// Approximate payload size in bytes (the encoded event; raw uses the same bytes).
        #[arg(long, default_value_t = 512)]
        payload: usize,
        /// In-flight window for publishing and consuming.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Rounds (alternating raw, bus); medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The idempotency key store alone: N keys recorded by `--concurrency` tasks at once.
    Keys {
        #[arg(long, default_value_t = 20_000)]
        n: usize,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A job through WNoDeS vs the same guest under a bare qemu (needs root).
    VmStart(vm_start::VmStartArgs),
    /// A file through the WNoDeS sftp gateway vs sshfs over socat, and through the NFS
    /// gateway from a guest (needs root).
    Gateway(gateway::GatewayArgs),
    /// An HTCondor log replayed into JetStream through wnodes-lrms vs the same events raw.
    Bridge(bridge::BridgeArgs),
    /// Usage events into SQLite and PostgreSQL through the accounting consumer vs raw
    /// JetStream consume+ack and a batched INSERT.
    Accounting {
        /// Job runs (records); two events each.
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// In-flight window: the accounting consumer's batch (`[consumer] max_batch`, whose
        /// default this is), the raw consumer's pull and the publisher's.
        #[arg(long, default_value_t = wnodes_bus::ConsumerTuning::default().max_batch)]
        window: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// A PostgreSQL server to use (`postgres://…`; a database is created per round)
        /// instead of a private cluster started for the run.
        #[arg(long)]
        postgres: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Bus {
                n,
                payload,
                window,
                rounds,
            } => bus::bench_bus(n, payload, window, rounds.max(1)).await,
            Cmd::Keys {
                n,
                concurrency,
                rounds,
            } => bus::bench_keys(n, concurrency.max(1), rounds.max(1)).await,
            // Runs on its own thread and runtime inside a private network namespace.
            Cmd::VmStart(args) => vm_start::run(args),
            // Runs on its own thread and runtime inside a private network namespace.
            Cmd::Gateway(args) => gateway::run(args),
            Cmd::Bridge(args) => bridge::run(args).await,
            Cmd::Accounting {
                n,
                window,
                rounds,
                postgres,
            } => accounting::bench_accounting(n, window.max(1), rounds.max(1), postgres).await,
        }
    })
}
