//! APEL text messages: a header line, then `Key: value` lines per record, each record followed
//! by `%%` (APEL's unloader writes `'%%\n'.join(records) + '%%\n'`). Absent values are written
//! `None`, as APEL's own `get_msg()` writes them; the loader reads `None`, `null` and an empty
//! value as null.

use std::{collections::BTreeMap, fmt, ops::Range, str::FromStr};

use crate::{ApelError, records::ApelRecord};

/// The largest message [`split`] writes by default: AMS refuses messages of 1 MB or more, and
/// `ssmsend` signs the message (S/MIME) and AMS carries it base64-encoded (4/3), so half a
/// megabyte of text leaves room for both.
pub const MAX_MESSAGE_BYTES: usize = 500_000;
/// The most records per message by default (APEL's client default).
pub const MAX_RECORDS: usize = 1000;

/// A message kind and the header APEL's loader recognises it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `APEL-individual-job-message: v0.3`.
    Job,
    /// `APEL-summary-job-message: v0.3` (the normalised summary).
    Summary,
    /// `APEL-cloud-message: v0.4`.
    Cloud,
    /// `APEL-sync-message: v0.1`.
    Sync,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Job, Kind::Summary, Kind::Cloud, Kind::Sync];

    /// The header line, without its newline.
    pub fn header(self) -> &'static str {
        match self {
            Self::Job => "APEL-individual-job-message: v0.3",
            Self::Summary => "APEL-summary-job-message: v0.3",
            Self::Cloud => "APEL-cloud-message: v0.4",
            Self::Sync => "APEL-sync-message: v0.1",
        }
    }

    /// `job`, `summary`, `cloud`, `sync`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::Summary => "summary",
            Self::Cloud => "cloud",
            Self::Sync => "sync",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown kind {s:?} (job, summary, cloud or sync)"))
    }
}

/// One record's lines (`Key: value\n` each, no separator).
///
/// # Errors
/// [`ApelError::LineBreak`] when a value holds a line break.
pub fn render<R: ApelRecord>(record: &R) -> Result<String, ApelError> {
    let mut out = String::new();
    for (key, value) in record.fields() {
        let value = value.as_deref().unwrap_or("None");
        if value.contains(['\n', '\r']) {
            return Err(ApelError::LineBreak {
                kind: R::KIND.name(),
                field: key,
            });
        }
        out.push_str(key);
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }
    Ok(out)
}

/// A message ready for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub text: String,
    /// The indices (into the rendered records given to [`split`]) of the records it holds.
    pub records: Range<usize>,
}

/// Packs rendered records (from [`render`]) into messages of at most `max_bytes` bytes and
/// `max_records` records each, in order.
///
/// # Errors
/// [`ApelError::RecordTooLarge`] when one record alone does not fit.
pub fn split(
    kind: Kind,
    rendered: &[String],
    max_bytes: usize,
    max_records: usize,
) -> Result<Vec<Message>, ApelError> {
    let head = kind.header().len() + 1;
    let mut out = Vec::new();
    let mut start = 0;
    let mut text = String::new();
    for (i, r) in rendered.iter().enumerate() {
        let len = r.len() + 3;
        if head + len > max_bytes {
            return Err(ApelError::RecordTooLarge {
                kind: kind.name(),
                bytes: head + len,
                limit: max_bytes,
            });
        }
        if !text.is_empty() && (text.len() + len > max_bytes || i - start >= max_records.max(1)) {
            out.push(Message {
                kind,
                text: std::mem::take(&mut text),
                records: start..i,
            });
            start = i;
        }
        if text.is_empty() {
            text.push_str(kind.header());
            text.push('\n');
        }
        text.push_str(r);
        text.push_str("%%\n");
    }
    if !text.is_empty() {
        out.push(Message {
            kind,
            text,
            records: start..rendered.len(),
        });
    }
    Ok(out)
}

/// One record of a parsed message: its `Key: value` pairs in message order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordFields {
    pub fields: Vec<(String, String)>,
}

/// True for the values APEL reads as null (`None`, `null`, empty; any case).
pub fn is_null(value: &str) -> bool {
    value.is_empty() || value.eq_ignore_ascii_case("none") || value.eq_ignore_ascii_case("null")
}

impl RecordFields {
    /// The value of `key`, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !is_null(v))
    }

    /// The field names, in message order.
    pub fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Every field, nulls as `None`, for comparing records field by field.
    pub fn to_map(&self) -> BTreeMap<String, Option<String>> {
        self.fields
            .iter()
            .map(|(k, v)| (k.clone(), (!is_null(v)).then(|| v.clone())))
            .collect()
    }
}

/// A message parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedMessage {
    /// `APEL-individual-job-message`, ...
    pub header: String,
    /// `v0.3`, ...
    pub version: String,
    pub records: Vec<RecordFields>,
}

/// Parses an APEL text message: a `<Header>: v<version>` line, then records of `Key: value`
/// lines each closed by a `%%` line. Strict: a line without `: `, a repeated key in a record,
/// or text after the last `%%` is an error.
///
/// # Errors
/// [`ApelError::Parse`] with the line number (1-based) and what is wrong.
pub fn parse(text: &str) -> Result<ParsedMessage, ApelError> {
    let err = |line: usize, reason: String| ApelError::Parse { line, reason };
    let mut lines = text.split('\n').enumerate();
    let (_, first) = lines.next().ok_or_else(|| err(1, "empty".into()))?;
    let (header, version) = first
        .split_once(": ")
        .filter(|(h, v)| h.starts_with("APEL-") && v.starts_with('v'))
        .ok_or_else(|| err(1, format!("no `APEL-...: v...` header in {first:?}")))?;
    let mut records = Vec::new();
    let mut current = RecordFields::default();
    let mut last = 1;
    for (i, line) in lines {
        let n = i + 1;
        last = n;
        if line == "%%" {
            if current.fields.is_empty() {
                return Err(err(n, "empty record".into()));
            }
            records.push(std::mem::take(&mut current));
            continue;
        }
        if line.is_empty() {
            // Only the end of the text (after the final newline) may be empty.
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| err(n, format!("no `Key: value` in {line:?}")))?;
        let value = value.strip_prefix(' ').unwrap_or(value);
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(err(n, format!("bad field name {key:?}")));
        }
        if current.fields.iter().any(|(k, _)| k == key) {
            return Err(err(n, format!("field {key} repeated in one record")));
        }
        current.fields.push((key.to_string(), value.to_string()));
    }
    if !current.fields.is_empty() {
        return Err(err(last, "the last record has no `%%` after it".into()));
    }
    Ok(ParsedMessage {
        header: header.to_string(),
        version: version.to_string(),
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_record_once_under_both_limits() {
        let rendered: Vec<String> = (0..10).map(|i| format!("Site: S\nN: {i}\n")).collect();
        let msgs = split(Kind::Sync, &rendered, 80, 3).unwrap();
        let mut seen = Vec::new();
        for m in &msgs {
            assert!(m.text.len() <= 80, "{}", m.text.len());
            assert!(m.records.len() <= 3);
            let p = parse(&m.text).unwrap();
            assert_eq!(p.header, "APEL-sync-message");
            assert_eq!(p.records.len(), m.records.len());
            for r in &p.records {
                seen.push(r.get("N").unwrap().to_string());
            }
        }
        assert_eq!(seen, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        assert!(matches!(
            split(Kind::Sync, &rendered, 20, 3),
            Err(ApelError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn parse_refuses_what_apel_would_not_read() {
        assert!(parse("Site: x\n%%\n").is_err());
        assert!(parse("APEL-sync-message: v0.1\nSite: x\n").is_err());
        assert!(parse("APEL-sync-message: v0.1\nSite x\n%%\n").is_err());
        assert!(parse("APEL-sync-message: v0.1\nSite: x\nSite: y\n%%\n").is_err());
        let p = parse("APEL-sync-message: v0.1\nSite: x\nSubmitHost: None\n%%\n").unwrap();
        assert_eq!(p.version, "v0.1");
        assert_eq!(p.records[0].get("SubmitHost"), None);
        assert_eq!(p.records[0].keys(), ["Site", "SubmitHost"]);
    }
}
