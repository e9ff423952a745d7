//! What every parser shares: the streaming [`Parser`] interface, its output [`Item`]s, the
//! options that say how to read times, and [`parser_for`].
//!
//! A parser is fed one line at a time (without its line terminator) and never sees a file: the
//! same code serves a replay, a followed file and a fuzz target. Records that span lines
//! (HTCondor events, LSF records with quoted newlines, Slurm jobcomp environments) are
//! assembled inside the parser; [`Parser::pending_since`] tells the caller where the earliest
//! record not yet emitted starts, which is where a resume cursor may point.

use jiff::{Timestamp, tz::TimeZone};
use serde::{Deserialize, Serialize};

use crate::event::{LrmsEvent, LrmsKind};

/// How to read a source's times and hints.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Zone of local-time inputs (HTCondor without `Z`, PBS, `sacct`). Default: `$TZ`
    /// semantics ([`TimeZone::system`]).
    pub tz: TimeZone,
    /// Year of legacy HTCondor dates (`MM/DD HH:MM:SS`). A date whose month is lower than the
    /// previous one's by more than six months is taken as the next year (a log crossing New
    /// Year). Default: the current year (replay passes the file's modification year).
    pub year: i16,
    /// HTCondor job attribute naming the image a job asks for (read from 028 job ad events).
    pub image_attribute: String,
}

impl Default for ParseOptions {
    fn default() -> Self {
        Self {
            tz: TimeZone::system(),
            year: Timestamp::now().to_zoned(TimeZone::UTC).year(),
            image_attribute: DEFAULT_IMAGE_ATTRIBUTE.to_owned(),
        }
    }
}

/// The default HTCondor job attribute for the image hint (`+WNoDeSImage = "atlas-el9"` in a
/// submit file).
pub const DEFAULT_IMAGE_ATTRIBUTE: &str = "WNoDeSImage";

/// A line or record that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Malformed {
    /// 1-based line number where the record starts.
    pub line: u64,
    /// What was wrong.
    pub reason: String,
}

/// What a parser produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A normalised event.
    Event(Box<LrmsEvent>),
    /// A well-formed record that maps to no state (another HTCondor event number, a PBS `L`
    /// record, a Slurm step in a state we do not report), or one that only enriches others.
    Skipped {
        /// 1-based line number of the record.
        line: u64,
        /// The LRMS's name for it (`008`, `L`, `JOB_MODIFY2`).
        what: String,
    },
    /// A record that could not be read; it is skipped.
    Malformed(Malformed),
}

impl Item {
    pub(crate) fn event(e: LrmsEvent) -> Self {
        Self::Event(Box::new(e))
    }
    pub(crate) fn malformed(line: u64, reason: impl Into<String>) -> Self {
        Self::Malformed(Malformed {
            line,
            reason: reason.into(),
        })
    }
    pub(crate) fn skipped(line: u64, what: impl Into<String>) -> Self {
        Self::Skipped {
            line,
            what: what.into(),
        }
    }
}

/// The longest record a parser buffers (bytes). A record still growing past it is reported as
/// malformed and dropped, so a file without separators cannot exhaust memory.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// A streaming parser of one LRMS's records.
pub trait Parser: Send + std::fmt::Debug {
    /// Which LRMS.
    fn lrms(&self) -> LrmsKind;
    /// Feeds one line (without `\n` / `\r\n`), numbered from 1.
    fn line(&mut self, line: &str, line_no: u64, out: &mut Vec<Item>);
    /// The line where the earliest record not yet fully emitted starts (a record partly read,
    /// or an event held back), `None` when there is none: a resume cursor points at the start
    /// of that line, or after the last line fed when `None`.
    fn pending_since(&self) -> Option<u64>;
    /// Emits events held back for enrichment (HTCondor holds a submit until it knows whether a
    /// 028 job ad follows). Called when a followed file is idle; a partial record stays.
    fn flush_held(&mut self, out: &mut Vec<Item>);
    /// End of input: emits what is held and reports a partial record as malformed.
    fn finish(&mut self, out: &mut Vec<Item>);
    /// State that outlives a record (run attempts, last image size): saved with a cursor.
    fn save_state(&self) -> serde_json::Value;
    /// Restores [`Parser::save_state`]; an unreadable state is ignored (returns false).
    fn load_state(&mut self, state: &serde_json::Value) -> bool;
}

/// A parser for `lrms`.
pub fn parser_for(lrms: LrmsKind, opts: ParseOptions) -> Box<dyn Parser> {
    match lrms {
        LrmsKind::Htcondor => Box::new(crate::htcondor::HtcondorParser::new(opts)),
        LrmsKind::Pbs => Box::new(crate::pbs::PbsParser::new(opts)),
        LrmsKind::Lsf => Box::new(crate::lsf::LsfParser::new(opts)),
        LrmsKind::Slurm => Box::new(crate::slurm::SlurmParser::new(opts)),
    }
}

/// Parses a whole text (tests, fuzzing): every item in order.
pub fn parse_str(lrms: LrmsKind, opts: ParseOptions, text: &str) -> Vec<Item> {
    let mut p = parser_for(lrms, opts);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        p.line(line, i as u64 + 1, &mut out);
    }
    p.finish(&mut out);
    out
}

/// The first host name in an execution-host string, if it is a valid RFC 1123 name:
/// `wn001/0*8` → `wn001`, `lcg1277.gridpp.rl.ac.uk/5+…` → `lcg1277.gridpp.rl.ac.uk`,
/// `slot1_1@test02` → `test02`, an HTCondor sinful string → its `alias=`.
pub(crate) fn host_name(exec: &str) -> Option<String> {
    let s = exec.trim();
    let candidate = if let Some(inner) = s.strip_prefix('<') {
        let inner = inner.trim_end_matches('>');
        inner
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("alias=")))?
    } else {
        let s = s.rsplit_once('@').map_or(s, |(_, h)| h);
        s.split(['/', '+', ' ', ',', ':', '(']).next()?
    };
    // A Slurm hostlist (`wn[001-002,007]`): its first host.
    let expanded;
    let candidate = match candidate.split_once('[') {
        Some((prefix, range)) => {
            let first = range.split([',', '-', ']']).next()?;
            expanded = format!("{prefix}{first}");
            expanded.as_str()
        }
        None => candidate,
    };
    let h = candidate.to_ascii_lowercase();
    wnodes_bus::subject::validate_host(&h).ok().map(|()| h)
}

/// A JSON record being assembled (brace depth outside strings).
#[derive(Debug, Default)]
pub(crate) struct JsonRecord {
    pub(crate) line: u64,
    pub(crate) text: String,
    depth: i64,
    in_str: bool,
    esc: bool,
}

impl JsonRecord {
    pub(crate) fn new(line: u64) -> Self {
        Self {
            line,
            ..Default::default()
        }
    }

    /// Feeds text; true when the top-level object closed.
    pub(crate) fn feed(&mut self, s: &str) -> bool {
        for b in s.bytes() {
            if self.in_str {
                match (self.esc, b) {
                    (true, _) => self.esc = false,
                    (false, b'\\') => self.esc = true,
                    (false, b'"') => self.in_str = false,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => self.in_str = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => self.depth -= 1,
                    _ => {}
                }
            }
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(s);
        self.depth <= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_from_exec_strings() {
        assert_eq!(host_name("wn001/0*8").as_deref(), Some("wn001"));
        assert_eq!(
            host_name("lcg0766.gridpp.rl.ac.uk/7+lcg0766.gridpp.rl.ac.uk/6").as_deref(),
            Some("lcg0766.gridpp.rl.ac.uk")
        );
        assert_eq!(host_name("slot1_1@test02").as_deref(), Some("test02"));
        assert_eq!(
            host_name("<10.0.0.33:9618?addrs=10.0.0.33-9618&alias=Test02&noUDP&sock=x>").as_deref(),
            Some("test02")
        );
        assert_eq!(host_name("<10.0.0.33:9618?sock=x>"), None);
        assert_eq!(host_name("wn[001-002]").as_deref(), Some("wn001"));
        assert_eq!(host_name("wn[7,9]").as_deref(), Some("wn7"));
        assert_eq!(host_name("bad_host"), None);
    }
}

/// Run attempts counted from start records, for LRMSs whose records do not all carry one:
/// a job's attempt is the number of starts seen (at least 1). Saved with a cursor. Bounded:
/// past [`Attempts::MAX_JOBS`] the older half is dropped (their next attempt restarts at 1).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Attempts {
    jobs: std::collections::HashMap<String, (u32, u64)>,
    seq: u64,
}

impl Attempts {
    pub(crate) const MAX_JOBS: usize = 200_000;

    /// A start of `job`: its new attempt number.
    pub(crate) fn start(&mut self, job: &str) -> u32 {
        if !self.jobs.contains_key(job) && self.jobs.len() >= Self::MAX_JOBS {
            let mut seqs: Vec<u64> = self.jobs.values().map(|(_, s)| *s).collect();
            seqs.sort_unstable();
            let cut = seqs[seqs.len() / 2];
            self.jobs.retain(|_, (_, s)| *s >= cut);
        }
        self.seq += 1;
        let seq = self.seq;
        let e = self.jobs.entry(job.to_owned()).or_insert((0, seq));
        e.0 = e.0.saturating_add(1);
        e.0
    }

    /// The current attempt of `job` (1 before any start).
    pub(crate) fn current(&self, job: &str) -> u32 {
        self.jobs.get(job).map_or(1, |(n, _)| (*n).max(1))
    }

    /// The job is over: forget it.
    pub(crate) fn end(&mut self, job: &str) {
        self.jobs.remove(job);
    }
}
