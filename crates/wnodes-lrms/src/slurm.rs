//! Slurm: jobcomp records and `sacct -P` output. The form is recognised per record, so one
//! replay may mix them:
//!
//! - **jobcomp/kafka and jobcomp/elasticsearch** (`{…}`, one JSON document per record;
//!   `src/plugins/jobcomp/common/jobcomp_common.c`): times `%FT%T` in UTC without `Z`; a start
//!   record (Slurm ≥ 25.05 `enable_job_start`) has no `state` and maps to `started`.
//! - **jobcomp/script** environment (`KEY=VALUE` lines, `JOBID=` … `JOBSTATE=`; a blank line or
//!   a second `JOBID=` ends a record): epoch times. With `RESTARTCNT=` (added by WNoDeS's hook,
//!   `slurm/wnodes-slurm-jobcomp`) the record names its run attempt, and `JOBSTATE=PENDING` is
//!   a requeue (`evicted`) of attempt `RESTARTCNT`.
//! - **`sacct -P`** (`|`-separated). Columns come from a header line (`JobID|JobName|…`) or a
//!   `--format=` comment when present, else APEL's `JobID,JobName,User,Group,Start,End,Elapsed,
//!   CPUTimeRAW,Partition,NCPUS,NNodes,NodeList,MaxRSS,MaxVMSize,State`. Start/End are local
//!   times. The `CPUTimeRAW` column is allocated core-seconds (elapsed × cores), not CPU used,
//!   so it is not reported; a `TotalCPU` value there (`[D-]HH:MM:SS`, `MM:SS.mmm`) is.
//!
//! A step line (`278952.batch`) is an event of job `278952` whose identity is the step
//! (`step=batch`), so it does not collide with the allocation's own line.
//!
//! | Slurm state | state |
//! |---|---|
//! | `PENDING` | `queued` |
//! | `RUNNING` (and a jobcomp start record) | `started` |
//! | `SUSPENDED` | `held` |
//! | `PREEMPTED`, `REQUEUED` | `evicted` |
//! | `COMPLETED`, `FAILED`, `TIMEOUT`, `NODE_FAIL`, `OUT_OF_MEMORY`, `DEADLINE`, `BOOT_FAIL` | `finished` |
//! | `CANCELLED` (`CANCELLED by <uid>`) | `cancelled` |
//!
//! Other states (`RESIZING`, `REVOKED`, …) are counted as skipped.

use jiff::{Timestamp, tz::TimeZone};

use crate::{
    event::{LrmsEvent, LrmsKind, State},
    parse::{Item, JsonRecord, MAX_RECORD_BYTES, ParseOptions, Parser, host_name},
    pbs::pbs_size,
    time,
};

/// The state of a Slurm state name (short codes accepted), `None` for one we do not report.
pub fn slurm_state(s: &str) -> Option<State> {
    let base = s.split_whitespace().next().unwrap_or("");
    Some(match base {
        "PENDING" | "PD" => State::Queued,
        "RUNNING" | "R" => State::Started,
        "SUSPENDED" | "S" => State::Held,
        "PREEMPTED" | "PR" | "REQUEUED" | "RQ" => State::Evicted,
        "COMPLETED" | "CD" | "FAILED" | "F" | "TIMEOUT" | "TO" | "NODE_FAIL" | "NF"
        | "OUT_OF_MEMORY" | "OOM" | "DEADLINE" | "DL" | "BOOT_FAIL" | "BF" => State::Finished,
        "CANCELLED" | "CA" => State::Cancelled,
        _ => return None,
    })
}

const APEL_COLUMNS: [&str; 15] = [
    "JobID",
    "JobName",
    "User",
    "Group",
    "Start",
    "End",
    "Elapsed",
    "CPUTimeRAW",
    "Partition",
    "NCPUS",
    "NNodes",
    "NodeList",
    "MaxRSS",
    "MaxVMSize",
    "State",
];

/// `exit:signal` → (exit code, signal).
fn exit_pair(v: &str) -> Option<(i32, i32)> {
    let (c, s) = v.split_once(':')?;
    Some((c.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// `438.50M`, `1567524K`, `1.40G`, `1024` → bytes (binary multiples, as sacct prints them).
fn slurm_size(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let (num, mult) = match v.as_bytes()[v.len() - 1] {
        b'K' | b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        b'T' | b't' => (&v[..v.len() - 1], 1 << 40),
        _ => (v, 1),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let bytes = n * mult as f64;
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Splits `278952.batch` into (`278952`, Some(`batch`)).
fn split_step(id: &str) -> (&str, Option<&str>) {
    match id.split_once('.') {
        Some((job, step)) => (job, Some(step)),
        None => (id, None),
    }
}

fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'[' | b']' | b'-' | b','))
}

/// The Slurm parser.
#[derive(Debug)]
pub struct SlurmParser {
    tz: TimeZone,
    columns: Vec<String>,
    json: Option<JsonRecord>,
    env: Vec<(String, String)>,
    env_line: u64,
}

impl SlurmParser {
    /// A parser reading `sacct`'s local times in `opts.tz`.
    pub fn new(opts: ParseOptions) -> Self {
        Self {
            tz: opts.tz,
            columns: APEL_COLUMNS.iter().map(|c| (*c).to_owned()).collect(),
            json: None,
            env: Vec::new(),
            env_line: 0,
        }
    }

    fn sacct(&self, line: &str, line_no: u64) -> Item {
        let fields: Vec<&str> = line.split('|').collect();
        // `sacct -p` ends every line with a `|`.
        let fields = match fields.split_last() {
            Some((last, rest)) if last.is_empty() && fields.len() == self.columns.len() + 1 => {
                rest.to_vec()
            }
            _ => fields,
        };
        if fields.len() != self.columns.len() {
            return Item::malformed(
                line_no,
                format!(
                    "sacct line has {} fields, expected {}",
                    fields.len(),
                    self.columns.len()
                ),
            );
        }
        let get = |name: &str| {
            // A column may name alternatives (`CPUTimeRAW|TotalCPU` in APEL's format comment).
            self.columns
                .iter()
                .position(|c| c.split('|').any(|n| n.eq_ignore_ascii_case(name)))
                .map(|i| fields[i].trim())
                .filter(|v| !v.is_empty() && *v != "Unknown" && *v != "None")
        };
        let Some(full_id) = get("JobID") else {
            return Item::malformed(line_no, "sacct line without a JobID");
        };
        let (job, step) = split_step(full_id);
        if !valid_job_id(job) {
            return Item::malformed(line_no, format!("bad JobID {full_id:?}"));
        }
        let Some(state_text) = get("State") else {
            return Item::malformed(line_no, "sacct line without a State");
        };
        let Some(state) = slurm_state(state_text) else {
            return Item::skipped(line_no, format!("sacct {state_text}"));
        };
        let when = |name: &str| -> Result<Option<Timestamp>, String> {
            get(name)
                .map(|v| time::iso(v, &self.tz).ok_or_else(|| format!("bad {name} time {v:?}")))
                .transpose()
        };
        let (start, end) = match (when("Start"), when("End")) {
            (Ok(s), Ok(e)) => (s, e),
            (Err(e), _) | (_, Err(e)) => return Item::malformed(line_no, e),
        };
        let t = match state {
            State::Queued => get("Submit").and_then(|v| time::iso(v, &self.tz)),
            State::Started => start,
            _ => end.or(start),
        };
        let Some(t) = t else {
            return Item::skipped(line_no, format!("sacct {state_text} without a time"));
        };
        let mut e = LrmsEvent::new(LrmsKind::Slurm, job, state, t, "sacct");
        e.identity = step.map(|s| format!("step={s}"));
        let u = &mut e.usage;
        u.job_name = get("JobName").map(str::to_owned);
        u.user = get("User").map(str::to_owned);
        u.group = get("Group").map(str::to_owned);
        u.queue = get("Partition").map(str::to_owned);
        u.start_time = start;
        u.wall_s = get("Elapsed").and_then(time::duration_s).map(|s| s as u64);
        let cpu = get("TotalCPU").or(get("CPUTimeRAW"));
        u.cpu_total_s = cpu.filter(|v| v.contains(':')).and_then(time::duration_s);
        u.cores = get("NCPUS").and_then(|v| v.parse().ok());
        u.exec_host = get("NodeList").map(str::to_owned);
        u.host = u.exec_host.as_deref().and_then(host_name);
        u.memory_bytes = get("MaxRSS").and_then(slurm_size);
        u.virtual_memory_bytes = get("MaxVMSize").and_then(slurm_size);
        if let Some((c, s)) = get("ExitCode").and_then(exit_pair) {
            u.exit_code = Some(c);
            u.exit_signal = (s != 0).then_some(s);
        }
        if state == State::Cancelled {
            u.reason = Some(state_text.to_owned());
        }
        Item::event(e)
    }

    fn jobcomp_json(&self, rec: JsonRecord) -> Item {
        let line = rec.line;
        let v: serde_json::Value = match serde_json::from_str(&rec.text) {
            Ok(v) => v,
            Err(e) => return Item::malformed(line, format!("invalid JSON: {e}")),
        };
        let Some(o) = v.as_object() else {
            return Item::malformed(line, "jobcomp record is not an object");
        };
        let s = |k: &str| {
            o.get(k)
                .and_then(serde_json::Value::as_str)
                .filter(|v| !v.is_empty())
        };
        let int = |k: &str| o.get(k).and_then(serde_json::Value::as_i64);
        let Some(jobid) = int("jobid").filter(|j| *j > 0) else {
            return Item::malformed(line, "jobcomp record without a jobid");
        };
        // jobcomp writes UTC without a zone designator.
        let utc_time = |k: &str| -> Result<Option<Timestamp>, String> {
            s(k).map(|v| time::iso(v, &TimeZone::UTC).ok_or_else(|| format!("bad {k} {v:?}")))
                .transpose()
        };
        let (start, end, submit) = match (utc_time("@start"), utc_time("@end"), utc_time("@submit"))
        {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Item::malformed(line, e),
        };
        let (state, what) = match s("state") {
            None => (State::Started, "jobcomp start".to_owned()),
            Some(st) => match slurm_state(st) {
                Some(state) => (state, format!("jobcomp {st}")),
                None => return Item::skipped(line, format!("jobcomp {st}")),
            },
        };
        let t = match state {
            State::Queued => submit,
            State::Started => start,
            _ => end.or(start),
        };
        let Some(t) = t else {
            return Item::malformed(line, format!("{what} record without its time"));
        };
        let mut e = LrmsEvent::new(LrmsKind::Slurm, jobid.to_string(), state, t, "jobcomp");
        let u = &mut e.usage;
        u.user = s("username").map(str::to_owned);
        u.group = s("groupname").map(str::to_owned);
        u.queue = s("partition").map(str::to_owned);
        u.job_name = s("job_name").map(str::to_owned);
        u.exec_host = s("nodes").map(str::to_owned);
        u.host = u.exec_host.as_deref().and_then(host_name);
        u.cores = int("total_cpus").and_then(|v| u32::try_from(v).ok());
        u.wall_s = int("elapsed").and_then(|v| u64::try_from(v).ok());
        u.start_time = start;
        u.submit_time = submit;
        if let Some((c, sig)) = s("exit_code").and_then(exit_pair) {
            u.exit_code = Some(c);
            u.exit_signal = (sig != 0).then_some(sig);
        }
        u.memory_request_bytes = s("tres_alloc").and_then(|t| {
            t.split(',')
                .find_map(|kv| kv.strip_prefix("mem="))
                .and_then(pbs_size)
        });
        if state == State::Cancelled {
            u.reason = s("state").map(str::to_owned);
        }
        Item::event(e)
    }

    fn jobcomp_env(&mut self) -> Option<Item> {
        if self.env.is_empty() {
            return None;
        }
        let env = std::mem::take(&mut self.env);
        let line = self.env_line;
        let get = |k: &str| {
            env.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };
        let Some(jobid) = get("JOBID").filter(|j| valid_job_id(j)) else {
            return Some(Item::malformed(
                line,
                "jobcomp/script record without a valid JOBID",
            ));
        };
        let Some(st) = get("JOBSTATE") else {
            return Some(Item::malformed(
                line,
                "jobcomp/script record without JOBSTATE",
            ));
        };
        let Some(state) = slurm_state(st) else {
            return Some(Item::skipped(line, format!("jobcomp/script {st}")));
        };
        // WNoDeS's jobcomp hook (`slurm/wnodes-slurm-jobcomp`) adds the job's restart count as
        // squeue shows it when the record is written. jobcomp logs a requeue with
        // `JOBSTATE=PENDING` (the job waits again) and the count already incremented: the run
        // that ended is attempt `RESTARTCNT`, and it was requeued (evicted). Any other record
        // ends attempt `RESTARTCNT + 1`. Without the field, attempt 1 as before.
        let restarts = get("RESTARTCNT").and_then(|v| v.parse::<u32>().ok());
        let (state, attempt) = match (state, restarts) {
            (State::Queued | State::Evicted, Some(n)) => (State::Evicted, n.max(1)),
            (s, Some(n)) => (s, n.saturating_add(1)),
            (s, None) => (s, 1),
        };
        let epoch = |k: &str| {
            get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .filter(|v| *v > 0)
                .and_then(time::epoch)
        };
        let t = match state {
            State::Queued => epoch("SUBMIT"),
            State::Started => epoch("START"),
            _ => epoch("END").or(epoch("START")),
        };
        let Some(t) = t else {
            return Some(Item::malformed(
                line,
                "jobcomp/script record without its time",
            ));
        };
        let mut e = LrmsEvent::new(LrmsKind::Slurm, jobid, state, t, "jobcomp/script");
        e.run_attempt = attempt;
        let u = &mut e.usage;
        u.user = get("USERNAME").map(str::to_owned);
        u.group = get("GROUPNAME").map(str::to_owned);
        u.queue = get("PARTITION").map(str::to_owned);
        u.job_name = get("JOBNAME").map(str::to_owned);
        u.exec_host = get("NODES").map(str::to_owned);
        u.host = u.exec_host.as_deref().and_then(host_name);
        u.cores = get("PROCS").and_then(|v| v.parse().ok());
        u.submit_time = epoch("SUBMIT");
        u.start_time = epoch("START");
        if let (Some(s), Some(en)) = (epoch("START"), epoch("END")) {
            u.wall_s = u64::try_from(en.as_second() - s.as_second()).ok();
        }
        if let Some((c, sig)) = get("EXITCODE").and_then(exit_pair) {
            u.exit_code = Some(c);
            u.exit_signal = (sig != 0).then_some(sig);
        }
        if state == State::Cancelled {
            u.reason = Some(st.to_owned());
        }
        Some(Item::event(e))
    }

    fn set_columns(&mut self, spec: &str, sep: char) {
        let cols: Vec<String> = spec.split(sep).map(|c| c.trim().to_owned()).collect();
        if cols.iter().any(|c| c.eq_ignore_ascii_case("JobID")) {
            self.columns = cols;
        }
    }
}

/// `KEY=VALUE` with an upper-case shell-variable key.
fn env_pair(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once('=')?;
    let ok = !k.is_empty()
        && k.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && k.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    ok.then_some((k, v))
}

impl Parser for SlurmParser {
    fn lrms(&self) -> LrmsKind {
        LrmsKind::Slurm
    }

    fn line(&mut self, line: &str, line_no: u64, out: &mut Vec<Item>) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(j) = self.json.as_mut() {
            if j.text.len() + line.len() > MAX_RECORD_BYTES {
                let start = j.line;
                self.json = None;
                out.push(Item::malformed(
                    start,
                    "JSON record longer than the record limit",
                ));
            } else if j.feed(line) {
                let rec = self.json.take().unwrap_or_else(|| JsonRecord::new(line_no));
                out.push(self.jobcomp_json(rec));
            }
            return;
        }
        if let Some((k, v)) = env_pair(line) {
            if k == "JOBID"
                && !self.env.is_empty()
                && let Some(i) = self.jobcomp_env()
            {
                out.push(i);
            }
            if self.env.is_empty() {
                self.env_line = line_no;
            }
            if self.env.len() < 1000 {
                self.env.push((k.to_owned(), v.to_owned()));
            }
            return;
        }
        if let Some(i) = self.jobcomp_env() {
            out.push(i);
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            if let Some((_, fmt)) = comment.split_once("--format=") {
                let spec = fmt.split_whitespace().next().unwrap_or("");
                self.set_columns(spec, ',');
            }
            return;
        }
        if trimmed.starts_with('{') {
            let mut j = JsonRecord::new(line_no);
            if j.feed(line) {
                out.push(self.jobcomp_json(j));
            } else {
                self.json = Some(j);
            }
            return;
        }
        if line.contains('|') {
            if line
                .split('|')
                .next()
                .is_some_and(|c| c.eq_ignore_ascii_case("JobID"))
            {
                self.set_columns(line.trim_end_matches('|'), '|');
                return;
            }
            out.push(self.sacct(line, line_no));
            return;
        }
        out.push(Item::malformed(
            line_no,
            "neither a sacct line, a jobcomp JSON record nor KEY=VALUE",
        ));
    }

    fn pending_since(&self) -> Option<u64> {
        match (&self.json, self.env.is_empty()) {
            (Some(j), _) => Some(j.line),
            (None, false) => Some(self.env_line),
            (None, true) => None,
        }
    }

    fn flush_held(&mut self, _out: &mut Vec<Item>) {}

    fn finish(&mut self, out: &mut Vec<Item>) {
        if let Some(i) = self.jobcomp_env() {
            out.push(i);
        }
        if let Some(j) = self.json.take() {
            out.push(Item::malformed(
                j.line,
                "JSON record not closed at end of input",
            ));
        }
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "columns": self.columns })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> bool {
        match state
            .get("columns")
            .and_then(|c| serde_json::from_value::<Vec<String>>(c.clone()).ok())
        {
            Some(c) if !c.is_empty() => {
                self.columns = c;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_states_and_exit_pairs() {
        assert_eq!(slurm_size("438.50M"), Some(459_800_576));
        assert_eq!(slurm_size("1567524K"), Some(1_567_524 * 1024));
        assert_eq!(slurm_size(""), None);
        assert_eq!(slurm_size("-1K"), None);
        assert_eq!(slurm_state("CANCELLED by 1000"), Some(State::Cancelled));
        assert_eq!(slurm_state("RESIZING"), None);
        assert_eq!(exit_pair("0:15"), Some((0, 15)));
        assert_eq!(split_step("278952.batch"), ("278952", Some("batch")));
    }
}
