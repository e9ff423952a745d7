//! WNoDeS storage gateway: serves each VM's export over SFTP on plain TCP (the guest mounts it
//! with `sshfs -o directport=`), from a listener that accepts only the VM's address and runs
//! `sftp-server` as the job's uid/gid, never as root.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[gateway]` section, the port range |
//! | [`listener`] | per-VM in-process listeners and their `sftp-server` sessions |
//! | [`table`] | the per-VM table: spec, serving listener, tombstones |
//! | [`service`] | the handler, start-up reconciliation (re-opening listeners), `run` |
//!
//! ```toml
//! [gateway]
//! sftp_server = "/usr/lib/openssh/sftp-server"
//! setpriv = "/usr/bin/setpriv"
//! # bind_address = "10.231.1.1"   # default: network.ready's gateway; 127.0.0.1 in user mode
//! port_range = "20000-20999"
//! ```
//!
//! What a VM gets: one export (`spec.exports`, at most one), served from `network.ready`'s
//! gateway address to the VM's address only (user-mode networking: to 127.0.0.1, which any local
//! process shares). The owner must be a non-root uid/gid with a passwd entry on the host
//! (`sftp-server` refuses others). `sftp-server -d` only sets the start directory: it has no
//! chroot, so the guest can reach whatever the job's uid can reach on the host, as a job run on
//! the host itself could.

pub mod config;
#[cfg(test)]
mod error_rule;
pub mod listener;
pub mod service;
pub mod table;

pub use config::GatewayConfig;
pub use service::{GatewayHandler, run};
