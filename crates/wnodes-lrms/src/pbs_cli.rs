//! What PBS's `qstat -f` prints about one job, read: OpenPBS/PBS Pro's JSON form
//! (`qstat -f -F json ID`, PBS Pro ≥ 14.1) and the text form with one attribute per line
//! (`qstat -f -1 ID`, Torque and OpenPBS). Used by the host agent to learn who a job starter is.
//!
//! The text form is `Job Id: ID` then `    name = value` lines. The job's user sets some values
//! (its name, its environment in `Variable_List`), so the reader refuses an output in which an
//! attribute appears twice: a value that smuggles in a line `    euser = root` is an error, not
//! an identity. The JSON form has no such ambiguity.

use serde_json::Value;

/// A job as `qstat -f` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbsJob {
    /// The full job id (`123.server`).
    pub job_id: String,
    /// `job_state`: `R` running, `Q` queued, `E` exiting, ...
    pub state: String,
    /// `euser`: the account the job runs as (else the user part of `Job_Owner`).
    pub user: String,
    /// `egroup`, when shown.
    pub group: Option<String>,
    pub queue: String,
    /// `Account_Name`, when set.
    pub account: Option<String>,
    /// The hosts of `exec_host` (`wn01/0*2+wn02/0` → `wn01`, `wn02`).
    pub exec_hosts: Vec<String>,
    /// `session_id`: the session of the job's top process on its first host.
    pub session_id: Option<i32>,
    /// `run_count`: how many times the job has been started (OpenPBS, Torque ≥ 4); `None` if
    /// not shown.
    pub run_count: Option<u32>,
    /// `Resource_List.walltime` in seconds.
    pub walltime: Option<u64>,
    /// `Resource_List.ncpus`, else the `ppn` of Torque's `Resource_List.nodes`, else 1.
    pub cpus: u32,
    /// `Resource_List.mem` (or `pmem`/`vmem` when `mem` is missing) in bytes; 0 when none.
    pub memory_bytes: u64,
}

/// One job's attributes as `name → value` (nested `Resource_List.x` flattened).
type Attrs = std::collections::BTreeMap<String, String>;

/// Reads `qstat -f -F json ID`'s answer for job `id` (the `Jobs` object may key it by the full
/// id `123.server` while `id` is `123`: a single job is taken whatever its key).
///
/// # Errors
/// Not JSON, no job, or a required attribute missing or malformed.
pub fn parse_qstat_json(out: &str, id: &str) -> Result<PbsJob, String> {
    let v: Value = serde_json::from_str(out).map_err(|e| format!("not JSON: {e}"))?;
    let jobs = v
        .get("Jobs")
        .and_then(Value::as_object)
        .ok_or("no \"Jobs\" object")?;
    let (key, job) = match jobs.get(id) {
        Some(j) => (id, j),
        None => match jobs.iter().collect::<Vec<_>>().as_slice() {
            [(k, j)] if k.split('.').next() == id.split('.').next() => (k.as_str(), *j),
            _ => return Err(format!("job {id:?} is not in the answer")),
        },
    };
    let obj = job.as_object().ok_or("the job is not an object")?;
    let mut attrs = Attrs::new();
    for (k, v) in obj {
        match v {
            Value::Object(inner) => {
                for (ik, iv) in inner {
                    attrs.insert(format!("{k}.{ik}"), scalar(iv));
                }
            }
            other => {
                attrs.insert(k.clone(), scalar(other));
            }
        }
    }
    job_from(key, &attrs)
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads `qstat -f -1 ID`'s answer (one job).
///
/// # Errors
/// No `Job Id:` line, more than one job, an attribute shown twice, or a required attribute
/// missing or malformed.
pub fn parse_qstat_text(out: &str) -> Result<PbsJob, String> {
    let mut id: Option<String> = None;
    let mut attrs = Attrs::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Job Id:") {
            if id.is_some() {
                return Err("more than one job in the answer".into());
            }
            id = Some(rest.trim().to_owned());
            continue;
        }
        if line.trim().is_empty() || id.is_none() {
            continue;
        }
        let Some((name, value)) = line.trim_start().split_once(" = ") else {
            // A value wrapped onto a continuation line (`qstat -f` without `-1`): not ours.
            continue;
        };
        let name = name.trim();
        if attrs.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(format!(
                "attribute {name} appears twice (a value that forges a line?)"
            ));
        }
    }
    let id = id.ok_or("no \"Job Id:\" line")?;
    if id.is_empty() || id.contains(char::is_whitespace) {
        return Err(format!("{id:?} is no job id"));
    }
    job_from(&id, &attrs)
}

fn job_from(id: &str, a: &Attrs) -> Result<PbsJob, String> {
    let get = |k: &str| a.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
    let state = get("job_state").ok_or("no job_state")?.to_owned();
    let user = match get("euser") {
        Some(u) => u.to_owned(),
        None => get("Job_Owner")
            .and_then(|o| o.split('@').next())
            .ok_or("neither euser nor Job_Owner")?
            .to_owned(),
    };
    let session_id = get("session_id")
        .map(|s| {
            s.parse::<i32>()
                .map_err(|e| format!("session_id {s:?}: {e}"))
        })
        .transpose()?;
    let run_count = get("run_count")
        .map(|s| {
            s.parse::<u32>()
                .map_err(|e| format!("run_count {s:?}: {e}"))
        })
        .transpose()?;
    let walltime = get("Resource_List.walltime")
        .map(parse_walltime)
        .transpose()?;
    let cpus = match get("Resource_List.ncpus") {
        Some(n) => n
            .parse::<u32>()
            .map_err(|e| format!("Resource_List.ncpus {n:?}: {e}"))?,
        None => get("Resource_List.nodes").map_or(Ok(1), ppn)?,
    };
    let memory_bytes = match ["mem", "pmem", "vmem"]
        .iter()
        .find_map(|r| get(&format!("Resource_List.{r}")))
    {
        Some(m) => parse_size(m)?,
        None => 0,
    };
    let exec_hosts = get("exec_host")
        .map(|h| {
            h.split('+')
                .filter_map(|part| part.split('/').next())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(PbsJob {
        job_id: id.to_owned(),
        state,
        user,
        group: get("egroup").map(str::to_owned),
        queue: get("queue").unwrap_or_default().to_owned(),
        account: get("Account_Name").map(str::to_owned),
        exec_hosts,
        session_id,
        run_count,
        walltime,
        cpus: cpus.max(1),
        memory_bytes,
    })
}

/// A PBS duration: `HH:MM:SS`, `MM:SS` or seconds.
///
/// # Errors
/// Not one of those.
pub fn parse_walltime(s: &str) -> Result<u64, String> {
    let parts = s
        .split(':')
        .map(|p| p.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("walltime {s:?}: {e}"))?;
    match parts.as_slice() {
        [secs] => Ok(*secs),
        [m, sec] => Ok(m * 60 + sec),
        [h, m, sec] => Ok(h * 3600 + m * 60 + sec),
        _ => Err(format!("walltime {s:?}: expected [[HH:]MM:]SS")),
    }
}

/// A PBS size (`4gb`, `512mb`, `1024kb`, `100b`, `2tb`, a bare number of bytes; `w` words of
/// 8 bytes) in bytes.
///
/// # Errors
/// Not a size.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let digits: String = lower.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().map_err(|e| format!("size {s:?}: {e}"))?;
    let unit = &lower[digits.len()..];
    let (scale, word) = match unit.strip_suffix('b') {
        Some(u) => (u, 1),
        None => match unit.strip_suffix('w') {
            Some(u) => (u, 8),
            None if unit.is_empty() => ("", 1),
            None => return Err(format!("size {s:?}: unknown unit {unit:?}")),
        },
    };
    let shift = match scale {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(word)
        .and_then(|b| b.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("size {s:?}: too large"))
}

/// The CPUs of a Torque `nodes` request (`2:ppn=4` → 8, `wn01:ppn=2` → 2, `1` → 1).
fn ppn(nodes: &str) -> Result<u32, String> {
    let mut total = 0u32;
    for spec in nodes.split('+') {
        let mut fields = spec.split(':');
        let count = fields
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1);
        let per = fields
            .find_map(|f| f.strip_prefix("ppn="))
            .map(|p| {
                p.parse::<u32>()
                    .map_err(|e| format!("Resource_List.nodes {nodes:?}: {e}"))
            })
            .transpose()?
            .unwrap_or(1);
        total = total.saturating_add(count.saturating_mul(per));
    }
    Ok(total.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = include_str!("../tests/data/pbs/qstat_f_F_json_CONSTRUCTED.json");
    const TEXT: &str = include_str!("../tests/data/pbs/qstat_f_1_torque_CONSTRUCTED.txt");

    #[test]
    fn openpbs_json_gives_the_running_job() {
        let j = parse_qstat_json(JSON, "1042").unwrap();
        assert_eq!(j.job_id, "1042.pbs01");
        assert_eq!(j.state, "R");
        assert_eq!(j.user, "atlas001");
        assert_eq!(j.group.as_deref(), Some("atlas"));
        assert_eq!(j.queue, "grid");
        assert_eq!(j.account.as_deref(), Some("atlas"));
        assert_eq!(j.exec_hosts, ["wn017"]);
        assert_eq!(j.session_id, Some(23456));
        assert_eq!(j.run_count, Some(2));
        assert_eq!(j.walltime, Some(48 * 3600));
        assert_eq!(j.cpus, 8);
        assert_eq!(j.memory_bytes, 16 << 30);
        assert_eq!(parse_qstat_json(JSON, "1042.pbs01").unwrap(), j);
        assert!(parse_qstat_json(JSON, "1043").is_err());
        assert!(parse_qstat_json("{}", "1042").is_err());
    }

    #[test]
    fn torque_text_gives_the_running_job_and_ppn() {
        let j = parse_qstat_text(TEXT).unwrap();
        assert_eq!(j.job_id, "77.torque.example.org");
        assert_eq!(j.state, "R");
        assert_eq!(j.user, "cms042");
        assert_eq!(j.queue, "cms");
        assert_eq!(j.exec_hosts, ["wn03.example.org", "wn03.example.org"]);
        assert_eq!(j.session_id, Some(4242));
        assert_eq!(j.run_count, Some(1));
        assert_eq!(j.walltime, Some(3600 + 30 * 60));
        assert_eq!(j.cpus, 2);
        assert_eq!(j.memory_bytes, 2 << 30);
    }

    #[test]
    fn a_forged_line_in_a_user_value_is_refused() {
        // The user's environment (Variable_List) carrying a newline and a second euser.
        let forged = TEXT.replace(
            "    Variable_List = ",
            "    Variable_List = X=1\n    euser = root\n    Y=",
        );
        let e = parse_qstat_text(&forged).unwrap_err();
        assert!(e.contains("euser appears twice"), "{e}");
        let two = format!("{TEXT}\n{TEXT}");
        assert!(
            parse_qstat_text(&two)
                .unwrap_err()
                .contains("more than one")
        );
        assert!(parse_qstat_text("").unwrap_err().contains("Job Id"));
        let empty = TEXT.replace("Job Id: 77.torque.example.org", "Job Id:");
        assert!(parse_qstat_text(&empty).unwrap_err().contains("no job id"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4gb").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1024kb").unwrap(), 1 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("2kw").unwrap(), 2 * 8 * 1024);
        assert!(parse_size("4xb").is_err());
        assert!(parse_size("gb").is_err());
        assert!(parse_size("99999999999pb").is_err());
        assert_eq!(parse_walltime("01:00:00").unwrap(), 3600);
        assert_eq!(parse_walltime("90").unwrap(), 90);
        assert_eq!(parse_walltime("2:30").unwrap(), 150);
        assert!(parse_walltime("1:2:3:4").is_err());
        assert_eq!(ppn("2:ppn=4").unwrap(), 8);
        assert_eq!(ppn("wn01:ppn=2+wn02:ppn=2").unwrap(), 4);
        assert_eq!(ppn("1").unwrap(), 1);
        assert!(ppn("1:ppn=x").is_err());
    }
}
