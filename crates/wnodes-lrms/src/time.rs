//! Times in LRMS records: local wall-clock times read in a time zone, epoch seconds, and the
//! small fixed formats each LRMS writes.
//!
//! **Time zones: [`jiff`].** Local times (HTCondor without `Z`, PBS accounting, `sacct`) are read
//! in a [`TimeZone`]; [`TimeZone::system()`] gives `$TZ` semantics (a POSIX TZ string such as
//! `CET-1CEST,M3.5.0,M10.5.0/3`, `:Area/City` or `Area/City` looked up in the zoneinfo database,
//! otherwise `/etc/localtime`, otherwise UTC). jiff applies the zone's offset *at that instant*
//! (historical rules and DST included), which `time`'s `local-offset` cannot: it only knows the
//! process's current offset. A wall-clock time that a DST change skips or repeats is resolved
//! the way jiff's "compatible" disambiguation does (as RFC 5545 and `java.time` do): a skipped
//! time moves forward by the gap, a repeated one takes the earlier instant.

use jiff::{
    Timestamp,
    civil::{Date, DateTime, Time},
    tz::TimeZone,
};

/// Parses exactly `n` ASCII digits.
pub(crate) fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Builds a civil date-time, `None` when any field is out of range.
pub(crate) fn civil(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<DateTime> {
    let date = Date::new(
        i16::try_from(y).ok()?,
        i8::try_from(mo).ok()?,
        i8::try_from(d).ok()?,
    )
    .ok()?;
    let time = Time::new(
        i8::try_from(h).ok()?,
        i8::try_from(mi).ok()?,
        i8::try_from(s).ok()?,
        0,
    )
    .ok()?;
    Some(DateTime::from_parts(date, time))
}

/// A wall-clock time in `tz` as an instant.
pub(crate) fn local(dt: DateTime, tz: &TimeZone) -> Option<Timestamp> {
    tz.to_ambiguous_zoned(dt)
        .compatible()
        .ok()
        .map(|z| z.timestamp())
}

/// A wall-clock time in UTC as an instant.
pub(crate) fn utc(dt: DateTime) -> Option<Timestamp> {
    local(dt, &TimeZone::UTC)
}

/// Epoch seconds as an instant.
pub(crate) fn epoch(secs: i64) -> Option<Timestamp> {
    Timestamp::from_second(secs).ok()
}

/// `HH:MM:SS` → (h, m, s), each checked.
pub(crate) fn hms(s: &str) -> Option<(i64, i64, i64)> {
    let mut it = s.split(':');
    let h = digits(it.next()?)?;
    let m = digits(it.next()?)?;
    let sec = digits(it.next()?)?;
    if it.next().is_some() || h > 999_999_999 || m > 59 || sec > 60 {
        return None;
    }
    Some((h, m, sec))
}

/// `YYYY-MM-DD` → (y, m, d).
pub(crate) fn ymd(s: &str, sep: char) -> Option<(i64, i64, i64)> {
    let mut it = s.split(sep);
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    Some((digits(y)?, digits(m)?, digits(d)?))
}

/// An ISO-8601 date-time as LRMSs write it: `YYYY-MM-DD[T ]HH:MM:SS[.fff][Z|±HH:MM|±HHMM]`.
/// Without a zone designator the time is local, read in `tz`.
pub(crate) fn iso(s: &str, tz: &TimeZone) -> Option<Timestamp> {
    if s.len() < 19 || !s.is_char_boundary(10) || !s.is_char_boundary(19) {
        return None;
    }
    let (date, rest) = s.split_at(10);
    let sep = rest.as_bytes()[0];
    if sep != b'T' && sep != b' ' {
        return None;
    }
    let (y, mo, d) = ymd(date, '-')?;
    let (h, mi, sec) = hms(&rest[1..9])?;
    let mut tail = &rest[9..];
    let mut nanos: i32 = 0;
    if let Some(frac) = tail.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 9 {
            return None;
        }
        let mut v = i32::try_from(digits(&frac[..n])?).ok()?;
        for _ in n..9 {
            v *= 10;
        }
        nanos = v;
        tail = &frac[n..];
    }
    let dt = civil(y, mo, d, h, mi, sec)?;
    let base = match tail {
        "" => local(dt, tz)?,
        "Z" | "z" => utc(dt)?,
        off => {
            let (sign, hm) = match off.as_bytes()[0] {
                b'+' => (1, &off[1..]),
                b'-' => (-1, &off[1..]),
                _ => return None,
            };
            let hm = hm.replace(':', "");
            if hm.len() != 4 {
                return None;
            }
            let oh = digits(&hm[..2])?;
            let om = digits(&hm[2..])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let t = utc(dt)?;
            Timestamp::from_second(t.as_second() - sign * (oh * 3600 + om * 60)).ok()?
        }
    };
    Timestamp::new(base.as_second(), nanos).ok()
}

/// The longest duration (or CPU time) a record may carry: 100 years of a 100,000-core job, in
/// seconds. Anything above is a corrupt record, not a measurement.
pub(crate) const MAX_SECONDS: f64 = 100.0 * 365.25 * 86400.0 * 100_000.0;

/// `[D-]HH:MM:SS`, `MM:SS[.fff]` or plain seconds (as `sacct` and PBS write durations) → seconds;
/// `None` past [`MAX_SECONDS`].
pub(crate) fn duration_s(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (digits(d)?, r),
        None => (0, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let num = |p: &str| -> Option<f64> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return None;
        }
        p.parse::<f64>().ok().filter(|v| v.is_finite())
    };
    let secs = match parts.as_slice() {
        [s] => num(s)?,
        [m, s] => num(m)? * 60.0 + num(s)?,
        [h, m, s] => num(h)? * 3600.0 + num(m)? * 60.0 + num(s)?,
        _ => return None,
    };
    Some(days as f64 * 86400.0 + secs).filter(|v| *v <= MAX_SECONDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chicago() -> TimeZone {
        // POSIX rule for US Central time: no zoneinfo database needed.
        TimeZone::posix("CST6CDT,M3.2.0,M11.1.0").unwrap()
    }

    #[test]
    fn iso_local_and_zoned() {
        let tz = chicago();
        assert_eq!(
            iso("2025-02-13 10:44:58", &tz).unwrap().to_string(),
            "2025-02-13T16:44:58Z"
        );
        // Summer: CDT is UTC-5.
        assert_eq!(
            iso("2025-07-01T10:00:00", &tz).unwrap().to_string(),
            "2025-07-01T15:00:00Z"
        );
        assert_eq!(
            iso("2025-02-13T16:44:57Z", &tz).unwrap().to_string(),
            "2025-02-13T16:44:57Z"
        );
        assert_eq!(
            iso("2025-02-13 10:44:57.250+01:00", &tz)
                .unwrap()
                .to_string(),
            "2025-02-13T09:44:57.25Z"
        );
        for bad in [
            "2025-02-13",
            "2025-13-13 10:00:00",
            "2025-02-30 10:00:00",
            "2025-02-13 25:00:00",
            "2025-02-13X10:00:00",
            "2025-02-13 10:00:00Q",
            "2025-02-13 10:00:00.",
            "２０２５-02-13 10:00:00",
        ] {
            assert!(iso(bad, &tz).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dst_gap_and_fold_are_resolved_not_rejected() {
        let tz = chicago();
        // 2025-03-09 02:30 does not exist in Chicago; 2025-11-02 01:30 exists twice.
        let gap = iso("2025-03-09 02:30:00", &tz).unwrap();
        assert_eq!(gap.to_string(), "2025-03-09T08:30:00Z");
        let fold = iso("2025-11-02 01:30:00", &tz).unwrap();
        assert_eq!(fold.to_string(), "2025-11-02T06:30:00Z");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_s("19:23:4"), Some(69784.0));
        assert_eq!(duration_s("1-02:24:13"), Some(95053.0));
        assert_eq!(duration_s("8-15:40:36"), Some(747636.0));
        assert_eq!(duration_s("01:05.753"), Some(65.753));
        assert_eq!(duration_s("12722"), Some(12722.0));
        for bad in [
            "",
            "a:b",
            "1:2:3:4",
            "-1",
            "1e9",
            "x-01:00:00",
            &"5".repeat(70),
        ] {
            assert!(duration_s(bad).is_none(), "{bad:?} accepted");
        }
    }
}
