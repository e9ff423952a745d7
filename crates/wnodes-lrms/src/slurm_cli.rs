//! What Slurm's command-line clients print, read: `scontrol pidinfo` (which job a process
//! belongs to) and `squeue -O` with a `|` after each field ([`squeue_format`]). Used by the
//! host agent (who a job starter is) and the bridge (queued jobs, polled). Only numbers and
//! names an administrator sets are asked of squeue: nothing the job's user writes (its name,
//! comment or work directory) can shift a field.

/// A job as `squeue` with [`squeue_format`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    pub job_id: String,
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    /// `RUNNING`, `PENDING`, ...
    pub state: String,
    /// Slurm's restart count: the run attempt is one more.
    pub restarts: u32,
    pub partition: String,
    pub account: String,
    /// Seconds; `None` for `UNLIMITED`.
    pub time_limit: Option<u64>,
    /// Allocated CPUs (`cpu=` of the allocated TRES).
    pub cpus: u32,
    /// Allocated memory in bytes (`mem=` of the allocated TRES).
    pub memory_bytes: u64,
}

/// The job id in `scontrol pidinfo`'s answer, `Slurm JobId=42 ends at …` (22.05); older
/// releases said `Slurm job id 42 ends at …`.
pub fn parse_pidinfo(out: &str) -> Option<String> {
    let line = out.lines().find(|l| l.starts_with("Slurm "))?;
    let rest = line
        .strip_prefix("Slurm JobId=")
        .or_else(|| line.strip_prefix("Slurm job id "))?;
    let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = &rest[id.len()..];
    (!id.is_empty() && (after.is_empty() || after.starts_with(' '))).then_some(id)
}

/// The `-O` fields asked of squeue, in order.
pub const SQUEUE_FIELDS: [&str; 10] = [
    "JobID",
    "UserID",
    "GroupID",
    "UserName",
    "State",
    "RestartCnt",
    "Partition",
    "Account",
    "TimeLimit",
    "tres-alloc",
];

/// squeue's `-O` argument: each field followed by `|`.
pub fn squeue_format() -> String {
    SQUEUE_FIELDS
        .iter()
        .map(|f| format!("{f}:|"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A Slurm time limit (`UNLIMITED`, `[D-]HH:MM:SS`, `MM:SS`, `MM`) in seconds.
pub fn parse_time_limit(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if matches!(s, "UNLIMITED" | "INFINITE" | "NOT_SET" | "N/A") {
        return Ok(None);
    }
    let (days, hms) = match s.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().map_err(|e| format!("{s:?}: {e}"))?, rest),
        None => (0, s),
    };
    let parts = hms
        .split(':')
        .map(|p| p.parse::<u64>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let secs = match parts.as_slice() {
        [h, m, sec] => h * 3600 + m * 60 + sec,
        [m, sec] if days == 0 => m * 60 + sec,
        [h, m] => h * 3600 + m * 60,
        [m] if days == 0 => m * 60,
        [h] => h * 3600,
        _ => return Err(format!("{s:?} is no Slurm time")),
    };
    Ok(Some(days * 86_400 + secs))
}

/// A TRES memory amount (`256M`, `2G`, `1.50G`, `512K`, a bare number of MiB) in bytes.
fn parse_mem(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "M"),
    };
    let mult: f64 = match unit {
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("memory {s:?}: unknown unit {unit:?}")),
    };
    let n: f64 = num.parse().map_err(|e| format!("memory {s:?}: {e}"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("memory {s:?} is not a size"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((n * mult).round() as u64)
}

/// One line of squeue with [`squeue_format`].
pub fn parse_squeue(line: &str) -> Result<SlurmJob, String> {
    let fields: Vec<&str> = line.trim_end_matches('\n').split('|').collect();
    // Each field ends with `|`: one more (empty) piece after the last.
    if fields.len() != SQUEUE_FIELDS.len() + 1 || !fields[SQUEUE_FIELDS.len()].trim().is_empty() {
        return Err(format!(
            "{} fields where {} were asked for",
            fields.len().saturating_sub(1),
            SQUEUE_FIELDS.len()
        ));
    }
    let f = |i: usize| fields[i].trim();
    let num = |i: usize| {
        f(i).parse::<u32>()
            .map_err(|e| format!("{} {:?}: {e}", SQUEUE_FIELDS[i], f(i)))
    };
    let (mut cpus, mut memory_bytes) = (0, 0);
    for kv in f(9).split(',').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("cpu", v)) => cpus = v.parse().map_err(|e| format!("tres cpu {v:?}: {e}"))?,
            Some(("mem", v)) => memory_bytes = parse_mem(v)?,
            _ => {}
        }
    }
    Ok(SlurmJob {
        job_id: f(0).to_owned(),
        uid: num(1)?,
        gid: num(2)?,
        user: f(3).to_owned(),
        state: f(4).to_owned(),
        restarts: num(5)?,
        partition: f(6).to_owned(),
        account: f(7).to_owned(),
        time_limit: parse_time_limit(f(8))?,
        cpus,
        memory_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Printed by Debian's Slurm 22.05 (`scontrol pidinfo` of a job step's process, and of a
    /// process in no job), on this project's machine.
    #[test]
    fn pidinfo_answers_are_read() {
        assert_eq!(
            parse_pidinfo(
                "Slurm JobId=1 ends at Thu Dec 02 05:21:39 2027\nJob remaining time is 31535996 seconds\n"
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            parse_pidinfo("Slurm job id 42 ends at Wed Dec 02 06:00:00 2026\n").as_deref(),
            Some("42")
        );
        assert_eq!(
            parse_pidinfo("Failed to locate job for requested pid\n"),
            None
        );
        assert_eq!(parse_pidinfo("Slurm JobId=12x ends"), None);
        assert_eq!(parse_pidinfo(""), None);
    }

    /// A line squeue 22.05 printed for [`squeue_format`] on this project's machine.
    #[test]
    fn squeue_lines_are_read_and_short_or_shifted_lines_are_refused() {
        let j = parse_squeue(
            "1|65534|65534|nobody|RUNNING|0|wnodes|root|UNLIMITED|cpu=1,mem=256M,node=1,billing=1|",
        )
        .unwrap();
        assert_eq!(
            j,
            SlurmJob {
                job_id: "1".into(),
                uid: 65534,
                gid: 65534,
                user: "nobody".into(),
                state: "RUNNING".into(),
                restarts: 0,
                partition: "wnodes".into(),
                account: "root".into(),
                time_limit: None,
                cpus: 1,
                memory_bytes: 256 << 20,
            }
        );
        let j =
            parse_squeue("7|1000|100|alice|RUNNING|2|p|atlas|1-02:03:04|cpu=2,mem=1.50G|").unwrap();
        assert_eq!(j.restarts, 2);
        assert_eq!(j.time_limit, Some(86_400 + 2 * 3600 + 3 * 60 + 4));
        assert_eq!(j.memory_bytes, 1_610_612_736);
        assert!(parse_squeue("1|65534|65534|nobody|RUNNING|0|wnodes|root|UNLIMITED|").is_err());
        let e =
            parse_squeue("1|x|65534|nobody|RUNNING|0|wnodes|root|UNLIMITED|cpu=1|").unwrap_err();
        assert!(e.contains("UserID"), "{e}");
        assert!(parse_squeue("1|0|0|root|RUNNING|0|p|a|UNLIMITED|cpu=1|extra|").is_err());
    }

    #[test]
    fn time_limits_are_read() {
        assert_eq!(parse_time_limit("UNLIMITED"), Ok(None));
        assert_eq!(parse_time_limit("30:00"), Ok(Some(1800)));
        assert_eq!(parse_time_limit("1:00:00"), Ok(Some(3600)));
        assert_eq!(parse_time_limit("2-00:00:00"), Ok(Some(172_800)));
        assert_eq!(parse_time_limit("5"), Ok(Some(300)));
        assert!(parse_time_limit("soon").is_err());
    }
}
