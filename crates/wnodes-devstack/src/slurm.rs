//! Jobs through a real Slurm (`docs/slurm.md`): [`Stack::sbatch`] submits a batch script with
//! `sbatch` to the cluster `SLURM_CONF` names (`scripts/slurm-cluster.sh`), whose
//! `job_submit.lua` hands it to the WNoDeS job starter; [`sacct_final`] waits for `sacct`'s final
//! state. Used by `wnodes-dev demo --slurm` (`scripts/demo.sh slurm`) and
//! `integration-tests/tests/slurm.rs`.
//!
//! slurmd runs jobs in the host's network namespace: the stack must run there too
//! ([`crate::NetworkChoice::User`]), with its host agent ([`crate::StackOptions::host_agent`]):
//! the job's environment names only the agent's socket (`WNODES_AGENT__SOCKET`). The job's user
//! gets no NATS credentials and no WNoDeS configuration.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::Stack;

/// A submitted Slurm job.
#[derive(Debug, Clone)]
pub struct SlurmJob {
    /// Slurm's job id.
    pub id: String,
    /// Its output file (stdout and stderr: the job starter's progress and the payload's output).
    pub output: PathBuf,
    /// Its run key: `<site>/slurm/<id>/1`.
    pub run_key: String,
}

/// `sacct`'s states of a job that has not ended yet (an empty state: not in slurmdbd yet).
const NOT_FINAL: [&str; 5] = ["PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING"];

/// Runs `c` (a Slurm client, say): whether it succeeded, and its stdout then stderr.
pub fn output(c: &mut Command) -> (bool, String) {
    match c.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("{c:?}: {e}")),
    }
}

impl Stack {
    /// Submits `script` (named `name` in `dir`) with `sbatch --account=<the stack's VO>` as the
    /// stack's job user (through `setpriv` when root), with the environment a user would have
    /// (`PATH` with the stack's binaries first, `SLURM_CONF` from this process) plus
    /// `WNODES_AGENT__SOCKET`, the stack's host agent. The output goes to `dir/slurm-<id>.out`.
    ///
    /// # Errors
    /// No host agent in the stack, `SLURM_CONF` unset, files that cannot be written, or
    /// `sbatch` failing (its message).
    pub fn sbatch(&self, dir: &Path, name: &str, script: &str) -> anyhow::Result<SlurmJob> {
        self.sbatch_with(dir, name, script, &[])
    }

    /// [`Stack::sbatch`] with more `sbatch` options (e.g. `--requeue`).
    ///
    /// # Errors
    /// As [`Stack::sbatch`].
    pub fn sbatch_with(
        &self,
        dir: &Path,
        name: &str,
        script: &str,
        options: &[&str],
    ) -> anyhow::Result<SlurmJob> {
        anyhow::ensure!(
            self.opts.host_agent,
            "the stack runs no host agent (StackOptions::host_agent): Slurm's job starters need it"
        );
        let conf = std::env::var("SLURM_CONF").context(
            "SLURM_CONF is not set (scripts/slurm-cluster.sh start; eval \"$(scripts/slurm-cluster.sh env)\")",
        )?;
        let (uid, gid) = (self.opts.job_uid, self.opts.job_gid);
        let root = crate::netns::is_root();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join(name);
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        if root {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", dir.display()))?;
        }
        let bin_path = format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin_dir.display());
        let mut c = if root {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "sbatch".into(),
            ]);
            c
        } else {
            Command::new("sbatch")
        };
        c.args([
            "--parsable",
            &format!("--account={}", self.opts.vo),
            "--chdir",
        ])
        .arg(dir)
        .arg(format!("--output={}/slurm-%j.out", dir.display()))
        .args(options)
        .arg(&path)
        .current_dir(dir)
        .env_clear()
        .env("PATH", bin_path)
        .env("HOME", "/nonexistent")
        .env("SLURM_CONF", conf)
        .env("WNODES_AGENT__SOCKET", self.agent_socket());
        let (ok, out) = output(&mut c);
        anyhow::ensure!(ok, "sbatch failed: {}", out.trim());
        let id = out.trim().split(';').next().unwrap_or_default().to_owned();
        anyhow::ensure!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
            "sbatch printed no job id: {}",
            out.trim()
        );
        Ok(SlurmJob {
            output: dir.join(format!("slurm-{id}.out")),
            run_key: format!("{}/slurm/{id}/1", self.opts.site),
            id,
        })
    }
}

/// The jobcomp spool file of the cluster `SLURM_CONF` names: `scripts/slurm-cluster.sh`
/// installs `slurm/wnodes-slurm-jobcomp` to write `<STATE_DIR>/spool/wnodes-jobcomp.log`
/// (`SLURM_CONF` is `<STATE_DIR>/etc/slurm.conf`); `None` without `SLURM_CONF`.
pub fn jobcomp_spool() -> Option<PathBuf> {
    let conf = PathBuf::from(std::env::var_os("SLURM_CONF")?);
    Some(conf.parent()?.parent()?.join("spool/wnodes-jobcomp.log"))
}

/// This machine's short host name: the Slurm node name `scripts/slurm-cluster.sh` gives the
/// node (`hostname -s`), and the WNoDeS host of a stack whose jobs Slurm runs, so that
/// Slurm's records of a job name the same host as its VM's events.
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().split('.').next().map(str::to_owned))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `sacct -X -n -P -j ID --format=JobID,State,ExitCode`.
///
/// # Errors
/// `sacct` failing.
pub fn sacct(id: &str) -> anyhow::Result<String> {
    let (ok, out) = output(Command::new("sacct").args([
        "-X",
        "-n",
        "-P",
        "-j",
        id,
        "--format=JobID,State,ExitCode",
    ]));
    anyhow::ensure!(ok, "sacct: {}", out.trim());
    Ok(out.trim().to_owned())
}

/// Waits (polling every 500 ms) until [`sacct`] shows a final state for `id`; returns that line,
/// e.g. `42|COMPLETED|0:0`.
///
/// # Errors
/// `sacct` failing, or no final state within `timeout` (the last line is named).
pub async fn sacct_final(id: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = sacct(id)?;
        let state = line.split('|').nth(1).unwrap_or_default();
        if !state.is_empty() && !NOT_FINAL.iter().any(|s| state.starts_with(s)) {
            return Ok(line);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no final state of Slurm job {id} in sacct within {timeout:?} (last: {line:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The exit code in a [`sacct`] line's `ExitCode` field (`3:0` → 3); `None` when killed by a
/// signal or unreadable.
pub fn exit_code(line: &str) -> Option<i32> {
    let (code, signal) = line.rsplit('|').next()?.split_once(':')?;
    (signal == "0").then(|| code.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_is_read_from_sacct_s_line() {
        assert_eq!(exit_code("42|COMPLETED|0:0"), Some(0));
        assert_eq!(exit_code("43|FAILED|3:0"), Some(3));
        assert_eq!(exit_code("44|CANCELLED by 0|0:15"), None);
        assert_eq!(exit_code("garbage"), None);
    }
}
