//! Following a file as it grows and across rotation, with a resume [`Cursor`].
//!
//! [`Follower::poll`] reads what the file has now (bounded per call) and returns a [`Batch`]:
//! the items parsed and the cursor to resume from *once those items are published*. The
//! follower never persists anything itself; the caller publishes the batch, waits for the
//! acknowledgements, and then stores the cursor (with [`CursorFile::save`], or in the same
//! transaction as its own record of what was published). A crash between the publish and the
//! save re-reads the batch after the restart — the same events with the same ids, which
//! JetStream and the consumers drop — and a restart after the save re-reads nothing.
//!
//! Malformed records come back as [`Item::Malformed`] with their line; the caller logs and
//! counts them, e.g. with [`crate::replay::Summary::count`] (which logs file and line).
//!
//! **The cursor** names the file by identity (device + inode), the byte offset where the
//! earliest record not yet emitted starts (a record boundary, never the middle of a record),
//! the line number there, a fingerprint (SHA-256 of the file's first bytes, up to 1 KiB), and
//! the parser's state (run attempts and the like).
//!
//! **Rotation.** Each poll compares the path with the open file:
//! - *rename* (`mv log log.1`, new `log`): the path names another inode. The follower reads the
//!   old file (still open) to its end, then moves to the new one from its start.
//! - *copy-truncate* (`cp log log.1; : > log`): same inode, but shorter than what was read, or
//!   its first bytes changed. Lines written between the last poll and the copy are only in the
//!   copy: the follower looks for a sibling file whose first bytes match the fingerprint and
//!   reads the rest from it, then reads the truncated file from its start. A compressed copy
//!   cannot be recognised; those lines are lost (as with any copy-truncate reader).
//! - *while stopped*: on open, a cursor whose inode is no longer at the path is looked for among
//!   the path's siblings (by inode, then by fingerprint); the rest of that file is read before the
//!   new one.
//!
//! Writes to a renamed file after the follower has moved on are not read: a writer should reopen
//! its log promptly after a rename (HTCondor, PBS and LSF do, per event).

use std::{
    collections::VecDeque,
    fs::{File, Metadata},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    event::LrmsKind,
    parse::{Item, ParseOptions, Parser, parser_for},
    replay::feed_line,
};

/// Bytes of a file's start that identify it.
pub const FINGERPRINT_BYTES: u64 = 1024;

/// The first bytes of a file, hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// How many bytes were hashed (≤ [`FINGERPRINT_BYTES`]).
    pub len: u64,
    /// Lowercase hex SHA-256 of them.
    pub sha256: String,
}

impl Fingerprint {
    /// The fingerprint of `file`'s first `min(len, FINGERPRINT_BYTES)` bytes.
    fn of(file: &mut File, len: u64) -> std::io::Result<Self> {
        let want = len.min(FINGERPRINT_BYTES);
        let mut buf = vec![0; usize::try_from(want).unwrap_or(0)];
        file.seek(SeekFrom::Start(0))?;
        let mut got = 0;
        while got < buf.len() {
            match file.read(&mut buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok(Self {
            len: got as u64,
            sha256: hex::encode(Sha256::digest(&buf)),
        })
    }

    /// True when `file` starts with the bytes this fingerprint was taken of.
    fn matches(&self, file: &mut File) -> std::io::Result<bool> {
        let fp = Self::of(file, self.len)?;
        Ok(fp == *self)
    }
}

/// Where to resume following a file (see the module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// The followed path.
    pub path: PathBuf,
    /// Device of the file the offset is in.
    pub dev: u64,
    /// Inode of the file the offset is in.
    pub ino: u64,
    /// Byte offset of the next record to read.
    pub offset: u64,
    /// Lines before `offset` (for line numbers in reports).
    pub line: u64,
    /// The file's first bytes.
    pub fingerprint: Fingerprint,
    /// The parser's state at `offset`.
    pub state: serde_json::Value,
}

/// Errors of a follower. Malformed input is never one: it is an [`Item::Malformed`].
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cursor for {cursor_path} given to a follower of {path}")]
    WrongCursor { cursor_path: PathBuf, path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FollowError + '_ {
    move |source| FollowError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to follow.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// Which LRMS writes the file.
    pub lrms: LrmsKind,
    /// How to read its times.
    pub parse: ParseOptions,
    /// Without a cursor, start at the file's end (only new records) instead of its start.
    pub start_at_end: bool,
    /// Most bytes read per [`Follower::poll`].
    pub max_poll_bytes: usize,
}

impl FollowOptions {
    /// Defaults: from the start, 4 MiB per poll.
    pub fn new(lrms: LrmsKind, parse: ParseOptions) -> Self {
        Self {
            lrms,
            parse,
            start_at_end: false,
            max_poll_bytes: 4 << 20,
        }
    }
}

/// What one poll read.
#[derive(Debug)]
pub struct Batch {
    /// Events, skipped and malformed records, in file order.
    pub items: Vec<Item>,
    /// Where to resume once `items` are published.
    pub cursor: Cursor,
    /// Rotations and resumptions seen in this poll, for the log.
    pub notes: Vec<String>,
}

#[derive(Debug)]
struct Open {
    file: File,
    dev: u64,
    ino: u64,
    /// Next byte to read.
    read_pos: u64,
    fingerprint: Fingerprint,
}

impl Open {
    fn new(path: &Path, mut file: File, meta: &Metadata) -> Result<Self, FollowError> {
        let fingerprint = Fingerprint::of(&mut file, meta.len()).map_err(io(path))?;
        Ok(Self {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            read_pos: 0,
            fingerprint,
        })
    }
}

/// Follows one file. See the module doc.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    opts: FollowOptions,
    parser: Box<dyn Parser>,
    /// The file the path names (or named, while it is drained after a rename).
    cur: Option<Open>,
    /// A rotated file read before `cur`, with the path it was found at.
    draining: Option<(PathBuf, Open)>,
    /// Bytes of a line not yet ended by `\n`.
    partial: Vec<u8>,
    /// Lines fed from the file being read.
    line_no: u64,
    /// Start offsets of the lines fed since the last boundary: (line number, offset).
    lines: VecDeque<(u64, u64)>,
    /// Boundary after the last line fed while nothing was pending: (offset, line).
    boundary: (u64, u64),
    notes: Vec<String>,
}

impl Follower {
    /// Follows `path`, resuming from `resume` when given. A missing file is waited for.
    pub fn open(
        path: impl Into<PathBuf>,
        opts: FollowOptions,
        resume: Option<Cursor>,
    ) -> Result<Self, FollowError> {
        let path = path.into();
        let mut parser = parser_for(opts.lrms, opts.parse.clone());
        let mut notes = Vec::new();
        if let Some(c) = &resume {
            if c.path != path {
                return Err(FollowError::WrongCursor {
                    cursor_path: c.path.clone(),
                    path,
                });
            }
            if !parser.load_state(&c.state) {
                notes.push("cursor state unreadable; run attempts restart at 1".to_owned());
            }
        }
        let mut f = Self {
            path: path.clone(),
            opts,
            parser,
            cur: None,
            draining: None,
            partial: Vec::new(),
            line_no: 0,
            lines: VecDeque::new(),
            boundary: (0, 0),
            notes,
        };
        let Some(c) = resume else {
            if let Some(open) = f.try_open_path()? {
                let mut open = open;
                if f.opts.start_at_end {
                    let len = open.file.metadata().map_err(io(&path))?.len();
                    open.read_pos = len;
                    f.boundary = (len, 0);
                }
                f.cur = Some(open);
            }
            return Ok(f);
        };
        f.resume(c)?;
        Ok(f)
    }

    fn try_open_path(&self) -> Result<Option<Open>, FollowError> {
        match File::open(&self.path) {
            Ok(file) => {
                let meta = file.metadata().map_err(io(&self.path))?;
                Ok(Some(Open::new(&self.path, file, &meta)?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    fn resume(&mut self, c: Cursor) -> Result<(), FollowError> {
        let at_path = self.try_open_path()?;
        if let Some(mut open) = at_path {
            let len = open.file.metadata().map_err(io(&self.path))?.len();
            let same = open.dev == c.dev && open.ino == c.ino;
            if same
                && len >= c.offset
                && c.fingerprint
                    .matches(&mut open.file)
                    .map_err(io(&self.path))?
            {
                open.read_pos = c.offset;
                self.line_no = c.line;
                self.boundary = (c.offset, c.line);
                self.cur = Some(open);
                return Ok(());
            }
            // Rotated or truncated while stopped: finish the old content if it can be found.
            let min_len = c.offset;
            if let Some((old_path, mut old)) = find_sibling(&self.path, &c, min_len, true)? {
                self.notes.push(format!(
                    "resuming in {} (rotated from {}), then {} from its start",
                    old_path.display(),
                    self.path.display(),
                    self.path.display()
                ));
                old.read_pos = c.offset;
                self.line_no = c.line;
                self.boundary = (c.offset, c.line);
                self.draining = Some((old_path, old));
            } else {
                self.notes.push(format!(
                    "{} was rotated or truncated and the rest of the old file was not found: \
                     reading the current file from its start",
                    self.path.display()
                ));
            }
            self.cur = Some(open);
            return Ok(());
        }
        // Path missing: the old file may still be around under another name.
        if let Some((old_path, mut old)) = find_sibling(&self.path, &c, c.offset, true)? {
            old.read_pos = c.offset;
            self.line_no = c.line;
            self.boundary = (c.offset, c.line);
            self.draining = Some((old_path, old));
        }
        Ok(())
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what is there now and returns it with the cursor to store after publishing it.
    pub fn poll(&mut self) -> Result<Batch, FollowError> {
        let mut items = Vec::new();
        let mut budget = self.opts.max_poll_bytes;
        // A rotated file first, to its end.
        if let Some((old_path, mut old)) = self.draining.take() {
            let eof = self.read(&mut old, &old_path, &mut budget, &mut items)?;
            if eof {
                self.end_of_file(&mut items);
                self.notes
                    .push(format!("finished rotated file {}", old_path.display()));
                self.start_new_file();
            } else {
                self.draining = Some((old_path, old));
                return Ok(self.batch(items));
            }
        }
        self.check_rotation(&mut items)?;
        if let Some(mut cur) = self.cur.take() {
            let path = self.path.clone();
            let res = self.read(&mut cur, &path, &mut budget, &mut items);
            self.cur = Some(cur);
            res?;
        }
        Ok(self.batch(items))
    }

    /// Emits events held back for enrichment; call when the file has been idle for a while.
    /// The batch's cursor moves past them.
    pub fn flush_held(&mut self) -> Batch {
        let mut items = Vec::new();
        self.parser.flush_held(&mut items);
        if self.parser.pending_since().is_none() {
            self.boundary = (self.read_offset(), self.line_no);
            self.lines.clear();
        }
        self.batch(items)
    }

    fn read_offset(&self) -> u64 {
        let pos = match (&self.draining, &self.cur) {
            (Some((_, o)), _) | (None, Some(o)) => o.read_pos,
            (None, None) => 0,
        };
        pos - self.partial.len() as u64
    }

    /// Notices a rename or a truncation of the path.
    fn check_rotation(&mut self, items: &mut Vec<Item>) -> Result<(), FollowError> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&self.path)(e)),
        };
        let Some(mut cur) = self.cur.take() else {
            // The file appeared.
            self.cur = self.try_open_path()?;
            self.start_new_file();
            return Ok(());
        };
        if (meta.dev(), meta.ino()) != (cur.dev, cur.ino) {
            // Renamed away and replaced: read the old one (still open) to its end.
            let path = self.path.clone();
            let mut unlimited = usize::MAX;
            self.read(&mut cur, &path, &mut unlimited, items)?;
            self.end_of_file(items);
            self.notes.push(format!(
                "{} was rotated (renamed); reading the new file from its start",
                self.path.display()
            ));
            self.cur = self.try_open_path()?;
            self.start_new_file();
            return Ok(());
        }
        let truncated = meta.len() < cur.read_pos
            || !cur
                .fingerprint
                .matches(&mut cur.file)
                .map_err(io(&self.path))?;
        if truncated {
            // Copy-truncate: the lines after read_pos, if any, are only in the copy.
            let probe = Cursor {
                path: self.path.clone(),
                dev: cur.dev,
                ino: cur.ino,
                offset: cur.read_pos,
                line: self.line_no,
                fingerprint: cur.fingerprint.clone(),
                state: serde_json::Value::Null,
            };
            if let Some((copy_path, mut copy)) =
                find_sibling(&self.path, &probe, cur.read_pos, true)?
            {
                copy.read_pos = cur.read_pos;
                let mut unlimited = usize::MAX;
                self.read(&mut copy, &copy_path, &mut unlimited, items)?;
                self.notes.push(format!(
                    "{} was truncated; read the rest from its copy {}",
                    self.path.display(),
                    copy_path.display()
                ));
            } else {
                self.notes.push(format!(
                    "{} was truncated; lines written since the last read and not found in a copy are lost",
                    self.path.display()
                ));
            }
            self.end_of_file(items);
            cur.read_pos = 0;
            cur.fingerprint = Fingerprint::of(&mut cur.file, meta.len()).map_err(io(&self.path))?;
            self.start_new_file();
        } else if cur.fingerprint.len < FINGERPRINT_BYTES && meta.len() > cur.fingerprint.len {
            cur.fingerprint = Fingerprint::of(&mut cur.file, meta.len()).map_err(io(&self.path))?;
        }
        self.cur = Some(cur);
        Ok(())
    }

    /// A file ended for good: its last line (without `\n`) and any open record are finished.
    fn end_of_file(&mut self, items: &mut Vec<Item>) {
        if !self.partial.is_empty() {
            self.line_no += 1;
            let line = std::mem::take(&mut self.partial);
            feed_line(&mut *self.parser, &line, self.line_no, items);
        }
        self.parser.finish(items);
    }

    fn start_new_file(&mut self) {
        self.partial.clear();
        self.lines.clear();
        self.line_no = 0;
        self.boundary = (0, 0);
    }

    /// Reads complete lines from `open` into the parser; true at the end of the file.
    fn read(
        &mut self,
        open: &mut Open,
        path: &Path,
        budget: &mut usize,
        items: &mut Vec<Item>,
    ) -> Result<bool, FollowError> {
        open.file
            .seek(SeekFrom::Start(open.read_pos))
            .map_err(io(path))?;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if *budget == 0 {
                return Ok(false);
            }
            let want = chunk.len().min(*budget);
            let n = open.file.read(&mut chunk[..want]).map_err(io(path))?;
            if n == 0 {
                return Ok(true);
            }
            *budget -= n;
            let start_of_partial = open.read_pos - self.partial.len() as u64;
            open.read_pos += n as u64;
            self.partial.extend_from_slice(&chunk[..n]);
            let mut consumed = 0;
            while let Some(nl) = self.partial[consumed..].iter().position(|b| *b == b'\n') {
                let line_start = start_of_partial + consumed as u64;
                let end = consumed + nl + 1;
                self.line_no += 1;
                self.lines.push_back((self.line_no, line_start));
                feed_line(
                    &mut *self.parser,
                    &self.partial[consumed..end],
                    self.line_no,
                    items,
                );
                consumed = end;
                if self.parser.pending_since().is_none() {
                    self.lines.clear();
                    self.boundary = (start_of_partial + consumed as u64, self.line_no);
                }
            }
            self.partial.drain(..consumed);
        }
    }

    fn batch(&mut self, items: Vec<Item>) -> Batch {
        let (offset, line) = match self.parser.pending_since() {
            None => self.boundary,
            Some(l) => {
                while self.lines.front().is_some_and(|(n, _)| *n < l) {
                    self.lines.pop_front();
                }
                match self.lines.front() {
                    Some((n, off)) if *n == l => (*off, l - 1),
                    _ => self.boundary,
                }
            }
        };
        let file = match (&self.draining, &self.cur) {
            (Some((_, o)), _) | (None, Some(o)) => Some(o),
            (None, None) => None,
        };
        let cursor = Cursor {
            path: self.path.clone(),
            dev: file.map_or(0, |o| o.dev),
            ino: file.map_or(0, |o| o.ino),
            offset,
            line,
            fingerprint: file.map_or(
                Fingerprint {
                    len: 0,
                    sha256: hex::encode(Sha256::digest([])),
                },
                |o| o.fingerprint.clone(),
            ),
            state: self.parser.save_state(),
        };
        Batch {
            items,
            cursor,
            notes: std::mem::take(&mut self.notes),
        }
    }
}

/// A sibling of `path` (same directory) that holds the cursor's file: the same inode, or (when
/// `by_content`) another file that starts with the cursor's fingerprint and is at least
/// `min_len` long.
fn find_sibling(
    path: &Path,
    c: &Cursor,
    min_len: u64,
    by_content: bool,
) -> Result<Option<(PathBuf, Open)>, FollowError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(_) => return Ok(None),
    };
    let mut by_inode = None;
    let mut by_fp = None;
    for entry in entries.flatten() {
        let p = entry.path();
        if p == path {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if !meta.is_file() || meta.len() < min_len {
            continue;
        }
        if meta.dev() == c.dev && meta.ino() == c.ino {
            by_inode = Some(p);
            break;
        }
        // An empty fingerprint matches everything: content says nothing then.
        if by_content && c.fingerprint.len > 0 && by_fp.is_none() {
            let Ok(mut f) = File::open(&p) else {
                continue;
            };
            if c.fingerprint.matches(&mut f).unwrap_or(false) {
                by_fp = Some(p);
            }
        }
    }
    let Some(p) = by_inode.or(by_fp) else {
        return Ok(None);
    };
    let file = File::open(&p).map_err(io(&p))?;
    let meta = file.metadata().map_err(io(&p))?;
    Ok(Some((p.clone(), Open::new(&p, file, &meta)?)))
}

/// A cursor stored in a file, replaced atomically (write, fsync, rename, fsync the directory).
#[derive(Debug, Clone)]
pub struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    /// The cursor file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The stored cursor, `None` when there is none yet.
    pub fn load(&self) -> Result<Option<Cursor>, FollowError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| FollowError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.path)(e)),
        }
    }

    /// Stores `cursor`; on return it is durable.
    pub fn save(&self, cursor: &Cursor) -> Result<(), FollowError> {
        let tmp = self.path.with_extension("tmp");
        let body = serde_json::to_vec(cursor).map_err(|e| FollowError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&body).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(())
    }
}
