//! What LSF tells about one running job, read, for the host agent:
//!
//! - which job a process belongs to: LSF's cgroup process tracking (`LSF_PROCESS_TRACKING=Y`,
//!   `LSF_LINUX_CGROUP_ACCT=Y`) puts each job's processes in a cgroup named
//!   `job.<jobid>.<index>.<submit time>` under `lsf/<cluster>/`, which only root can move a
//!   process out of ([`job_of_cgroup`], from `/proc/<pid>/cgroup`);
//! - the job: `bjobs -o "<fields>" -json ID` ([`bjobs_fields`], [`parse_bjobs_json`]);
//! - its run attempt: the number of `Starting (Pid N);` entries in `bhist -l ID`
//!   ([`count_starts`]), the same count the bridge makes from `lsb.events`' `JOB_START`s.

use serde_json::Value;

/// A job as `bjobs -o ... -json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LsfJob {
    /// `1234`, or `1234[5]` for an array element.
    pub job_id: String,
    /// `RUN`, `PEND`, `DONE`, `EXIT`, `SSUSP`, ...
    pub state: String,
    pub user: String,
    pub queue: String,
    /// `PROJ_NAME`, when set (`default` is LSF's own default project).
    pub project: Option<String>,
    /// The hosts of `EXEC_HOST` (`4*wn01:2*wn02` → `wn01`, `wn02`).
    pub exec_hosts: Vec<String>,
    /// `NALLOC_SLOT`: the slots allocated to the job.
    pub slots: u32,
    /// `RUNTIMELIMIT` in seconds (LSF shows minutes, `60.0/wn01` normalised to a host).
    pub run_limit: Option<u64>,
    /// `MEMLIMIT` in bytes.
    pub mem_limit: Option<u64>,
}

/// The fields asked of `bjobs -o` (their upper-case names key the JSON answer).
pub const BJOBS_FIELDS: [&str; 10] = [
    "jobid",
    "jobindex",
    "stat",
    "user",
    "queue",
    "proj_name",
    "exec_host",
    "nalloc_slot",
    "runtimelimit",
    "memlimit",
];

/// `bjobs -o`'s argument.
pub fn bjobs_fields() -> String {
    BJOBS_FIELDS.join(" ")
}

/// LSF's job id text for job `id`, array index `idx` (0: not an array element); the bridge's
/// `lsb.events` reader names jobs the same way.
pub fn lsf_job_id(id: u64, idx: u64) -> String {
    if idx > 0 {
        format!("{id}[{idx}]")
    } else {
        id.to_string()
    }
}

/// The job (id, array index) whose LSF cgroup holds the process whose `/proc/<pid>/cgroup` is
/// `proc_cgroup`: a path with a component `top` (LSF's, `lsf` by default) above a component
/// `job.<id>.<index>[.<submit time>]`. Every hierarchy that names an LSF job must name the
/// same one; `None` when none does, or they disagree.
pub fn job_of_cgroup(proc_cgroup: &str, top: &str) -> Option<(u64, u64)> {
    let mut found: Option<(u64, u64)> = None;
    for line in proc_cgroup.lines() {
        // `hierarchy-id:controllers:path`; the path may itself hold ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let comps: Vec<&str> = path.split('/').collect();
        let Some(top_at) = comps.iter().position(|c| *c == top) else {
            continue;
        };
        let job = comps[top_at + 1..].iter().find_map(|c| job_component(c));
        match (found, job) {
            (_, None) => {}
            (None, Some(j)) => found = Some(j),
            (Some(f), Some(j)) if f == j => {}
            (Some(_), Some(_)) => return None,
        }
    }
    found
}

/// `job.<id>.<index>[.<digits>]` → (id, index).
fn job_component(c: &str) -> Option<(u64, u64)> {
    let rest = c.strip_prefix("job.")?;
    let mut nums = rest.split('.');
    let id = nums.next()?.parse::<u64>().ok()?;
    let idx = nums.next()?.parse::<u64>().ok()?;
    if nums.any(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    Some((id, idx))
}

/// Reads `bjobs -o "<bjobs_fields()>" -json ID`'s answer (one record).
///
/// # Errors
/// Not JSON, not exactly one record, a record with an `ERROR` (`Job <x> is not found`), or a
/// field missing or malformed.
pub fn parse_bjobs_json(out: &str) -> Result<LsfJob, String> {
    let v: Value = serde_json::from_str(out).map_err(|e| format!("not JSON: {e}"))?;
    let records = v
        .get("RECORDS")
        .and_then(Value::as_array)
        .ok_or("no \"RECORDS\" array")?;
    let [r] = records.as_slice() else {
        return Err(format!("{} records, expected one", records.len()));
    };
    if let Some(e) = r.get("ERROR").and_then(Value::as_str) {
        return Err(e.to_owned());
    }
    let get = |k: &str| {
        r.get(k)
            .map(|v| match v {
                Value::String(s) => s.trim().to_owned(),
                other => other.to_string(),
            })
            .filter(|s| !s.is_empty() && s != "-")
    };
    let need = |k: &str| get(k).ok_or_else(|| format!("no {k}"));
    let id: u64 = need("JOBID")?.parse().map_err(|e| format!("JOBID: {e}"))?;
    let idx: u64 = match get("JOBINDEX") {
        Some(i) => i.parse().map_err(|e| format!("JOBINDEX {i:?}: {e}"))?,
        None => 0,
    };
    let exec_hosts = get("EXEC_HOST")
        .map(|h| {
            h.split(':')
                .map(|p| p.rsplit_once('*').map_or(p, |(_, host)| host).trim())
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let slots = match get("NALLOC_SLOT") {
        Some(s) => s.parse().map_err(|e| format!("NALLOC_SLOT {s:?}: {e}"))?,
        None => 1,
    };
    let run_limit = get("RUNTIMELIMIT").map(|s| minutes(&s)).transpose()?;
    let mem_limit = get("MEMLIMIT").map(|s| mem(&s)).transpose()?;
    Ok(LsfJob {
        job_id: lsf_job_id(id, idx),
        state: need("STAT")?,
        user: need("USER")?,
        queue: need("QUEUE")?,
        project: get("PROJ_NAME"),
        exec_hosts,
        slots: u32::max(slots, 1),
        run_limit,
        mem_limit,
    })
}

/// `60.0/wn01` or `60.0` (minutes) → seconds.
fn minutes(s: &str) -> Result<u64, String> {
    let n = s.split('/').next().unwrap_or(s).trim();
    let m: f64 = n.parse().map_err(|e| format!("RUNTIMELIMIT {s:?}: {e}"))?;
    if !m.is_finite() || m < 0.0 {
        return Err(format!("RUNTIMELIMIT {s:?}: not a duration"));
    }
    // Whole seconds; a limit is never more precise.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((m * 60.0).round() as u64)
}

/// `4 G`, `512 M`, `4096 K`, `2 Gbytes`, `1048576` (KB, LSF's default `LSF_UNIT_FOR_LIMITS`)
/// → bytes.
fn mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let n: f64 = t[..num_end]
        .parse()
        .map_err(|e| format!("MEMLIMIT {s:?}: {e}"))?;
    let unit = t[num_end..].trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("BYTES").trim_end_matches('B') {
        "" | "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("MEMLIMIT {s:?}: unknown unit {other:?}")),
    };
    let bytes = n * f64::from(1u32 << (shift - 10)) * 1024.0;
    if !bytes.is_finite() || !(0.0..=1e18).contains(&bytes) {
        return Err(format!("MEMLIMIT {s:?}: out of range"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes.round() as u64)
}

/// How many times `bhist -l` says the job started: lines `<date>: Starting (Pid N);`. The date
/// is `Www Mmm dd hh:mm:ss` (with ` yyyy` when not this year); text inside a wrapped entry
/// never starts a line with a date.
pub fn count_starts(bhist_l: &str) -> u32 {
    let n = bhist_l
        .lines()
        .filter(|l| {
            l.split_once(": ").is_some_and(|(date, rest)| {
                is_bhist_date(date)
                    && rest.strip_prefix("Starting (Pid ").is_some_and(|p| {
                        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                        !digits.is_empty() && p[digits.len()..].starts_with(')')
                    })
            })
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `Tue Dec  2 09:30:12` or `Tue Dec  2 09:30:12 2025`.
fn is_bhist_date(s: &str) -> bool {
    let f: Vec<&str> = s.split_whitespace().collect();
    let clock = |t: &str| {
        let p: Vec<&str> = t.split(':').collect();
        p.len() == 3 && p.iter().all(|x| x.len() == 2 && x.parse::<u8>().is_ok())
    };
    let word = |w: &str| w.len() == 3 && w.bytes().all(|b| b.is_ascii_alphabetic());
    match f.as_slice() {
        [d, m, day, t] => word(d) && word(m) && day.parse::<u8>().is_ok() && clock(t),
        [d, m, day, t, y] => {
            word(d) && word(m) && day.parse::<u8>().is_ok() && clock(t) && y.parse::<u16>().is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BJOBS: &str = include_str!("../tests/data/lsf/bjobs_o_json_CONSTRUCTED.json");
    const BHIST: &str = include_str!("../tests/data/lsf/bhist_l_requeued_CONSTRUCTED.txt");

    #[test]
    fn bjobs_json_gives_the_running_job() {
        let j = parse_bjobs_json(BJOBS).unwrap();
        assert_eq!(j.job_id, "5821");
        assert_eq!(j.state, "RUN");
        assert_eq!(j.user, "lhcb007");
        assert_eq!(j.queue, "grid_lhcb");
        assert_eq!(j.project.as_deref(), Some("lhcb"));
        assert_eq!(j.exec_hosts, ["wn42", "wn43"]);
        assert_eq!(j.slots, 4);
        assert_eq!(j.run_limit, Some(2880 * 60));
        assert_eq!(j.mem_limit, Some(8 << 30));
        let not_found =
            r#"{"COMMAND":"bjobs","JOBS":1,"RECORDS":[{"ERROR":"Job <9> is not found"}]}"#;
        assert_eq!(
            parse_bjobs_json(not_found).unwrap_err(),
            "Job <9> is not found"
        );
        let none = r#"{"COMMAND":"bjobs","JOBS":0,"RECORDS":[]}"#;
        assert!(parse_bjobs_json(none).unwrap_err().contains("0 records"));
        let array = BJOBS.replace(r#""JOBINDEX":"0""#, r#""JOBINDEX":"7""#);
        assert_eq!(parse_bjobs_json(&array).unwrap().job_id, "5821[7]");
        assert!(parse_bjobs_json("").is_err());
    }

    #[test]
    fn limits_in_lsf_units() {
        assert_eq!(minutes("60.0/wn01").unwrap(), 3600);
        assert_eq!(minutes("1.5").unwrap(), 90);
        assert!(minutes("x").is_err());
        assert_eq!(mem("4 G").unwrap(), 4 << 30);
        assert_eq!(mem("512 Mbytes").unwrap(), 512 << 20);
        assert_eq!(mem("1048576").unwrap(), 1 << 30);
        assert_eq!(mem("2.5 G").unwrap(), 5 << 29);
        assert!(mem("4 Q").is_err());
    }

    #[test]
    fn the_job_of_a_process_comes_from_its_lsf_cgroup() {
        let v1 = "12:memory:/lsf/cluster1/job.5821.0.1764668400\n\
                  11:cpuset:/lsf/cluster1/job.5821.0.1764668400\n\
                  1:name=systemd:/system.slice/lsfd.service\n";
        assert_eq!(job_of_cgroup(v1, "lsf"), Some((5821, 0)));
        let v2 = "0::/system.slice/lsfd.service/lsf/c1/job.77.3.1764668400/tasks\n";
        assert_eq!(job_of_cgroup(v2, "lsf"), Some((77, 3)));
        assert_eq!(lsf_job_id(77, 3), "77[3]");
        // Not under LSF's cgroup, a user's own look-alike, two jobs at once, junk.
        assert_eq!(job_of_cgroup("0::/user.slice/job.1.0.1\n", "lsf"), None);
        assert_eq!(
            job_of_cgroup(
                "3:memory:/lsf/c/job.1.0.1\n4:cpuset:/lsf/c/job.2.0.1\n",
                "lsf"
            ),
            None
        );
        assert_eq!(job_of_cgroup("0::/lsf/c/job.x.0\n", "lsf"), None);
        assert_eq!(job_of_cgroup("0::/lsf/c/job.1.0.1x\n", "lsf"), None);
        assert_eq!(job_of_cgroup("garbage", "lsf"), None);
    }

    #[test]
    fn starts_are_counted_from_bhist_entries_only() {
        assert_eq!(count_starts(BHIST), 2);
        assert_eq!(count_starts(""), 0);
        // The same words inside a wrapped entry (say the job's command) do not count.
        let forged = "Job <1>, User <u>, Command <echo Starting (Pid 3);>\n\
                      Tue Dec  2 09:30:12: Submitted from host <ce01>, to Queue <q>;\n\
                      \x20                    Starting (Pid 4);\n";
        assert_eq!(count_starts(forged), 0);
        assert!(is_bhist_date("Tue Dec  2 09:30:12 2025"));
        assert!(!is_bhist_date("Job <1>, User <u>"));
    }
}
