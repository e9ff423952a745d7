//! The runs whose job starter is connected, kept in `<state_dir>/runs/` so that an agent that
//! restarts cancels them: their starters lost the connection with the agent's old process, and
//! nobody would otherwise stop their VMs before their walltime (`docs/host-agent.md`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wnodes_bus::proto;

/// One live run, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRun {
    pub site: String,
    pub lrms: i32,
    pub job_id: String,
    pub run_attempt: u32,
    pub host: String,
}

impl LiveRun {
    pub fn new(run: &proto::JobRunRef, host: &str) -> Self {
        Self {
            site: run.site.clone(),
            lrms: run.lrms,
            job_id: run.job_id.clone(),
            run_attempt: run.run_attempt,
            host: host.to_owned(),
        }
    }

    pub fn run(&self) -> proto::JobRunRef {
        proto::JobRunRef {
            site: self.site.clone(),
            lrms: self.lrms,
            job_id: self.job_id.clone(),
            run_attempt: self.run_attempt,
        }
    }
}

/// The directory of live runs.
#[derive(Debug, Clone)]
pub struct Runs {
    dir: PathBuf,
}

/// A file name for a run key (`/` and anything unusual become `_`, plus a hash of the key so
/// that two keys never share one).
fn file_name(key: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    format!("{safe}-{:016x}.json", h.finish())
}

impl Runs {
    /// `dir`, created if missing.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Records `run` as live (written to a temporary file, synced, renamed).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn record(&self, key: &str, run: &LiveRun) -> std::io::Result<()> {
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(run).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    }

    /// Forgets `key` (its job starter is done with it).
    pub fn forget(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }

    /// The runs recorded by an earlier process, with their files. Unreadable files are
    /// returned as errors naming them (the caller logs and removes them).
    pub fn left_over(&self) -> std::io::Result<Vec<(PathBuf, Result<LiveRun, String>)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<LiveRun>(&b).map_err(|e| e.to_string()));
            out.push((path, parsed));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_runs_survive_a_restart_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let runs = Runs::open(&dir.path().join("runs")).unwrap();
        let run = proto::JobRunRef {
            site: "T1".into(),
            lrms: proto::Lrms::Slurm as i32,
            job_id: "42".into(),
            run_attempt: 2,
        };
        let live = LiveRun::new(&run, "h1");
        runs.record("T1/slurm/42/2", &live).unwrap();
        runs.record("T1/slurm/43/1", &LiveRun::new(&run, "h1"))
            .unwrap();
        std::fs::write(dir.path().join("runs/garbage.json"), b"{").unwrap();
        let again = Runs::open(&dir.path().join("runs")).unwrap();
        let left = again.left_over().unwrap();
        assert_eq!(left.len(), 3);
        assert!(
            left.iter()
                .any(|(_, r)| r.as_ref().is_ok_and(|r| r.run() == run))
        );
        assert_eq!(left.iter().filter(|(_, r)| r.is_err()).count(), 1);
        again.forget("T1/slurm/42/2");
        again.forget("T1/slurm/43/1");
        assert_eq!(again.left_over().unwrap().len(), 1);
        assert_ne!(file_name("a/b"), file_name("a_b"));
    }
}
