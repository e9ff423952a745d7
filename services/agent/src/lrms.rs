//! What every batch system's check shares: the job as the agent verified it ([`VerifiedJob`]),
//! why a check failed ([`LrmsError`]), the LRMS's clients run without a shell and with a
//! deadline ([`Client`]), and what the kernel says about the job starter's process
//! ([`proc_facts`]: its session, its ancestors, its cgroups), which its user cannot change.

use std::{path::Path, time::Duration};

/// A job as its LRMS describes it, checked against the job starter's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJob {
    /// The LRMS's job id, as the bridge's readers of the LRMS's logs name it.
    pub job_id: String,
    /// 1 for the first run; one more for each restart or requeue.
    pub attempt: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    pub queue: String,
    pub vo: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Seconds; `None` when the LRMS sets no limit.
    pub walltime: Option<u64>,
    /// Variables the payload sees as the LRMS describes the job (they override the starter's).
    pub env: Vec<(String, String)>,
}

/// Why an LRMS client could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} did not answer within {secs} s")]
    Timeout { command: String, secs: u64 },
    #[error("{command} failed: {said}")]
    Failed { command: String, said: String },
    #[error("cannot read {command}'s answer {said:?}: {what}")]
    Parse {
        command: String,
        said: String,
        what: String,
    },
}

/// Why the agent could not vouch for a job starter.
#[derive(Debug, thiserror::Error)]
pub enum LrmsError {
    /// The LRMS or the kernel says the starter is not who or where it claims: refused.
    #[error("{reason}")]
    Refused { kind: &'static str, reason: String },
    /// The LRMS could not be asked (the starter may try again).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The process's facts could not be read (it may have gone).
    #[error("cannot read /proc/{pid}/{what}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl LrmsError {
    pub fn refused(kind: &'static str, reason: impl Into<String>) -> Self {
        Self::Refused {
            kind,
            reason: reason.into(),
        }
    }
}

/// Runs one LRMS's clients: no shell, stdin closed, killed past `timeout_secs`.
#[derive(Debug, Clone)]
pub struct Client {
    pub timeout_secs: u64,
}

impl Client {
    /// Runs `program args`: its command line (for messages) and its output.
    async fn output(
        &self,
        program: &Path,
        args: &[&str],
    ) -> Result<(String, std::process::Output), ClientError> {
        let command = format!("{} {}", program.display(), args.join(" "));
        let mut c = tokio::process::Command::new(program);
        c.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let secs = self.timeout_secs;
        let out = tokio::time::timeout(Duration::from_secs(secs), c.output())
            .await
            .map_err(|_| ClientError::Timeout {
                command: command.clone(),
                secs,
            })?
            .map_err(|source| ClientError::Spawn {
                command: command.clone(),
                source,
            })?;
        Ok((command, out))
    }

    /// Runs `program args`; whether it succeeded, and its stdout then stderr.
    ///
    /// # Errors
    /// It could not be started, or did not end in time.
    pub async fn run(&self, program: &Path, args: &[&str]) -> Result<(bool, String), ClientError> {
        let (_, out) = self.output(program, args).await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// [`Client::run`], and only its stdout when it succeeded.
    ///
    /// # Errors
    /// As [`Client::run`]; [`ClientError::Failed`] with what it said when it failed.
    pub async fn stdout(&self, program: &Path, args: &[&str]) -> Result<String, ClientError> {
        let (command, out) = self.output(program, args).await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ClientError::Failed {
                command,
                said: format!(
                    "{} {}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
                .trim()
                .to_owned(),
            })
        }
    }
}

/// Whether the LRMS's name for a host (`wn017`, `wn017.example.org`) is `host`: equal, or
/// equal short names when either is short.
pub fn same_host(lrms_name: &str, host: &str) -> bool {
    let (a, b) = (lrms_name.to_ascii_lowercase(), host.to_ascii_lowercase());
    if a == b {
        return true;
    }
    let short = |s: &str| s.split('.').next().unwrap_or_default().to_owned();
    (!a.contains('.') || !b.contains('.')) && !a.is_empty() && short(&a) == short(&b)
}

/// The uid and primary gid of account `user`.
///
/// # Errors
/// No such account on this host: refused (the job cannot be this host's user's).
pub fn account(user: &str) -> Result<(u32, u32), LrmsError> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        _ => Err(LrmsError::refused(
            "uid",
            format!("the job's user {user:?} is no account on this host"),
        )),
    }
}

/// Refused unless one of `hosts` (the LRMS's names for the hosts `job` runs on, e.g. "PBS job
/// 42") is `node`.
///
/// # Errors
/// The job runs elsewhere.
pub fn check_runs_here(job: &str, hosts: &[String], node: &str) -> Result<(), LrmsError> {
    if hosts.iter().any(|h| same_host(h, node)) {
        Ok(())
    } else {
        Err(LrmsError::refused(
            "host",
            format!(
                "{job} runs on {}, not on this host ({node})",
                hosts.join(", ")
            ),
        ))
    }
}

/// The uid and gid of `user`, the account `job` runs as; refused unless the uid is `uid`
/// (the job starter's).
///
/// # Errors
/// No such account, or another uid.
pub fn check_owner(job: &str, user: &str, uid: u32) -> Result<(u32, u32), LrmsError> {
    let (job_uid, job_gid) = account(user)?;
    if job_uid == uid {
        Ok((job_uid, job_gid))
    } else {
        Err(LrmsError::refused(
            "uid",
            format!(
                "{job} belongs to {user} (uid {job_uid}), but the job starter runs as uid {uid}"
            ),
        ))
    }
}

/// A job id a job starter's environment claims, checked before it goes on a command line:
/// letters, digits, `.`, `-`, `_`, `[`, `]`, `@`.
///
/// # Errors
/// Anything else: refused.
pub fn claimed_id(id: &str) -> Result<&str, LrmsError> {
    if !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('-')
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b'@')
        })
    {
        Ok(id)
    } else {
        Err(LrmsError::refused(
            "claimed_job",
            format!("the job starter's environment names job {id:?}, which is no job id"),
        ))
    }
}

/// What the kernel says about a process (from `/proc`; none of it can be set by the process's
/// user to another job's values).
pub mod proc_facts {
    use super::LrmsError;

    fn read(pid: i32, what: &'static str) -> Result<String, LrmsError> {
        std::fs::read_to_string(format!("/proc/{pid}/{what}")).map_err(|source| LrmsError::Proc {
            pid,
            what,
            source,
        })
    }

    /// The fields of `/proc/<pid>/stat` after the command name (`state ppid pgrp session ...`).
    fn stat_fields(pid: i32) -> Result<Vec<String>, LrmsError> {
        let stat = read(pid, "stat")?;
        // The name is in parentheses and may itself hold ") ".
        let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
        Ok(after.split_whitespace().map(str::to_owned).collect())
    }

    fn stat_field(pid: i32, at: usize) -> Result<i32, LrmsError> {
        stat_fields(pid)?
            .get(at)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| LrmsError::Proc {
                pid,
                what: "stat",
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "short stat line"),
            })
    }

    /// The process's session id.
    ///
    /// # Errors
    /// The process is gone.
    pub fn session(pid: i32) -> Result<i32, LrmsError> {
        stat_field(pid, 3)
    }

    /// The process's parent.
    ///
    /// # Errors
    /// The process is gone.
    pub fn parent(pid: i32) -> Result<i32, LrmsError> {
        stat_field(pid, 1)
    }

    /// The process's real uid.
    ///
    /// # Errors
    /// The process is gone.
    pub fn real_uid(pid: i32) -> Result<u32, LrmsError> {
        read(pid, "status")?
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| LrmsError::Proc {
                pid,
                what: "status",
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no Uid: line"),
            })
    }

    /// The process's command name (`comm`: the executable's name, 15 bytes at most).
    ///
    /// # Errors
    /// The process is gone.
    pub fn comm(pid: i32) -> Result<String, LrmsError> {
        Ok(read(pid, "comm")?.trim_end_matches('\n').to_owned())
    }

    /// The process's arguments.
    ///
    /// # Errors
    /// The process is gone.
    pub fn cmdline(pid: i32) -> Result<Vec<String>, LrmsError> {
        Ok(read(pid, "cmdline")?
            .split('\0')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// `/proc/<pid>/cgroup`.
    ///
    /// # Errors
    /// The process is gone.
    pub fn cgroups(pid: i32) -> Result<String, LrmsError> {
        read(pid, "cgroup")
    }

    /// The process's ancestors, nearest first, up to (not including) pid 1; at most 64.
    ///
    /// # Errors
    /// A process of the chain is gone.
    pub fn ancestors(pid: i32) -> Result<Vec<i32>, LrmsError> {
        let mut out = Vec::new();
        let mut p = parent(pid)?;
        while p > 1 && out.len() < 64 {
            out.push(p);
            p = parent(p)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_names_match_by_full_or_short_name() {
        assert!(same_host("wn017", "wn017"));
        assert!(same_host("WN017", "wn017.example.org"));
        assert!(same_host("wn017.example.org", "wn017"));
        assert!(!same_host("wn017.example.org", "wn017.other.org"));
        assert!(!same_host("wn018", "wn017.example.org"));
        assert!(!same_host("", "wn017"));
    }

    #[test]
    fn claimed_ids_are_plain_names() {
        assert!(claimed_id("1042.pbs01").is_ok());
        assert!(claimed_id("5821[3]").is_ok());
        for bad in ["", "-f", "1 2", "1;rm", "a\"b", &"9".repeat(129)] {
            assert!(claimed_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn this_process_s_facts_are_read() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(
            proc_facts::session(me).unwrap(),
            nix::unistd::getsid(None).unwrap().as_raw()
        );
        assert_eq!(
            proc_facts::parent(me).unwrap(),
            nix::unistd::getppid().as_raw()
        );
        assert_eq!(
            proc_facts::real_uid(me).unwrap(),
            nix::unistd::getuid().as_raw()
        );
        assert!(!proc_facts::comm(me).unwrap().is_empty());
        assert!(!proc_facts::cmdline(me).unwrap().is_empty());
        let anc = proc_facts::ancestors(me).unwrap();
        assert_eq!(
            anc.first().copied(),
            Some(nix::unistd::getppid().as_raw()).filter(|p| *p > 1)
        );
        assert!(matches!(
            proc_facts::session(i32::MAX),
            Err(LrmsError::Proc { .. })
        ));
    }
}
