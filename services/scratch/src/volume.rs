//! The `file` backend: one sparse raw file per VM, `<dir>/<vm_id>.img`, formatted as ext4
//! without mounting it (`mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 <file>`).
//!
//! A volume is built under a temporary name (`.<vm_id>.img.partial`), fsynced and renamed into
//! place, so a file with the final name is always complete; partial files are removed at start.

use std::{
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Stdio,
};

use sha2::{Digest, Sha256};

/// Why a volume operation failed. The `Display` text never repeats the `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program}")]
    MkfsSpawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed on {path} ({status}): {stderr}")]
    Mkfs {
        program: String,
        path: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run {program}")]
    Run {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read the report of {command}: {problem}")]
    Report { command: String, problem: String },
    #[error("{name:?} cannot name a {what}")]
    BadName { what: &'static str, name: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError + use<> {
    let path = path.display().to_string();
    move |source| VolumeError::Io { op, path, source }
}

/// Whether `vm_id` can name host resources: `vm-` followed by 1 to 61 of `[a-z0-9-]`.
pub fn is_valid_vm_id(vm_id: &str) -> bool {
    vm_id.strip_prefix("vm-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 61
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

/// The VM id the launcher derives from a run key: `vm-` + the first 12 hex digits of its
/// sha256 (used when an event does not carry one).
pub fn derive_vm_id(run_key: &str) -> String {
    let hex = hex::encode(Sha256::digest(run_key.as_bytes()));
    format!("vm-{}", hex.get(..12).unwrap_or_default())
}

/// Free space of the volume directory's file system, and how much of it the sparse volumes
/// already there may still claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub available: u64,
    pub promised: u64,
}

impl Space {
    /// What a new volume may take.
    pub fn unpromised(self) -> u64 {
        self.available.saturating_sub(self.promised)
    }
}

/// The file backend rooted at one directory.
#[derive(Debug, Clone)]
pub struct FileBackend {
    dir: PathBuf,
    mkfs: Option<PathBuf>,
}

impl FileBackend {
    /// Uses `dir` (created if needed); `mkfs` is the program that formats new volumes, `None`
    /// to leave them unformatted.
    pub fn new(dir: PathBuf, mkfs: Option<PathBuf>) -> Result<Self, VolumeError> {
        std::fs::create_dir_all(&dir).map_err(io_err("create the volume directory", &dir))?;
        Ok(Self { dir, mkfs })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/<vm_id>.img`.
    pub fn path_of(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.img"))
    }

    fn partial_of(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!(".{vm_id}.img.partial"))
    }

    /// The size of the VM's volume file, `None` when there is none.
    pub async fn size_of(&self, vm_id: &str) -> Result<Option<u64>, VolumeError> {
        let path = self.path_of(vm_id);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("inspect", &path)(e)),
        }
    }

    /// What the volume directory's file system can still back: its space available to
    /// unprivileged writers less what the volumes already there may still claim (each a
    /// sparse file: its size less the blocks it holds). A new volume larger than this could
    /// fail its VM's writes with ENOSPC later, so it is refused now.
    pub async fn space(&self) -> Result<Space, VolumeError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<Space, VolumeError> {
            let fs = nix::sys::statvfs::statvfs(&dir)
                .map_err(|e| io_err("measure the file system of", &dir)(e.into()))?;
            let available = fs.blocks_available() * fs.fragment_size();
            let mut promised = 0u64;
            for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))? {
                let entry = entry.map_err(io_err("list", &dir))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !name.ends_with(".img") || name.starts_with('.') {
                    continue;
                }
                let Ok(m) = entry.metadata() else { continue };
                promised += m.len().saturating_sub(m.blocks() * 512);
            }
            Ok(Space {
                available,
                promised,
            })
        })
        .await
        .map_err(|e| io_err("measure", &self.dir)(io::Error::other(e)))?
    }

    /// Creates the VM's volume: a sparse file of `size_bytes`, formatted, renamed into place.
    /// Replaces whatever file had the name before.
    pub async fn create(&self, vm_id: &str, size_bytes: u64) -> Result<PathBuf, VolumeError> {
        let partial = self.partial_of(vm_id);
        let res = self.build(&partial, size_bytes).await;
        if res.is_err() {
            remove_if_present(&partial).await?;
        }
        res?;
        let path = self.path_of(vm_id);
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(io_err("rename into place", &path))?;
        self.sync_dir().await?;
        Ok(path)
    }

    async fn build(&self, partial: &Path, size_bytes: u64) -> Result<(), VolumeError> {
        remove_if_present(partial).await?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o660)
            .open(partial)
            .map_err(io_err("create", partial))?;
        let file = tokio::fs::File::from_std(file);
        file.set_len(size_bytes)
            .await
            .map_err(io_err("size", partial))?;
        if let Some(program) = &self.mkfs {
            run_mkfs(program, partial).await?;
        }
        file.sync_all().await.map_err(io_err("fsync", partial))?;
        Ok(())
    }

    /// Removes the VM's volume (and any partial one). Returns whether a volume file existed.
    pub async fn remove(&self, vm_id: &str) -> Result<bool, VolumeError> {
        remove_if_present(&self.partial_of(vm_id)).await?;
        let removed = remove_if_present(&self.path_of(vm_id)).await?;
        if removed {
            self.sync_dir().await?;
        }
        Ok(removed)
    }

    /// The VM ids of every `vm-*.img` file in the directory.
    pub async fn list(&self) -> Result<Vec<String>, VolumeError> {
        Ok(self
            .names()
            .await?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".img").map(str::to_owned))
            .filter(|id| is_valid_vm_id(id))
            .collect())
    }

    /// Removes partial volumes a crash left behind; returns how many. Only call while no
    /// volume is being created.
    pub async fn remove_partials(&self) -> Result<usize, VolumeError> {
        let mut n = 0;
        for name in self.names().await? {
            if name.starts_with(".vm-") && name.ends_with(".img.partial") {
                let path = self.dir.join(&name);
                remove_if_present(&path).await?;
                tracing::info!(path = %path.display(), "Removed a partial scratch volume.");
                n += 1;
            }
        }
        Ok(n)
    }

    async fn names(&self) -> Result<Vec<String>, VolumeError> {
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(io_err("list", &self.dir))?;
        let mut names = Vec::new();
        while let Some(e) = rd.next_entry().await.map_err(io_err("list", &self.dir))? {
            if let Some(name) = e.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    async fn sync_dir(&self) -> Result<(), VolumeError> {
        let dir = tokio::fs::File::open(&self.dir)
            .await
            .map_err(io_err("open", &self.dir))?;
        dir.sync_all().await.map_err(io_err("fsync", &self.dir))
    }
}

/// Formats `path` as ext4 with `program` (`-q -F -E lazy_itable_init=1,lazy_journal_init=1`).
pub(crate) async fn run_mkfs(program: &Path, path: &Path) -> Result<(), VolumeError> {
    let out = tokio::process::Command::new(program)
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| VolumeError::MkfsSpawn {
            program: program.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(VolumeError::Mkfs {
            program: program.display().to_string(),
            path: path.display().to_string(),
            status: out.status.to_string(),
            stderr: stderr.trim().chars().take(500).collect(),
        });
    }
    Ok(())
}

async fn remove_if_present(path: &Path) -> Result<bool, VolumeError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_checked_and_derived_like_the_launcher() {
        assert!(is_valid_vm_id("vm-3f2a00112233"));
        for bad in ["", "vm-", "vm-../x", "vm-A", "x-1", "vm-a/b", "vm-a.img"] {
            assert!(!is_valid_vm_id(bad), "{bad:?}");
        }
        let id = derive_vm_id("T1/htcondor/1.0/1");
        assert_eq!(id.len(), 15);
        assert!(is_valid_vm_id(&id));
    }

    #[tokio::test]
    async fn create_is_sparse_formatted_and_remove_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let b = FileBackend::new(tmp.path().join("v"), Some("mkfs.ext4".into())).unwrap();
        let path = b.create("vm-abc", 64 << 20).await.unwrap();
        assert_eq!(path, tmp.path().join("v/vm-abc.img"));
        assert_eq!(b.size_of("vm-abc").await.unwrap(), Some(64 << 20));
        // ext4 superblock magic 0xEF53 at byte 1024 + 56.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1080..1082], &[0x53, 0xef]);
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated < 32 << 20,
            "not sparse: {allocated} bytes allocated"
        );
        assert_eq!(b.list().await.unwrap(), vec!["vm-abc".to_owned()]);
        assert!(b.remove("vm-abc").await.unwrap());
        assert!(!b.remove("vm-abc").await.unwrap());
        assert_eq!(b.size_of("vm-abc").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_failing_mkfs_leaves_no_file_and_names_the_program() {
        let tmp = tempfile::tempdir().unwrap();
        let b = FileBackend::new(tmp.path().to_owned(), Some("/bin/false".into())).unwrap();
        let e = b.create("vm-abc", 1 << 20).await.unwrap_err().to_string();
        assert!(e.contains("/bin/false"), "{e}");
        assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
    }
}
