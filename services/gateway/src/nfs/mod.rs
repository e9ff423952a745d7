//! The NFS gateway: each VM's export as an NFSv4 export to the VM's address only, every access
//! squashed to the job's uid/gid, on a per-host NFS server.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[gateway.nfs]` section |
//! | [`ganesha`] | nfs-ganesha (userspace): the daemon and its private `dbus-daemon`, exports added and removed at run time through its D-Bus export manager |
//! | [`exportfs`] | the kernel NFS server through `exportfs` (sites with nfsd) and the parser of `exportfs -v` |
//!
//! One [`NfsExport`] per VM, under an id from the configured range (ganesha's `Export_Id`,
//! the kernel's `fsid`), kept in the VM's row so that a redelivered `network.ready` and the
//! start-up reconciliation find it again. Adding is idempotent (an export already there with
//! the same id and path is left), removing an absent export is not an error, and
//! [`NfsServer::list`] returns what the server holds in the id range, for reconciliation.

pub mod config;
pub mod exportfs;
pub mod ganesha;

use std::{net::IpAddr, path::PathBuf};

pub use config::{NfsBackend, NfsConfig};

/// One VM's NFS export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsExport {
    /// Ganesha's `Export_Id`, the kernel's `fsid`.
    pub id: u16,
    pub vm_id: String,
    /// The export's directory, symlinks resolved (checked against the export roots).
    pub path: PathBuf,
    /// The only client address allowed.
    pub client: IpAddr,
    /// Every access is squashed to this uid/gid.
    pub uid: u32,
    pub gid: u32,
    pub read_only: bool,
}

/// An export the server holds (in the gateway's id range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub id: u16,
    pub path: PathBuf,
    /// The client address (kernel exports; ganesha's ShowExports does not report it:
    /// [`NfsServer::clients`] asks it per export).
    pub client: Option<String>,
}

/// Why the NFS server did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {action} failed ({status}): {stderr}")]
    Command {
        program: String,
        action: String,
        status: String,
        stderr: String,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Daemon(String),
    #[error(
        "export path {path:?} has a character an NFS export cannot carry (whitespace, quote, backslash or control character)"
    )]
    PathChars { path: PathBuf },
    #[error(
        "VM id {vm_id:?} cannot name an NFS export (its pseudo path is <pseudo_root>/<vm id>): it must be one name of [A-Za-z0-9._-]"
    )]
    VmId { vm_id: String },
}

/// The host's NFS server.
#[derive(Debug)]
pub enum NfsServer {
    Ganesha(Box<ganesha::Ganesha>),
    Exportfs(exportfs::Exportfs),
}

impl NfsServer {
    /// Starts (or connects to) the configured server.
    pub async fn start(cfg: &NfsConfig) -> Result<Self, NfsError> {
        Ok(match cfg.backend {
            NfsBackend::Ganesha => Self::Ganesha(Box::new(ganesha::Ganesha::start(cfg).await?)),
            NfsBackend::Exportfs => Self::Exportfs(exportfs::Exportfs::new(cfg)),
        })
    }

    /// Exports `e` (idempotent).
    pub async fn add(&self, e: &NfsExport) -> Result<(), NfsError> {
        check_path(&e.path)?;
        check_vm_id(&e.vm_id)?;
        match self {
            Self::Ganesha(g) => g.add(e).await,
            Self::Exportfs(k) => k.add(e).await,
        }
    }

    /// Withdraws the export `id` of `path` (absent: nothing to do).
    pub async fn remove(&self, id: u16, path: &std::path::Path) -> Result<(), NfsError> {
        match self {
            Self::Ganesha(g) => g.remove(id).await,
            Self::Exportfs(k) => k.remove(id, path).await,
        }
    }

    /// The exports the server holds whose id lies in the gateway's range.
    pub async fn list(&self) -> Result<Vec<Present>, NfsError> {
        match self {
            Self::Ganesha(g) => g.list().await,
            Self::Exportfs(k) => k.list().await,
        }
    }

    /// The clients the server serves export `id` to, as it reports them (ganesha only; the
    /// kernel's table is read by [`Self::list`]).
    pub async fn clients(&self, id: u16) -> Result<Vec<String>, NfsError> {
        match self {
            Self::Ganesha(g) => g.clients(id).await,
            Self::Exportfs(k) => Ok(k
                .list()
                .await?
                .into_iter()
                .filter(|p| p.id == id)
                .filter_map(|p| p.client)
                .collect()),
        }
    }

    /// The path the guest mounts: ganesha's pseudo path, the kernel's real path.
    pub fn remote_path(&self, e: &NfsExport) -> String {
        match self {
            Self::Ganesha(g) => g.pseudo_path(&e.vm_id),
            Self::Exportfs(_) => e.path.display().to_string(),
        }
    }

    /// Stops a daemon this gateway runs (ganesha with `manage = true`).
    pub async fn stop(&self) {
        if let Self::Ganesha(g) = self {
            g.stop().await;
        }
    }
}

/// Refuses a path an export definition cannot carry safely: ganesha's config quotes it and
/// `exportfs -v` separates by whitespace.
pub fn check_path(path: &std::path::Path) -> Result<(), NfsError> {
    let bad = match path.to_str() {
        None => true,
        Some(s) => s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\'),
    };
    if bad {
        return Err(NfsError::PathChars {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Refuses a VM id that cannot name an export: ganesha's export definition quotes its pseudo
/// path `<pseudo_root>/<vm id>`, which must stay one name below the pseudo root.
pub fn check_vm_id(vm_id: &str) -> Result<(), NfsError> {
    if config::is_name(vm_id) {
        Ok(())
    } else {
        Err(NfsError::VmId {
            vm_id: vm_id.to_owned(),
        })
    }
}

/// Runs `program args…` and returns its stdout; a failure names the action and carries stderr.
pub(crate) async fn run(
    program: &std::path::Path,
    args: &[String],
    env: &[(&str, &str)],
    action: &str,
) -> Result<String, NfsError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.map_err(|source| NfsError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    if !out.status.success() {
        return Err(NfsError::Command {
            program: program.display().to_string(),
            action: action.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_paths_that_cannot_be_carried_are_refused() {
        assert!(check_path(std::path::Path::new("/srv/gpfs/home/alice")).is_ok());
        for bad in [
            "/srv/a b",
            "/srv/a\"b",
            "/srv/a\\b",
            "/srv/a\nb",
            "/srv/a\tb",
        ] {
            assert!(check_path(std::path::Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vm_ids_that_cannot_name_an_export_are_refused() {
        assert!(check_vm_id("vm-0123456789ab").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "vm-1/..",
            "vm-1\"; Squash = None",
            "vm-1\nEXPORT",
            "vm 1",
        ] {
            assert!(check_vm_id(bad).is_err(), "{bad:?}");
        }
    }
}
