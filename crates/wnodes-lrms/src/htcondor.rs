//! HTCondor job event log ("user log", ULOG): the text form (ISO and legacy dates, bodies
//! indented with tabs or spaces, `...` separators) and the JSON form (one ClassAd object per
//! event, on one line or several).
//!
//! | number | event | state |
//! |---|---|---|
//! | 000 | submit | `queued` (held back until the next record: a 028 job ad triggered by the submit adds the image hint) |
//! | 001 | execute | `started` (host, slot cores/memory/disk) |
//! | 004 | evicted | `evicted` (code/subcode, `Reason:`, CPU times) |
//! | 005 | terminated | `finished` (return value or signal, Usr/Sys times, Partitionable Resources table) |
//! | 006 | image size | enriches the job's next 004/005 with its memory (not emitted) |
//! | 009 | aborted | `cancelled` (reason) |
//! | 012 | held | `held` (reason, code, subcode) |
//! | 013 | released | `released` (reason) |
//! | 028 | job ad information | enriches the submit it follows (not emitted) |
//!
//! Other event numbers are counted as skipped. Events of placeholder jobs (negative cluster or
//! proc, as in HTCondor's own `test_condor.log`) are skipped too.
//!
//! Run attempts: HTCondor's text log does not carry `NumJobStarts`, so the attempt is the number
//! of 001 events seen for the job (at least 1). That count is parser state, saved with a
//! follower's cursor. Holds and releases can repeat within a run: their identity is their LRMS
//! time (`t<epoch seconds>`).

use std::collections::HashMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    event::{LrmsEvent, LrmsKind, State},
    parse::{Item, JsonRecord, MAX_RECORD_BYTES, ParseOptions, Parser, host_name},
    time,
};

/// Jobs whose state is kept (attempts, host, last image size). Past it the oldest are dropped:
/// a dropped job's next attempt restarts at 1.
const MAX_JOBS: usize = 200_000;

/// A parsed header: event number, cluster, proc, time, the text after the time.
type Header = (u16, i64, i64, Timestamp, String);

/// A text record being assembled.
#[derive(Debug)]
struct TextRecord {
    line: u64,
    number: u16,
    cluster: i64,
    proc_: i64,
    time: Timestamp,
    first: String,
    body: Vec<String>,
    bytes: usize,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct JobState {
    /// 001 events seen.
    starts: u32,
    /// Last 006: ResidentSetSize (KiB) and MemoryUsage (MiB).
    rss_kb: Option<u64>,
    mem_mb: Option<u64>,
    /// Order of first sight, for trimming.
    seq: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    jobs: HashMap<String, JobState>,
    seq: u64,
    year: i16,
    last_month: i8,
}

/// The HTCondor parser.
#[derive(Debug)]
pub struct HtcondorParser {
    opts: ParseOptions,
    text: Option<TextRecord>,
    json: Option<JsonRecord>,
    /// A submit waiting for its 028, with the line its record starts on.
    held: Option<(u64, LrmsEvent)>,
    st: SavedState,
}

impl HtcondorParser {
    /// A parser reading times per `opts`.
    pub fn new(opts: ParseOptions) -> Self {
        let st = SavedState {
            year: opts.year,
            ..Default::default()
        };
        Self {
            opts,
            text: None,
            json: None,
            held: None,
            st,
        }
    }

    fn job(&mut self, id: &str) -> &mut JobState {
        if !self.st.jobs.contains_key(id) && self.st.jobs.len() >= MAX_JOBS {
            // Drop the older half: bounded memory on a log of millions of jobs.
            let mut seqs: Vec<u64> = self.st.jobs.values().map(|j| j.seq).collect();
            seqs.sort_unstable();
            let cut = seqs[seqs.len() / 2];
            self.st.jobs.retain(|_, j| j.seq >= cut);
        }
        self.st.seq += 1;
        let seq = self.st.seq;
        self.st
            .jobs
            .entry(id.to_owned())
            .or_insert_with(|| JobState {
                seq,
                ..Default::default()
            })
    }

    fn attempt(&self, id: &str) -> u32 {
        self.st.jobs.get(id).map_or(1, |j| j.starts.max(1))
    }

    /// Parses `NNN (c.p.s) <date> <time> <text>`.
    fn header(&mut self, line: &str) -> Result<Option<Header>, String> {
        let b = line.as_bytes();
        if b.len() < 6 || !b[..3].iter().all(u8::is_ascii_digit) || b[3] != b' ' || b[4] != b'(' {
            return Ok(None);
        }
        let number: u16 = line[..3].parse().map_err(|_| "bad event number")?;
        let close = line.find(')').ok_or("no ')' after the job id")?;
        let ids: Vec<&str> = line[5..close].split('.').collect();
        let [c, p, s] = ids.as_slice() else {
            return Err("job id is not cluster.proc.subproc".into());
        };
        let num = |x: &str| -> Result<i64, String> {
            let (neg, d) = x.strip_prefix('-').map_or((false, x), |d| (true, d));
            let v = time::digits(d).ok_or_else(|| format!("bad job id component {x:?}"))?;
            Ok(if neg { -v } else { v })
        };
        let (cluster, proc_, _sub) = (num(c)?, num(p)?, num(s)?);
        let rest = line[close + 1..]
            .strip_prefix(' ')
            .ok_or("no space after the job id")?;
        let (time, text) = self.date(rest)?;
        Ok(Some((number, cluster, proc_, time, text.to_owned())))
    }

    /// The date forms of `ULogEvent::readHeader`; returns the instant and the text after it.
    fn date<'a>(&mut self, rest: &'a str) -> Result<(Timestamp, &'a str), String> {
        let (tok, after) = rest.split_once(' ').unwrap_or((rest, ""));
        let b = tok.as_bytes();
        if b.len() == 5 && b[2] == b'/' {
            // Legacy MM/DD HH:MM:SS, no year.
            let (m, d) = (
                time::digits(&tok[..2]).ok_or("bad month")?,
                time::digits(&tok[3..]).ok_or("bad day")?,
            );
            let (clock, text) = after.split_once(' ').unwrap_or((after, ""));
            let (h, mi, s) = time::hms(clock).ok_or("bad time of day")?;
            let month = i8::try_from(m).map_err(|_| "bad month")?;
            if self.st.last_month != 0 && month + 6 < self.st.last_month {
                self.st.year += 1; // the log crossed New Year
            }
            self.st.last_month = month;
            let dt =
                time::civil(i64::from(self.st.year), m, d, h, mi, s).ok_or("date out of range")?;
            let t = time::local(dt, &self.opts.tz).ok_or("date out of range")?;
            return Ok((t, text));
        }
        if tok.len() == 10 {
            // ISO date, space, time[.mmm][Z|offset].
            let (clock, text) = after.split_once(' ').unwrap_or((after, ""));
            let t = time::iso(&format!("{tok} {clock}"), &self.opts.tz)
                .ok_or("bad ISO date or time")?;
            return Ok((t, text));
        }
        let t = time::iso(tok, &self.opts.tz).ok_or("bad date")?;
        Ok((t, after))
    }

    fn emit_held(&mut self, out: &mut Vec<Item>) {
        if let Some((_, e)) = self.held.take() {
            out.push(Item::event(e));
        }
    }

    /// Routes a finished event: a submit is held back; a 028 enriches the held submit.
    fn deliver(&mut self, ev: Outcome, out: &mut Vec<Item>) {
        match ev {
            Outcome::Event(e, line) if e.state == State::Queued => {
                self.emit_held(out);
                self.held = Some((line, *e));
            }
            Outcome::Event(e, _) => {
                self.emit_held(out);
                out.push(Item::Event(e));
            }
            Outcome::JobAd {
                line,
                job_id,
                trigger,
                attrs,
            } => {
                if let Some((_, h)) = self.held.as_mut()
                    && h.job_id == job_id
                    && trigger.is_none_or(|t| t == 0)
                {
                    if let Some(img) = attrs.get(&self.opts.image_attribute) {
                        h.usage.image_hint = Some(img.clone());
                    }
                    if h.usage.user.is_none() {
                        h.usage.user = attrs.get("Owner").cloned();
                    }
                    if let Some(c) = attrs.get("RequestCpus").and_then(|v| v.parse().ok()) {
                        h.usage.cores = Some(c);
                    }
                    if let Some(m) = attrs
                        .get("RequestMemory")
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        h.usage.memory_request_bytes = Some(m.saturating_mul(1 << 20));
                    }
                }
                self.emit_held(out);
                out.push(Item::skipped(line, "028"));
            }
            Outcome::Skip { line, what } => {
                self.emit_held(out);
                out.push(Item::skipped(line, what));
            }
            Outcome::Malformed { line, reason } => {
                self.emit_held(out);
                out.push(Item::malformed(line, reason));
            }
        }
    }

    fn finish_text(&mut self, rec: TextRecord, out: &mut Vec<Item>) {
        let o = self.interpret_text(rec);
        self.deliver(o, out);
    }

    fn interpret_text(&mut self, r: TextRecord) -> Outcome {
        if r.cluster < 0 || r.proc_ < 0 {
            return Outcome::skip(r.line, format!("{:03} (no job)", r.number));
        }
        let job_id = format!("{}.{}", r.cluster, r.proc_);
        let rec = format!("{:03}", r.number);
        let body: Vec<&str> = r.body.iter().map(|l| l.trim()).collect();
        let mk = |state| {
            LrmsEvent::new(
                LrmsKind::Htcondor,
                job_id.clone(),
                state,
                r.time,
                rec.clone(),
            )
        };
        match r.number {
            0 => {
                let mut e = mk(State::Queued);
                e.usage.submit_time = Some(r.time);
                Outcome::event(e, r.line)
            }
            1 => {
                let mut e = mk(State::Started);
                let exec = r
                    .first
                    .strip_prefix("Job executing on host:")
                    .map(str::trim)
                    .filter(|s| !s.is_empty());
                e.usage.exec_host = exec.map(str::to_owned);
                e.usage.host = exec.and_then(host_name);
                e.usage.start_time = Some(r.time);
                for l in &body {
                    if let Some(slot) = l.strip_prefix("SlotName:") {
                        if e.usage.host.is_none() {
                            e.usage.host = host_name(slot.trim());
                        }
                    } else if let Some((k, v)) = l.split_once(" = ") {
                        match k.trim() {
                            "Cpus" => e.usage.cores = v.trim().parse().ok(),
                            "Memory" => {
                                e.usage.memory_request_bytes = v
                                    .trim()
                                    .parse::<u64>()
                                    .ok()
                                    .map(|m| m.saturating_mul(1 << 20))
                            }
                            _ => {}
                        }
                    }
                }
                let j = self.job(&job_id);
                j.starts = j.starts.saturating_add(1);
                e.run_attempt = j.starts;
                Outcome::event(e, r.line)
            }
            4 => {
                let mut e = mk(State::Evicted);
                e.run_attempt = self.attempt(&job_id);
                if let Some(cs) = r.first.strip_prefix("Job was evicted.") {
                    let (c, s) = code_subcode(cs);
                    e.usage.hold_code = c;
                    e.usage.hold_subcode = s;
                }
                for l in &body {
                    if let Some(reason) = l.strip_prefix("Reason:") {
                        e.usage.reason = Some(reason.trim().to_owned());
                    }
                }
                read_usage(&body, &r.body, &mut e);
                self.apply_image_size(&job_id, &mut e);
                Outcome::event(e, r.line)
            }
            5 => {
                let mut e = mk(State::Finished);
                e.run_attempt = self.attempt(&job_id);
                for l in &body {
                    if let Some(v) = between(l, "(return value ", ")") {
                        e.usage.exit_code = v.parse().ok();
                    } else if let Some(v) = between(l, "(signal ", ")") {
                        e.usage.exit_signal = v.parse().ok();
                    }
                }
                read_usage(&body, &r.body, &mut e);
                self.apply_image_size(&job_id, &mut e);
                self.st.jobs.remove(&job_id);
                Outcome::event(e, r.line)
            }
            6 => {
                let size = r
                    .first
                    .strip_prefix("Image size of job updated:")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if size.is_none() {
                    return Outcome::Malformed {
                        line: r.line,
                        reason: "006 without an image size".into(),
                    };
                }
                let mut mem = None;
                let mut rss = None;
                for l in &body {
                    if let Some((v, what)) = l.split_once("  -  ") {
                        match what.trim() {
                            "MemoryUsage of job (MB)" => mem = v.trim().parse().ok(),
                            "ResidentSetSize of job (KB)" => rss = v.trim().parse().ok(),
                            _ => {}
                        }
                    }
                }
                let j = self.job(&job_id);
                j.mem_mb = mem.or(j.mem_mb);
                j.rss_kb = rss.or(j.rss_kb);
                Outcome::skip(r.line, "006")
            }
            9 => {
                let mut e = mk(State::Cancelled);
                e.run_attempt = self.attempt(&job_id);
                e.usage.reason = body
                    .first()
                    .filter(|s| !s.is_empty())
                    .map(|s| (*s).to_owned());
                self.st.jobs.remove(&job_id);
                Outcome::event(e, r.line)
            }
            12 => {
                let mut e = mk(State::Held);
                e.run_attempt = self.attempt(&job_id);
                e.identity = Some(format!("t{}", r.time.as_second()));
                for l in &body {
                    if let Some(cs) = l.strip_prefix("Code ") {
                        let (c, s) = code_subcode(&format!(" Code {cs}"));
                        e.usage.hold_code = c;
                        e.usage.hold_subcode = s;
                    } else if e.usage.reason.is_none() && !l.is_empty() {
                        e.usage.reason = Some((*l).to_owned());
                    }
                }
                Outcome::event(e, r.line)
            }
            13 => {
                let mut e = mk(State::Released);
                e.run_attempt = self.attempt(&job_id);
                e.identity = Some(format!("t{}", r.time.as_second()));
                e.usage.reason = body
                    .first()
                    .filter(|s| !s.is_empty())
                    .map(|s| (*s).to_owned());
                Outcome::event(e, r.line)
            }
            28 => {
                let mut attrs = HashMap::new();
                for l in &r.body {
                    if let Some((k, v)) = l.split_once(" = ") {
                        attrs.insert(k.trim().to_owned(), classad_value(v.trim()));
                    }
                }
                let trigger = attrs
                    .get("TriggerEventTypeNumber")
                    .and_then(|v| v.parse().ok());
                Outcome::JobAd {
                    line: r.line,
                    job_id,
                    trigger,
                    attrs,
                }
            }
            n => Outcome::skip(r.line, format!("{n:03}")),
        }
    }

    /// A 006 seen earlier gives the run's memory when the record has none.
    fn apply_image_size(&self, job_id: &str, e: &mut LrmsEvent) {
        if e.usage.memory_bytes.is_some() {
            return;
        }
        if let Some(j) = self.st.jobs.get(job_id) {
            e.usage.memory_bytes = j
                .rss_kb
                .map(|k| k.saturating_mul(1024))
                .or(j.mem_mb.map(|m| m.saturating_mul(1 << 20)));
        }
    }

    fn interpret_json(&mut self, rec: JsonRecord) -> Outcome {
        let line = rec.line;
        let bad = |reason: String| Outcome::Malformed { line, reason };
        let v: serde_json::Value = match serde_json::from_str(&rec.text) {
            Ok(v) => v,
            Err(e) => return bad(format!("invalid JSON: {e}")),
        };
        let Some(o) = v.as_object() else {
            return bad("JSON event is not an object".into());
        };
        let int = |k: &str| o.get(k).and_then(serde_json::Value::as_i64);
        let string = |k: &str| {
            o.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let Some(number) = int("EventTypeNumber").and_then(|n| u16::try_from(n).ok()) else {
            return bad("JSON event without EventTypeNumber".into());
        };
        let (Some(cluster), Some(proc_)) = (int("Cluster"), int("Proc")) else {
            return bad("JSON event without Cluster/Proc".into());
        };
        let Some(t) = string("EventTime").and_then(|s| time::iso(&s, &self.opts.tz)) else {
            return bad("JSON event without a valid EventTime".into());
        };
        // Build the text form's body lines from the attributes, then reuse its interpretation.
        let mut first = String::new();
        let mut body = Vec::new();
        match number {
            1 => {
                first = format!(
                    "Job executing on host: {}",
                    string("ExecuteHost").unwrap_or_default()
                );
                for (k, attr) in [("Cpus", "Cpus"), ("Memory", "Memory")] {
                    if let Some(v) = int(attr) {
                        body.push(format!("{k} = {v}"));
                    }
                }
                if let Some(s) = string("SlotName") {
                    body.push(format!("SlotName: {s}"));
                }
            }
            4 | 5 => {
                if number == 4 {
                    first = "Job was evicted.".into();
                    if let (Some(c), Some(s)) = (int("ReasonCode"), int("ReasonSubCode")) {
                        first = format!("Job was evicted. Code {c} Subcode {s}");
                    }
                    if let Some(r) = string("Reason") {
                        body.push(format!("Reason: {r}"));
                    }
                }
                let normal = o
                    .get("TerminatedNormally")
                    .and_then(serde_json::Value::as_bool);
                if let (Some(true), Some(rv)) = (normal, int("ReturnValue")) {
                    body.push(format!("(1) Normal termination (return value {rv})"));
                } else if let (Some(false), Some(sig)) = (normal, int("TerminatedBySignal")) {
                    body.push(format!("(0) Abnormal termination (signal {sig})"));
                }
                if let Some(u) = string("RunRemoteUsage") {
                    body.push(format!("{u}  -  Run Remote Usage"));
                }
            }
            6 => {
                first = format!("Image size of job updated: {}", int("Size").unwrap_or(0));
                if let Some(m) = int("MemoryUsage") {
                    body.push(format!("{m}  -  MemoryUsage of job (MB)"));
                }
                if let Some(r) = int("ResidentSetSize") {
                    body.push(format!("{r}  -  ResidentSetSize of job (KB)"));
                }
            }
            9 | 13 => body.push(string("Reason").unwrap_or_default()),
            12 => {
                body.push(string("HoldReason").unwrap_or_default());
                body.push(format!(
                    "Code {} Subcode {}",
                    int("HoldReasonCode").unwrap_or(0),
                    int("HoldReasonSubCode").unwrap_or(0)
                ));
            }
            28 => {
                for (k, v) in o {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    body.push(format!("{k} = {v}"));
                }
            }
            _ => {}
        }
        let mut out = self.interpret_text(TextRecord {
            line,
            number,
            cluster,
            proc_,
            time: t,
            first,
            body,
            bytes: 0,
        });
        // The JSON form carries the usage ad directly.
        if let Outcome::Event(e, _) = &mut out
            && matches!(number, 4 | 5)
        {
            let u = &mut e.usage;
            if let Some(c) = int("Cpus").and_then(|c| u32::try_from(c).ok()) {
                u.cores = Some(c);
            }
            if let Some(m) = int("MemoryUsage").and_then(|m| u64::try_from(m).ok()) {
                u.memory_bytes = Some(m.saturating_mul(1 << 20));
            }
            if let Some(d) = int("DiskUsage").and_then(|d| u64::try_from(d).ok()) {
                u.disk_bytes = Some(d.saturating_mul(1024));
            }
        }
        out
    }
}

#[derive(Debug)]
enum Outcome {
    /// An event and the line its record starts on.
    Event(Box<LrmsEvent>, u64),
    JobAd {
        line: u64,
        job_id: String,
        trigger: Option<i64>,
        attrs: HashMap<String, String>,
    },
    Skip {
        line: u64,
        what: String,
    },
    Malformed {
        line: u64,
        reason: String,
    },
}

impl Outcome {
    fn event(e: LrmsEvent, line: u64) -> Self {
        Self::Event(Box::new(e), line)
    }
    fn skip(line: u64, what: impl Into<String>) -> Self {
        Self::Skip {
            line,
            what: what.into(),
        }
    }
}

/// ` Code C Subcode S` → (C, S).
fn code_subcode(s: &str) -> (Option<i32>, Option<i32>) {
    let c = between(s, "Code ", " ").and_then(|v| v.parse().ok());
    let sub = s
        .split_once("Subcode ")
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    (c, sub)
}

/// The text between `start` and the next `end`.
fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let (_, rest) = s.split_once(start)?;
    Some(rest.split_once(end).map_or(rest, |(v, _)| v).trim())
}

/// `Usr D HH:MM:SS, Sys D HH:MM:SS` → (user s, sys s).
fn rusage(s: &str) -> Option<(f64, f64)> {
    let (usr, sys) = s.split_once(',')?;
    let one = |p: &str, tag: &str| -> Option<f64> {
        let mut it = p.trim().strip_prefix(tag)?.split_whitespace();
        let days = time::digits(it.next()?)?;
        let (h, m, s) = time::hms(it.next()?)?;
        let v = days
            .checked_mul(86400)?
            .checked_add(h * 3600 + m * 60 + s)? as f64;
        (v <= time::MAX_SECONDS).then_some(v)
    };
    Some((one(usr, "Usr")?, one(sys, "Sys")?))
}

/// The Usr/Sys lines and the Partitionable Resources table of 004/005.
fn read_usage(trimmed: &[&str], raw: &[String], e: &mut LrmsEvent) {
    for l in trimmed {
        if let Some(u) = l.strip_suffix("-  Run Remote Usage")
            && let Some((usr, sys)) = rusage(u.trim())
        {
            e.usage.cpu_user_s = Some(usr);
            e.usage.cpu_sys_s = Some(sys);
        }
    }
    let Some(hi) = raw
        .iter()
        .position(|l| l.trim_start().starts_with("Partitionable Resources"))
    else {
        return;
    };
    let header = &raw[hi];
    let Some(colon) = header.find(':') else {
        return;
    };
    // Column names and where each ends (values are right-aligned under them).
    let cols = words(header, colon + 1);
    for row in &raw[hi + 1..] {
        let Some(rc) = row.find(':') else {
            break;
        };
        let label = row[..rc].trim();
        let mut vals: HashMap<&str, &str> = HashMap::new();
        for (tok_end, tok) in words(row, rc + 1) {
            if let Some((_, name)) = cols.iter().min_by_key(|(end, _)| end.abs_diff(tok_end)) {
                vals.insert(name, tok);
            }
        }
        let num = |col: &str| vals.get(col).and_then(|v| v.parse::<f64>().ok());
        match label {
            "Cpus" => {
                if let Some(a) = num("Allocated").or(num("Request")) {
                    e.usage.cores = Some(a as u32);
                }
            }
            "Memory (MB)" => {
                if let Some(u) = num("Usage") {
                    e.usage.memory_bytes = Some((u * 1_048_576.0) as u64);
                }
                if let Some(r) = num("Allocated").or(num("Request")) {
                    e.usage.memory_request_bytes = Some((r * 1_048_576.0) as u64);
                }
            }
            "Disk (KB)" => {
                if let Some(u) = num("Usage") {
                    e.usage.disk_bytes = Some((u * 1024.0) as u64);
                }
            }
            "TimeExecute (s)" => {
                if let Some(u) = num("Usage") {
                    e.usage.wall_s = Some(u as u64);
                }
            }
            _ => {}
        }
    }
}

/// Whitespace-separated words of `s` from byte `from`, with the byte index where each ends.
fn words(s: &str, from: usize) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices().skip_while(|(i, _)| *i < from) {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(st)) => {
                out.push((i, &s[st..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push((s.len(), &s[st..]));
    }
    out
}

/// A ClassAd value as text: strings unquoted (`\"` and `\\` unescaped), anything else as written.
fn classad_value(v: &str) -> String {
    match v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut esc = false;
            for c in inner.chars() {
                if esc {
                    out.push(c);
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => v.to_owned(),
    }
}

impl Parser for HtcondorParser {
    fn lrms(&self) -> LrmsKind {
        LrmsKind::Htcondor
    }

    fn line(&mut self, line: &str, line_no: u64, out: &mut Vec<Item>) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(j) = self.json.as_mut() {
            if j.text.len() + line.len() > MAX_RECORD_BYTES {
                let start = j.line;
                self.json = None;
                self.deliver(
                    Outcome::Malformed {
                        line: start,
                        reason: "JSON event longer than the record limit".into(),
                    },
                    out,
                );
            } else if j.feed(line) {
                let rec = self.json.take().unwrap_or_default();
                let o = self.interpret_json(rec);
                self.deliver(o, out);
            }
            return;
        }
        if self.text.is_some() {
            if line == "..." {
                if let Some(rec) = self.text.take() {
                    self.finish_text(rec, out);
                }
                return;
            }
            match self.header(line) {
                Ok(None) => {
                    let too_long = self
                        .text
                        .as_ref()
                        .is_some_and(|r| r.bytes + line.len() > MAX_RECORD_BYTES);
                    if too_long {
                        let start = self.text.take().map_or(line_no, |r| r.line);
                        self.deliver(
                            Outcome::Malformed {
                                line: start,
                                reason: "event longer than the record limit".into(),
                            },
                            out,
                        );
                    } else if let Some(r) = self.text.as_mut() {
                        r.bytes += line.len();
                        r.body.push(line.to_owned());
                    }
                    return;
                }
                // A new header before `...`: the open record is cut short.
                Ok(Some(_)) | Err(_) => {
                    let start = self.text.take().map_or(line_no, |r| r.line);
                    self.deliver(
                        Outcome::Malformed {
                            line: start,
                            reason: "event not closed by '...'".into(),
                        },
                        out,
                    );
                }
            }
        }
        if line.trim().is_empty() || line == "..." {
            return;
        }
        if line.starts_with('{') {
            let mut j = JsonRecord::new(line_no);
            if j.feed(line) {
                let o = self.interpret_json(j);
                self.deliver(o, out);
            } else {
                self.json = Some(j);
            }
            return;
        }
        match self.header(line) {
            Ok(Some((number, cluster, proc_, time, first))) => {
                self.text = Some(TextRecord {
                    line: line_no,
                    number,
                    cluster,
                    proc_,
                    time,
                    first,
                    body: Vec::new(),
                    bytes: line.len(),
                });
            }
            Ok(None) => self.deliver(
                Outcome::Malformed {
                    line: line_no,
                    reason: "not an event header".into(),
                },
                out,
            ),
            Err(reason) => self.deliver(
                Outcome::Malformed {
                    line: line_no,
                    reason: format!("bad event header: {reason}"),
                },
                out,
            ),
        }
    }

    fn pending_since(&self) -> Option<u64> {
        [
            self.held.as_ref().map(|(line, _)| *line),
            self.text.as_ref().map(|r| r.line),
            self.json.as_ref().map(|j| j.line),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn flush_held(&mut self, out: &mut Vec<Item>) {
        self.emit_held(out);
    }

    fn finish(&mut self, out: &mut Vec<Item>) {
        if let Some(r) = self.text.take() {
            self.deliver(
                Outcome::Malformed {
                    line: r.line,
                    reason: "event not closed by '...' at end of input".into(),
                },
                out,
            );
        }
        if let Some(j) = self.json.take() {
            self.deliver(
                Outcome::Malformed {
                    line: j.line,
                    reason: "JSON event not closed at end of input".into(),
                },
                out,
            );
        }
        self.emit_held(out);
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(&self.st).unwrap_or_default()
    }

    fn load_state(&mut self, state: &serde_json::Value) -> bool {
        match serde_json::from_value::<SavedState>(state.clone()) {
            Ok(st) => {
                self.st = st;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_str;
    use jiff::tz::TimeZone;

    fn opts() -> ParseOptions {
        ParseOptions {
            tz: TimeZone::UTC,
            year: 2025,
            ..Default::default()
        }
    }

    fn events(text: &str) -> Vec<LrmsEvent> {
        parse_str(LrmsKind::Htcondor, opts(), text)
            .into_iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(*e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn terminated_event_in_full() {
        let log = "005 (9231.000.000) 2025-02-13 12:00:19 Job terminated.\n\
\t(1) Normal termination (return value 1)\n\
\t\tUsr 0 00:00:04, Sys 0 00:00:02  -  Run Remote Usage\n\
\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage\n\
\t\tUsr 1 00:00:04, Sys 0 00:00:00  -  Total Remote Usage\n\
\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Total Local Usage\n\
\t6249  -  Run Bytes Sent By Job\n\
\tPartitionable Resources :    Usage  Request Allocated \n\
\t   Cpus                 :        0        1         4 \n\
\t   Disk (KB)            :       90        1      2048 \n\
\t   GPUs                 :                           0 \n\
\t   Memory (MB)          :      949     2048      2048 \n\
\t   TimeExecute (s)      :       10                    \n\
\n\
\tJob terminated of its own accord at 2025-02-13T18:00:19Z with exit-code 1.\n\
...\n";
        let e = &events(log)[0];
        assert_eq!(e.job_id, "9231.0");
        assert_eq!(e.state, State::Finished);
        assert_eq!(e.usage.exit_code, Some(1));
        assert_eq!(e.usage.cpu_user_s, Some(4.0));
        assert_eq!(e.usage.cpu_sys_s, Some(2.0));
        assert_eq!(e.usage.cores, Some(4));
        assert_eq!(e.usage.memory_bytes, Some(949 * 1_048_576));
        assert_eq!(e.usage.disk_bytes, Some(90 * 1024));
        assert_eq!(e.usage.wall_s, Some(10));
    }

    #[test]
    fn signal_and_image_size_enrichment() {
        let log = "001 (7.003.000) 01/02 03:04:05 Job executing on host: <10.0.0.1:9618?alias=wn7.example.org>\n...\n\
006 (7.003.000) 01/02 03:05:00 Image size of job updated: 150\n\t2  -  MemoryUsage of job (MB)\n\t2000  -  ResidentSetSize of job (KB)\n...\n\
005 (7.003.000) 01/02 03:06:00 Job terminated.\n\t(0) Abnormal termination (signal 9)\n\t(0) No core file\n...\n";
        let ev = events(log);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].job_id, "7.3");
        assert_eq!(ev[0].usage.host.as_deref(), Some("wn7.example.org"));
        assert_eq!(ev[0].time.to_string(), "2025-01-02T03:04:05Z");
        assert_eq!(ev[1].usage.exit_signal, Some(9));
        assert_eq!(ev[1].usage.exit_code, None);
        assert_eq!(ev[1].usage.memory_bytes, Some(2000 * 1024));
    }

    #[test]
    fn legacy_dates_cross_new_year() {
        let log = "000 (1.0.0) 12/31 23:59:59 Job submitted from host: <h>\n...\n\
000 (2.0.0) 01/01 00:00:01 Job submitted from host: <h>\n...\n";
        let ev = events(log);
        assert_eq!(ev[0].time.to_string(), "2025-12-31T23:59:59Z");
        assert_eq!(ev[1].time.to_string(), "2026-01-01T00:00:01Z");
    }

    #[test]
    fn json_form_one_line_and_pretty() {
        let log = r#"{"MyType":"JobHeldEvent","EventTypeNumber":12,"EventTime":"2025-03-01T10:00:05Z","Cluster":1001,"Proc":0,"Subproc":0,"HoldReason":"via condor_hold (by user alice)","HoldReasonCode":1,"HoldReasonSubCode":7}
{
  "MyType": "JobTerminatedEvent",
  "EventTypeNumber": 5,
  "EventTime": "2025-03-01T10:07:00",
  "Cluster": 1001, "Proc": 0,
  "TerminatedNormally": true, "ReturnValue": 3,
  "RunRemoteUsage": "Usr 0 00:01:00, Sys 0 00:00:30",
  "Cpus": 2, "MemoryUsage": 10, "DiskUsage": 5
}
"#;
        let ev = events(log);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0].state, State::Held);
        assert_eq!(ev[0].usage.hold_code, Some(1));
        assert_eq!(ev[0].usage.hold_subcode, Some(7));
        assert_eq!(
            ev[0].usage.reason.as_deref(),
            Some("via condor_hold (by user alice)")
        );
        assert_eq!(ev[1].usage.exit_code, Some(3));
        assert_eq!(ev[1].usage.cpu_user_s, Some(60.0));
        assert_eq!(ev[1].usage.cores, Some(2));
        assert_eq!(ev[1].usage.memory_bytes, Some(10 << 20));
    }

    #[test]
    fn job_ad_gives_the_submit_its_image_hint() {
        let log = "000 (5.0.0) 2025-03-01 10:00:00 Job submitted from host: <h>\n...\n\
028 (5.0.0) 2025-03-01 10:00:00 Job ad information event triggered.\n\
TriggerEventTypeNumber = 0\nWNoDeSImage = \"atlas-el9\"\nOwner = \"alice\"\nRequestCpus = 8\n...\n";
        let items = parse_str(LrmsKind::Htcondor, opts(), log);
        let ev: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].usage.image_hint.as_deref(), Some("atlas-el9"));
        assert_eq!(ev[0].usage.user.as_deref(), Some("alice"));
        assert_eq!(ev[0].usage.cores, Some(8));
        assert!(items.contains(&Item::skipped(3, "028")));
    }

    #[test]
    fn attempts_and_hold_identities() {
        let log = "012 (1.0.0) 2025-03-01 10:00:05 Job was held.\n\tx\n\tCode 1 Subcode 0\n...\n\
001 (1.0.0) 2025-03-01 10:01:00 Job executing on host: <h>\n...\n\
004 (1.0.0) 2025-03-01 10:02:00 Job was evicted.\n...\n\
012 (1.0.0) 2025-03-01 10:03:00 Job was held.\n\tCode 3 Subcode 2\n...\n\
012 (1.0.0) 2025-03-01 10:03:30 Job was held.\n...\n\
001 (1.0.0) 2025-03-01 10:04:00 Job executing on host: <h>\n...\n";
        let ev = events(log);
        let got: Vec<_> = ev
            .iter()
            .map(|e| (e.state, e.run_attempt, e.identity.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (State::Held, 1, Some("t1740823205".to_owned())),
                (State::Started, 1, None),
                (State::Evicted, 1, None),
                (State::Held, 1, Some("t1740823380".to_owned())),
                (State::Held, 1, Some("t1740823410".to_owned())),
                (State::Started, 2, None),
            ]
        );
        assert_eq!(ev[3].usage.hold_code, Some(3));
        assert_eq!(ev[3].usage.hold_subcode, Some(2));
    }

    #[test]
    fn malformed_lines_are_reported_and_parsing_goes_on() {
        let log = "garbage\n\
000 (1.0.0) 13/45 10:00:00 Job submitted from host: <h>\n...\n\
000 (2.0.0) 2025-03-01 10:00:00 Job submitted from host: <h>\n\
001 (2.0.0) 2025-03-01 10:00:01 Job executing on host: <h>\n...\n\
{\"EventTypeNumber\": \"x\"}\n\
005 (3.0.0) 2025-03-01 10:00:00 Job terminated.\n";
        let items = parse_str(LrmsKind::Htcondor, opts(), log);
        let bad: Vec<u64> = items
            .iter()
            .filter_map(|i| match i {
                Item::Malformed(m) => Some(m.line),
                _ => None,
            })
            .collect();
        // line 1 garbage, line 2 bad date, line 3 "..." of the bad record is ignored,
        // line 4 record not closed, line 7 bad JSON, line 8 unterminated at end.
        assert_eq!(bad, [1, 2, 4, 7, 8]);
        let ev = events(log);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].job_id, "2.0");
    }
}
