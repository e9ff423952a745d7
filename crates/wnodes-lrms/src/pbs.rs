//! PBS/Torque/OpenPBS accounting logs: `MM/DD/YYYY HH:MM:SS;<type>;<job id>;<key=value …>`,
//! local time (openpbs `src/server/accounting.c`, `write_account_record`).
//!
//! | record | state |
//! |---|---|
//! | `Q` queued | `queued` |
//! | `S` started | `started` |
//! | `R` rerun | `evicted` |
//! | `E` ended | `finished` (`Exit_status`, `resources_used.*` in `HH:MM:SS` or plain seconds) |
//! | `D` deleted by request | `cancelled` (the `requestor=`) |
//! | `A` aborted by the server | `cancelled` |
//!
//! Other record types (`L`, `T`, `C`, reservations, …) are counted as skipped. A `20150327:`
//! prefix (grep output over daily files) is accepted. `Exit_status` is kept as written in
//! `exit_code`; a value above 256 is also reported as `exit_signal` = value − 256 (the
//! OpenPBS/Torque ≥ 5 convention; older Torque used 10000 + signal: check per site). The run
//! attempt is `run_count` where the record has it (OpenPBS `E`), else the number of `S` records
//! seen for the job (parser state, saved with a cursor).

use jiff::tz::TimeZone;

use crate::{
    event::{LrmsEvent, LrmsKind, State},
    parse::{Attempts, Item, ParseOptions, Parser, host_name},
    time,
};

/// The PBS parser. Every record is one line; the only state is the run attempts.
#[derive(Debug)]
pub struct PbsParser {
    tz: TimeZone,
    attempts: Attempts,
}

impl PbsParser {
    /// A parser reading local times in `opts.tz`.
    pub fn new(opts: ParseOptions) -> Self {
        Self {
            tz: opts.tz,
            attempts: Attempts::default(),
        }
    }

    fn record(&mut self, line: &str) -> Result<Option<LrmsEvent>, Result<String, String>> {
        // Err(Ok(what)) = skipped, Err(Err(reason)) = malformed.
        let mut line = line;
        if line.len() > 9
            && line.as_bytes()[8] == b':'
            && line[..8].bytes().all(|b| b.is_ascii_digit())
        {
            line = &line[9..];
        }
        let mut parts = line.splitn(4, ';');
        let (Some(stamp), Some(kind), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Err("not DATE;TYPE;ID;TEXT".into()));
        };
        let text = parts.next().unwrap_or("");
        let t =
            pbs_time(stamp, &self.tz).ok_or_else(|| Err(format!("bad record time {stamp:?}")))?;
        if id.is_empty() || id.contains(char::is_whitespace) {
            return Err(Err(format!("bad job id {id:?}")));
        }
        let state = match kind {
            "Q" => State::Queued,
            "S" => State::Started,
            "R" => State::Evicted,
            "E" => State::Finished,
            "D" | "A" => State::Cancelled,
            k if k.len() == 1 => return Err(Ok(k.to_owned())),
            _ => return Err(Err(format!("bad record type {kind:?}"))),
        };
        let kv = pairs(text).map_err(Err)?;
        let get = |k: &str| {
            kv.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
        };
        let mut e = LrmsEvent::new(LrmsKind::Pbs, id, state, t, kind);
        let u = &mut e.usage;
        u.user = get("user").map(str::to_owned);
        u.group = get("group").map(str::to_owned);
        u.queue = get("queue").map(str::to_owned);
        u.job_name = get("jobname").map(str::to_owned);
        u.exec_host = get("exec_host").map(str::to_owned);
        u.host = u.exec_host.as_deref().and_then(host_name);
        u.submit_time = get("ctime")
            .and_then(|v| v.parse().ok())
            .and_then(time::epoch);
        u.start_time = get("start")
            .and_then(|v| v.parse().ok())
            .and_then(time::epoch);
        u.cores = get("resources_used.ncpus")
            .or(get("Resource_List.ncpus"))
            .and_then(|v| v.parse().ok());
        u.memory_request_bytes = get("Resource_List.mem").and_then(pbs_size);
        if let Some(c) = get("resources_used.cput") {
            u.cpu_total_s =
                Some(time::duration_s(c).ok_or_else(|| Err(format!("bad cput {c:?}")))?);
        }
        if let Some(w) = get("resources_used.walltime") {
            let s = time::duration_s(w).ok_or_else(|| Err(format!("bad walltime {w:?}")))?;
            u.wall_s = Some(s as u64);
        }
        u.memory_bytes = get("resources_used.mem").and_then(pbs_size);
        u.virtual_memory_bytes = get("resources_used.vmem").and_then(pbs_size);
        if let Some(x) = get("Exit_status") {
            let x: i32 = x
                .parse()
                .map_err(|_| Err(format!("bad Exit_status {x:?}")))?;
            u.exit_code = Some(x);
            if x > 256 {
                u.exit_signal = Some(x - 256);
            }
        }
        if matches!(state, State::Cancelled | State::Evicted) && !text.is_empty() {
            u.reason = Some(match kind {
                "A" => format!("aborted by the server: {text}"),
                _ => text.to_owned(),
            });
        }
        e.run_attempt = match (state, get("run_count").and_then(|v| v.parse::<u32>().ok())) {
            (_, Some(rc)) => rc.max(1),
            (State::Started, None) => self.attempts.start(id),
            (_, None) => self.attempts.current(id),
        };
        if matches!(state, State::Finished | State::Cancelled) {
            self.attempts.end(id);
        }
        Ok(Some(e))
    }
}

/// `MM/DD/YYYY HH:MM:SS` in `tz`.
fn pbs_time(s: &str, tz: &TimeZone) -> Option<jiff::Timestamp> {
    let (date, clock) = s.split_once(' ')?;
    let mut d = date.split('/');
    let (m, day, y) = (d.next()?, d.next()?, d.next()?);
    if d.next().is_some() || m.len() != 2 || day.len() != 2 || y.len() != 4 {
        return None;
    }
    let (h, mi, sec) = time::hms(clock)?;
    let dt = time::civil(
        time::digits(y)?,
        time::digits(m)?,
        time::digits(day)?,
        h,
        mi,
        sec,
    )?;
    time::local(dt, tz)
}

/// `2031040kb`, `16000mb`, `4gb`, `512` (bytes), `8w` (words) → bytes.
pub(crate) fn pbs_size(v: &str) -> Option<u64> {
    let v = v.trim().to_ascii_lowercase();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit {
        "" | "b" => 1,
        "w" => 8,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        "kw" => 8 << 10,
        "mw" => 8 << 20,
        "gw" => 8 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Space-separated `key=value` pairs; a value may be quoted with `"` or `'`.
fn pairs(text: &str) -> Result<Vec<(&str, String)>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else {
            // Torque writes a few bare words in some records; keep them as keys without values.
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push((&rest[..end], String::new()));
            rest = rest[end..].trim_start();
            continue;
        };
        let key = &rest[..eq];
        if key.contains(' ') {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push((&rest[..end], String::new()));
            rest = rest[end..].trim_start();
            continue;
        }
        let after = &rest[eq + 1..];
        let (value, next) = match after.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let close = after[1..]
                    .find(q)
                    .ok_or_else(|| format!("unterminated quoted value of {key}"))?;
                (after[1..=close].to_owned(), &after[close + 2..])
            }
            _ => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        out.push((key, value));
        rest = next.trim_start();
    }
    Ok(out)
}

impl Parser for PbsParser {
    fn lrms(&self) -> LrmsKind {
        LrmsKind::Pbs
    }

    fn line(&mut self, line: &str, line_no: u64, out: &mut Vec<Item>) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            return;
        }
        match self.record(line) {
            Ok(Some(e)) => out.push(Item::event(e)),
            Ok(None) => {}
            Err(Ok(what)) => out.push(Item::skipped(line_no, what)),
            Err(Err(reason)) => out.push(Item::malformed(line_no, reason)),
        }
    }

    fn pending_since(&self) -> Option<u64> {
        None
    }

    fn flush_held(&mut self, _out: &mut Vec<Item>) {}

    fn finish(&mut self, _out: &mut Vec<Item>) {}

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(&self.attempts).unwrap_or_default()
    }

    fn load_state(&mut self, state: &serde_json::Value) -> bool {
        serde_json::from_value(state.clone())
            .map(|a| self.attempts = a)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_str;

    #[test]
    fn quoted_values_sizes_and_seconds_cput() {
        let line = "03/01/2025 22:05:10;E;7.srv;user=u account=\"my acct\" x='a \"b\"' \
                    resources_used.cput=12722 resources_used.walltime=01:00:00 \
                    resources_used.mem=1gb Exit_status=271 run_count=2";
        let opts = ParseOptions {
            tz: TimeZone::UTC,
            ..Default::default()
        };
        let items = parse_str(LrmsKind::Pbs, opts, line);
        let Item::Event(e) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(e.usage.cpu_total_s, Some(12722.0));
        assert_eq!(e.usage.wall_s, Some(3600));
        assert_eq!(e.usage.memory_bytes, Some(1 << 30));
        assert_eq!(
            (e.usage.exit_code, e.usage.exit_signal),
            (Some(271), Some(15))
        );
        assert_eq!(e.run_attempt, 2);
        assert_eq!(e.time.to_string(), "2025-03-01T22:05:10Z");
        assert_eq!(
            pairs("a=\"x y\" b='p \"q\"' c=1").unwrap(),
            [
                ("a", "x y".to_owned()),
                ("b", "p \"q\"".to_owned()),
                ("c", "1".to_owned())
            ]
        );
    }
}
