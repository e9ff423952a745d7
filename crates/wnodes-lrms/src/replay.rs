//! Replay: whole files through a parser into a [`Sink`], with a [`Summary`].
//!
//! This is the library side of `wnodes-bridge replay --lrms <htcondor|slurm|pbs|lsf>
//! [--dry-run] [--year Y] FILE…`: [`replay`] reads each file to its end (a fresh parser per
//! file, so one file's partial record never joins the next), hands every normalised event to
//! the sink, logs each malformed record with its file and line, and counts. [`JsonLines`] is
//! the `--dry-run` sink: one JSON object per event (see [`crate::event::LrmsEvent`]);
//! [`crate::publish`] has the publishing one.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use jiff::{Timestamp, tz::TimeZone};
use serde::Serialize;

use crate::{
    event::{LrmsEvent, LrmsKind, State},
    parse::{DEFAULT_IMAGE_ATTRIBUTE, Item, ParseOptions, Parser, parser_for},
};

/// What a replay reads and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Which LRMS wrote the files.
    pub lrms: LrmsKind,
    /// Zone of local-time inputs; `TimeZone::system()` gives `$TZ` semantics.
    pub tz: TimeZone,
    /// Year of legacy HTCondor dates; `None`: each file's modification year (in `tz`).
    pub year: Option<i16>,
    /// HTCondor job attribute holding the image hint.
    pub image_attribute: String,
    /// The site's image hints for queued jobs whose record names none.
    pub image_hints: crate::event::ImageHints,
}

impl ReplayOptions {
    /// Defaults for `lrms`: `$TZ`, the files' modification years, the default image attribute.
    pub fn new(lrms: LrmsKind) -> Self {
        Self {
            lrms,
            tz: TimeZone::system(),
            year: None,
            image_attribute: DEFAULT_IMAGE_ATTRIBUTE.to_owned(),
            image_hints: Default::default(),
        }
    }

    /// The parse options for one file.
    pub fn parse_options(&self, path: &Path) -> ParseOptions {
        let year = self.year.unwrap_or_else(|| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| Timestamp::try_from(t).ok())
                .unwrap_or_else(Timestamp::now)
                .to_zoned(self.tz.clone())
                .year()
        });
        ParseOptions {
            tz: self.tz.clone(),
            year,
            image_attribute: self.image_attribute.clone(),
        }
    }
}

/// Where replayed events go.
pub trait Sink {
    /// Takes one event.
    fn event(&mut self, ev: &LrmsEvent) -> Result<(), SinkError>;
}

/// A sink failed (its own error is the source).
#[derive(Debug, thiserror::Error)]
#[error("the event sink failed")]
pub struct SinkError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Why a replay stopped. Malformed input never stops it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path} after line {line}")]
    Read {
        path: PathBuf,
        line: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the replayed events")]
    Write {
        #[source]
        source: std::io::Error,
    },
    #[error("replaying {path} line {line}")]
    Sink {
        path: PathBuf,
        line: u64,
        #[source]
        source: SinkError,
    },
}

/// One malformed record, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MalformedAt {
    pub file: PathBuf,
    pub line: u64,
    pub reason: String,
}

/// Counts of a replay.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Records read: emitted + skipped + malformed.
    pub read: u64,
    /// Events handed to the sink.
    pub emitted: u64,
    /// Well-formed records that map to no state or only enrich others.
    pub skipped: u64,
    /// Records that could not be read (each logged with file and line).
    pub malformed: u64,
    /// Emitted events per state.
    pub by_state: BTreeMap<State, u64>,
    /// The first malformed records (at most [`Summary::EXAMPLES`]).
    pub malformed_examples: Vec<MalformedAt>,
}

impl Summary {
    /// How many malformed records a summary keeps for its report.
    pub const EXAMPLES: usize = 20;
    /// How many malformed records are logged at warn level (the rest at debug).
    pub const LOUD: u64 = 100;

    /// Counts one item.
    pub fn count(&mut self, item: &Item, file: &Path) {
        self.read += 1;
        match item {
            Item::Event(e) => {
                self.emitted += 1;
                *self.by_state.entry(e.state).or_default() += 1;
            }
            Item::Skipped { .. } => self.skipped += 1,
            Item::Malformed(m) => {
                self.malformed += 1;
                // Every one is logged; past the first hundred at debug level, so a file of noise
                // cannot flood the log (the count and the examples still say it all).
                if self.malformed <= Self::LOUD {
                    tracing::warn!(file = %file.display(), line = m.line, reason = %m.reason, "Malformed LRMS record skipped.");
                } else {
                    tracing::debug!(file = %file.display(), line = m.line, reason = %m.reason, "Malformed LRMS record skipped.");
                }
                if self.malformed_examples.len() < Self::EXAMPLES {
                    self.malformed_examples.push(MalformedAt {
                        file: file.to_owned(),
                        line: m.line,
                        reason: m.reason.clone(),
                    });
                }
            }
        }
    }
}

impl fmt::Display for Summary {
    /// `read 851, emitted 12, skipped 839, malformed 0 (queued 2, started 2, …)` and then one
    /// line per kept malformed record (`file:line: reason`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read {}, emitted {}, skipped {}, malformed {}",
            self.read, self.emitted, self.skipped, self.malformed
        )?;
        if !self.by_state.is_empty() {
            let parts: Vec<String> = self
                .by_state
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        for m in &self.malformed_examples {
            write!(f, "\n{}:{}: {}", m.file.display(), m.line, m.reason)?;
        }
        Ok(())
    }
}

/// Reads one file's lines into a parser, item by item. Lines are split on `\n` (a `\r` before
/// it is dropped); a line that is not UTF-8 is a malformed record.
#[derive(Debug)]
pub struct FileReader {
    path: PathBuf,
    reader: BufReader<File>,
    parser: Box<dyn Parser>,
    line_no: u64,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Item>,
    out: Vec<Item>,
    done: bool,
    hints: crate::event::ImageHints,
}

impl FileReader {
    /// Opens `path` for `opts.lrms`.
    pub fn open(opts: &ReplayOptions, path: &Path) -> Result<Self, ReplayError> {
        let file = File::open(path).map_err(|source| ReplayError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            reader: BufReader::with_capacity(256 * 1024, file),
            parser: parser_for(opts.lrms, opts.parse_options(path)),
            line_no: 0,
            buf: Vec::new(),
            pending: Default::default(),
            out: Vec::new(),
            done: false,
            hints: opts.image_hints.clone(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The line last read.
    pub fn line(&self) -> u64 {
        self.line_no
    }

    /// The next item, `None` at the end of the file.
    pub fn next_item(&mut self) -> Result<Option<Item>, ReplayError> {
        loop {
            if let Some(mut i) = self.pending.pop_front() {
                if let Item::Event(e) = &mut i {
                    self.hints.apply(e);
                }
                return Ok(Some(i));
            }
            if self.done {
                return Ok(None);
            }
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|source| ReplayError::Read {
                    path: self.path.clone(),
                    line: self.line_no,
                    source,
                })?;
            if n == 0 {
                self.parser.finish(&mut self.out);
                self.done = true;
            } else {
                self.line_no += 1;
                feed_line(&mut *self.parser, &self.buf, self.line_no, &mut self.out);
            }
            self.pending.extend(self.out.drain(..));
        }
    }
}

/// Feeds one raw line (with or without its `\n`) to a parser. A line that is not UTF-8 is
/// passed with its invalid bytes replaced (U+FFFD): a reason text in Latin-1 should not cost
/// the whole record.
pub(crate) fn feed_line(parser: &mut dyn Parser, raw: &[u8], line_no: u64, out: &mut Vec<Item>) {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    parser.line(&String::from_utf8_lossy(raw), line_no, out);
}

/// Replays `files` in order into `sink`.
pub fn replay(
    opts: &ReplayOptions,
    files: &[PathBuf],
    sink: &mut dyn Sink,
) -> Result<Summary, ReplayError> {
    let mut summary = Summary::default();
    for path in files {
        let mut r = FileReader::open(opts, path)?;
        while let Some(item) = r.next_item()? {
            summary.count(&item, path);
            if let Item::Event(e) = &item {
                sink.event(e).map_err(|source| ReplayError::Sink {
                    path: path.clone(),
                    line: r.line(),
                    source,
                })?;
            }
        }
    }
    Ok(summary)
}

/// The `--dry-run` sink: one JSON object per event, one per line.
#[derive(Debug)]
pub struct JsonLines<W: Write>(pub W);

impl<W: Write> Sink for JsonLines<W> {
    fn event(&mut self, ev: &LrmsEvent) -> Result<(), SinkError> {
        serde_json::to_writer(&mut self.0, ev).map_err(|e| SinkError(Box::new(e)))?;
        self.0.write_all(b"\n").map_err(|e| SinkError(Box::new(e)))
    }
}

/// A sink that keeps the events (tests, tools).
impl Sink for Vec<LrmsEvent> {
    fn event(&mut self, ev: &LrmsEvent) -> Result<(), SinkError> {
        self.push(ev.clone());
        Ok(())
    }
}
