//! The SSM outgoing queue: the `dirq` `QueueSimple` layout that `ssmsend` reads.
//!
//! `QueueSimple` (PyPI `dirq`) keeps each element in a file `<dir>/<elt>` under the queue's
//! root: `<dir>` is 8 hex digits, the insertion time in epoch seconds rounded down to the
//! granularity (60 s by default); `<elt>` is 14 hex digits, seconds (8), microseconds (5) and
//! one digit against collisions. Readers list only names matching those patterns, so a file
//! being written is never read: `QueueSimple.add` writes `<dir>/<elt>.tmp` then links it to
//! its final name; `add_path` moves a file from elsewhere on the same filesystem into place.
//!
//! [`OutgoingQueue`] does what `add_path` does, in two steps a caller can record between:
//! [`stage`](OutgoingQueue::stage) writes and syncs the message under `<root>/.wnodes-staging/`
//! (a name no reader lists and `QueueSimple.purge` does not clean), then
//! [`commit`](OutgoingQueue::commit) renames it into `<dir>/<elt>` with `RENAME_NOREPLACE`
//! (never over an element; a taken name is retried) and syncs both directories. A staged file
//! therefore exists exactly until its message is in the queue: after a crash, "is it still
//! staged?" tells whether the message was queued, even once `ssmsend` has sent and removed it.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use nix::fcntl::{RenameFlags, renameat2};

use crate::ApelError;

/// Where messages wait, under the queue's root, before they are moved into the queue.
pub const STAGING_DIR: &str = ".wnodes-staging";
/// `QueueSimple`'s default granularity of intermediate directories, in seconds.
pub const GRANULARITY_S: u64 = 60;
const STAGED_SUFFIX: &str = ".tmp";

/// An SSM outgoing queue directory.
#[derive(Debug, Clone)]
pub struct OutgoingQueue {
    root: PathBuf,
    staging: PathBuf,
    rndhex: u32,
}

fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_micros())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True for a name [`OutgoingQueue::stage`] gives (`<14 hex>.tmp`).
pub fn is_staged_name(name: &str) -> bool {
    name.strip_suffix(STAGED_SUFFIX)
        .is_some_and(|n| is_hex(n, 14))
}

impl OutgoingQueue {
    /// Opens (creating when missing) the queue at `root`, by its canonical path.
    ///
    /// # Errors
    /// [`ApelError::Queue`] when a directory cannot be created.
    pub fn open(root: &Path) -> Result<Self, ApelError> {
        let staging = root.join(STAGING_DIR);
        fs::create_dir_all(&staging).map_err(|e| ApelError::queue("create", &staging, e))?;
        let root = fs::canonicalize(root).map_err(|e| ApelError::queue("resolve", root, e))?;
        let staging = root.join(STAGING_DIR);
        Ok(Self {
            root,
            staging,
            rndhex: std::process::id() % 16,
        })
    }

    /// The queue's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn name(&self) -> String {
        let (secs, micros) = now();
        format!("{secs:08x}{micros:05x}{:01x}", self.rndhex)
    }

    /// Writes `data` to a new staged file, synced to disk, and returns its name. The message
    /// is not in the queue yet.
    ///
    /// # Errors
    /// [`ApelError::Queue`] when the file cannot be written.
    pub fn stage(&self, data: &[u8]) -> Result<String, ApelError> {
        loop {
            let name = format!("{}{STAGED_SUFFIX}", self.name());
            let path = self.staging.join(&name);
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ApelError::queue("create", &path, e)),
            };
            f.write_all(data)
                .and_then(|()| f.sync_all())
                .map_err(|e| ApelError::queue("write", &path, e))?;
            sync_dir(&self.staging)?;
            return Ok(name);
        }
    }

    fn staged_path(&self, name: &str) -> Result<PathBuf, ApelError> {
        if !is_staged_name(name) {
            return Err(ApelError::queue(
                "use staged name",
                &self.staging.join(name),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a staged name"),
            ));
        }
        Ok(self.staging.join(name))
    }

    /// True while the staged file `name` has not been moved into the queue.
    ///
    /// # Errors
    /// [`ApelError::Queue`] for a name [`stage`](Self::stage) never gives, or an unreadable
    /// staging directory.
    pub fn is_staged(&self, name: &str) -> Result<bool, ApelError> {
        let path = self.staged_path(name)?;
        path.try_exists()
            .map_err(|e| ApelError::queue("look for", &path, e))
    }

    /// The staged files' names, sorted.
    ///
    /// # Errors
    /// [`ApelError::Queue`] when the staging directory cannot be listed.
    pub fn staged(&self) -> Result<Vec<String>, ApelError> {
        let mut out = Vec::new();
        let rd =
            fs::read_dir(&self.staging).map_err(|e| ApelError::queue("list", &self.staging, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| ApelError::queue("list", &self.staging, e))?;
            if let Some(n) = entry.file_name().to_str()
                && is_staged_name(n)
            {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the staged file `name` (nothing when it is gone).
    ///
    /// # Errors
    /// [`ApelError::Queue`] when it cannot be removed.
    pub fn discard(&self, name: &str) -> Result<(), ApelError> {
        let path = self.staged_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.staging),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ApelError::queue("remove", &path, e)),
        }
    }

    /// Moves the staged file `name` into the queue and returns the element's name
    /// (`<dir>/<elt>`, as `QueueSimple` names it). Never replaces an element.
    ///
    /// # Errors
    /// [`ApelError::Queue`] when the file cannot be moved (then it stays staged).
    pub fn commit(&self, name: &str) -> Result<String, ApelError> {
        let from = self.staged_path(name)?;
        let (secs, _) = now();
        let dir = format!("{:08x}", secs - secs % GRANULARITY_S);
        let dir_path = self.root.join(&dir);
        match fs::create_dir(&dir_path) {
            Ok(()) => sync_dir(&self.root)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ApelError::queue("create", &dir_path, e)),
        }
        let staging =
            File::open(&self.staging).map_err(|e| ApelError::queue("open", &self.staging, e))?;
        let target = File::open(&dir_path).map_err(|e| ApelError::queue("open", &dir_path, e))?;
        loop {
            let elt = self.name();
            match renameat2(
                &staging,
                name,
                &target,
                elt.as_str(),
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {
                    target
                        .sync_all()
                        .map_err(|e| ApelError::queue("sync", &dir_path, e))?;
                    staging
                        .sync_all()
                        .map_err(|e| ApelError::queue("sync", &self.staging, e))?;
                    return Ok(format!("{dir}/{elt}"));
                }
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => return Err(ApelError::queue("move into the queue", &from, e.into())),
            }
        }
    }

    /// The queue's elements (`<dir>/<elt>`), sorted as `QueueSimple` iterates them.
    ///
    /// # Errors
    /// [`ApelError::Queue`] when a directory cannot be listed.
    pub fn elements(&self) -> Result<Vec<String>, ApelError> {
        let mut out = Vec::new();
        let mut dirs = Vec::new();
        for entry in
            fs::read_dir(&self.root).map_err(|e| ApelError::queue("list", &self.root, e))?
        {
            let entry = entry.map_err(|e| ApelError::queue("list", &self.root, e))?;
            if let Some(n) = entry.file_name().to_str()
                && is_hex(n, 8)
            {
                dirs.push(n.to_string());
            }
        }
        dirs.sort();
        for d in dirs {
            let path = self.root.join(&d);
            let mut elts = Vec::new();
            for entry in fs::read_dir(&path).map_err(|e| ApelError::queue("list", &path, e))? {
                let entry = entry.map_err(|e| ApelError::queue("list", &path, e))?;
                if let Some(n) = entry.file_name().to_str()
                    && is_hex(n, 14)
                {
                    elts.push(format!("{d}/{n}"));
                }
            }
            elts.sort();
            out.extend(elts);
        }
        Ok(out)
    }
}

fn sync_dir(dir: &Path) -> Result<(), ApelError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ApelError::queue("sync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_message_is_outside_the_queue_until_committed_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let q = OutgoingQueue::open(dir.path()).unwrap();
        let a = q.stage(b"one").unwrap();
        let b = q.stage(b"two").unwrap();
        assert_ne!(a, b);
        assert!(q.elements().unwrap().is_empty());
        assert!(q.is_staged(&a).unwrap());
        let ea = q.commit(&a).unwrap();
        let eb = q.commit(&b).unwrap();
        assert_ne!(ea, eb);
        assert!(!q.is_staged(&a).unwrap());
        assert_eq!(q.elements().unwrap().len(), 2);
        assert_eq!(fs::read(dir.path().join(&ea)).unwrap(), b"one");
        assert_eq!(fs::read(dir.path().join(&eb)).unwrap(), b"two");
        assert!(q.commit(&a).is_err(), "a committed name is gone");
        assert!(q.is_staged("../../etc/passwd").is_err());
    }
}
