//! `wnodesctl prefetch --image I --hosts H1,H2 | --site site.toml`: asks the image service of
//! each host to fetch catalog image I (disk, kernel, initrd) into its cache now, with one
//! control request per host (`wnodes.ctl.<host>.image.prefetch`, [`wnodes_bus::control`]), and
//! shows each host's progress as the service reports it: on a terminal one bar per host redrawn
//! in place, otherwise one line per answer, on stderr. Then one line per host on stdout (with
//! `--json`, one JSON array). Exit 0 when every host has the image cached; 1 naming each host
//! that failed, or whose image service did not answer (`--answer-within`) or did not finish
//! (`--timeout`); 64 for a bad host or image name, 65 for a bad site description.

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use prost::Message;
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};
use wnodes_bus::{
    Bus, ErrorChain,
    control::{self, Reply},
    proto::{self, prefetch_progress::Outcome},
};
use wnodes_site::SiteDescription;

use crate::{DATAERR, PrefetchArgs, USAGE};

/// Where one host is.
#[derive(Debug, Clone, Default)]
struct HostState {
    /// The service's last answer.
    last: Option<proto::PrefetchProgress>,
    /// How many answers came.
    answers: u32,
    /// Set once it ended: `Ok(fetched)` or `Err(reason)`.
    end: Option<Result<bool, String>>,
}

impl HostState {
    fn bytes(&self) -> (u64, u64) {
        self.last.as_ref().map_or((0, 0), |p| {
            p.artifacts
                .iter()
                .fold((0, 0), |(d, t), a| (d + a.bytes_done, t + a.bytes_total))
        })
    }

    /// `fetched`, `cached`, `failed`, `fetching`, `waiting`.
    fn status(&self) -> &'static str {
        match &self.end {
            Some(Ok(true)) => "fetched",
            Some(Ok(false)) => "cached",
            Some(Err(_)) => "failed",
            None if self.answers > 0 => "fetching",
            None => "waiting",
        }
    }
}

pub(crate) async fn prefetch(args: PrefetchArgs) -> u8 {
    if !valid_image_name(&args.image) {
        eprintln!(
            "wnodesctl: {:?} is not an image catalog name (1 to 64 of A-Z a-z 0-9 '.' '_' '-')",
            args.image
        );
        return USAGE;
    }
    let hosts = match (&args.hosts, &args.site) {
        (Some(hosts), None) => hosts.clone(),
        (None, Some(path)) => match SiteDescription::load(path) {
            Ok(site) => site.hosts,
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return DATAERR;
            }
        },
        _ => {
            eprintln!("wnodesctl: name the hosts with --hosts, or --site for all of a site's");
            return USAGE;
        }
    };
    let mut subjects = Vec::with_capacity(hosts.len());
    for h in &hosts {
        match wnodes_bus::subject::image_prefetch_subject(h) {
            Ok(s) => subjects.push(s),
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return USAGE;
            }
        }
    }
    if hosts.is_empty() {
        eprintln!("wnodesctl: no hosts to prefetch on");
        return USAGE;
    }
    let bus = match args.connection.bus("wnodesctl@prefetch").await {
        Ok(b) => b,
        Err(code) => return code,
    };
    let request = proto::PrefetchRequest {
        image: args.image.clone(),
        wait: prost_types::Duration::try_from(args.timeout).ok(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (i, subject) in subjects.into_iter().enumerate() {
        let (bus, tx, request) = (bus.clone(), tx.clone(), request.clone());
        let (host, timeout, within) = (hosts[i].clone(), args.timeout, args.answer_within);
        tokio::spawn(async move {
            let last = follow(&bus, &host, &subject, &request, within, timeout, |s| {
                let _ = tx.send((i, s));
            })
            .await;
            let _ = tx.send((i, last));
        });
    }
    drop(tx);
    let mut states = vec![HostState::default(); hosts.len()];
    let mut view = View::new(&hosts);
    view.draw(&states);
    while let Some((i, state)) = rx.recv().await {
        states[i] = state;
        view.update(&states, i);
    }
    view.finish(&states);

    let failed: Vec<String> = hosts
        .iter()
        .zip(&states)
        .filter_map(|(h, s)| match &s.end {
            Some(Err(reason)) => Some(format!("{h} ({reason})")),
            Some(Ok(_)) => None,
            None => Some(format!("{h} (no outcome)")),
        })
        .collect();
    if args.json {
        let v: Vec<Value> = hosts
            .iter()
            .zip(&states)
            .map(|(h, s)| to_json(h, &args.image, s))
            .collect();
        println!("{}", Value::Array(v));
    } else {
        for (h, s) in hosts.iter().zip(&states) {
            let (done, _) = s.bytes();
            match &s.end {
                Some(Ok(_)) => println!("{h:<32} {:<8} {}", s.status(), size(done)),
                Some(Err(reason)) => println!("{h:<32} failed   {reason}"),
                None => println!("{h:<32} failed   no outcome"),
            }
        }
    }
    if failed.is_empty() {
        0
    } else {
        eprintln!(
            "wnodesctl: prefetch of '{}' failed on {}",
            args.image,
            failed.join(", ")
        );
        1
    }
}

/// A catalog name as `wnodesctl` accepts it: 1 to 64 of `[A-Za-z0-9._-]`.
fn valid_image_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `state`, ended with `result`.
fn end(mut state: HostState, result: Result<bool, String>) -> HostState {
    state.end = Some(result);
    state
}

/// Sends the request to one host and reports each progress answer through `on_update`, until
/// an outcome, no answer within `within`, or no outcome within `timeout`; returns the host's
/// last state (ended).
async fn follow(
    bus: &Bus,
    host: &str,
    subject: &str,
    request: &proto::PrefetchRequest,
    within: Duration,
    timeout: Duration,
    mut on_update: impl FnMut(HostState),
) -> HostState {
    let mut state = HostState::default();
    let mut replies = match control::request(bus, subject, request).await {
        Ok(r) => r,
        Err(e) => return end(state, Err(ErrorChain(&e).to_string())),
    };
    let started = Instant::now();
    loop {
        let deadline = if state.answers == 0 {
            started + within.min(timeout)
        } else {
            started + timeout
        };
        let reply = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(r)) => r,
            Ok(None) => return end(state, Err("the connection to NATS closed".into())),
            Err(_) if state.answers == 0 => {
                let reason = format!(
                    "no image service answered on {host} within {}",
                    humantime::format_duration(within.min(timeout))
                );
                return end(state, Err(reason));
            }
            Err(_) => {
                let reason = format!(
                    "not finished within {} (the fetch may go on)",
                    humantime::format_duration(timeout)
                );
                return end(state, Err(reason));
            }
        };
        let body = match reply {
            Reply::NoResponders => {
                let reason =
                    format!("no image service answered on {host} (nothing takes its requests)");
                return end(state, Err(reason));
            }
            Reply::Answer(body) => body,
        };
        let answer = match proto::PrefetchProgress::decode(body) {
            Ok(a) => a,
            Err(e) => return end(state, Err(format!("a malformed answer: {e}"))),
        };
        state.answers += 1;
        let outcome = answer.outcome.clone();
        state.last = Some(answer);
        match outcome {
            None => on_update(state.clone()),
            Some(Outcome::Done(d)) => return end(state, Ok(d.fetched)),
            Some(Outcome::Failed(f)) => return end(state, Err(f.reason)),
        }
    }
}

fn to_json(host: &str, image: &str, s: &HostState) -> Value {
    let (done, total) = s.bytes();
    let artifacts: Vec<Value> = s.last.as_ref().map_or(Vec::new(), |p| {
        p.artifacts
            .iter()
            .map(|a| {
                json!({
                    "part": a.part,
                    "sha256": a.sha256,
                    "bytes_done": a.bytes_done,
                    "bytes_total": (a.bytes_total > 0).then_some(a.bytes_total),
                    "cached": a.cached,
                })
            })
            .collect()
    });
    json!({
        "host": host,
        "image": image,
        "status": s.status(),
        "ok": matches!(s.end, Some(Ok(_))),
        "reason": match &s.end { Some(Err(r)) => Some(r.as_str()), _ => None },
        "answers": s.answers,
        "bytes_done": done,
        "bytes_total": (total > 0).then_some(total),
        "artifacts": artifacts,
    })
}

/// Bytes in binary units with one decimal.
fn size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The progress display on stderr: bars redrawn in place on a terminal, lines otherwise.
struct View {
    hosts: Vec<String>,
    width: usize,
    terminal: bool,
    /// The terminal's width when the shell exports `COLUMNS`: bars are cut to fit.
    columns: Option<usize>,
    drawn: bool,
}

const BAR: usize = 20;

impl View {
    fn new(hosts: &[String]) -> Self {
        Self {
            hosts: hosts.to_vec(),
            width: hosts.iter().map(String::len).max().unwrap_or(0),
            terminal: std::io::stderr().is_terminal(),
            columns: std::env::var("COLUMNS")
                .ok()
                .and_then(|c| c.parse().ok())
                .filter(|c| *c > 1),
            drawn: false,
        }
    }

    fn bar_line(&self, host: &str, s: &HostState) -> String {
        let (done, total) = s.bytes();
        let fill = match (&s.end, total) {
            (Some(Ok(_)), _) => BAR,
            (_, 0) => 0,
            (_, t) => usize::try_from(u128::from(done) * BAR as u128 / u128::from(t))
                .unwrap_or(BAR)
                .min(BAR),
        };
        let amount = if total > 0 {
            format!("{} / {}", size(done), size(total))
        } else {
            size(done)
        };
        // The reason comes in the summary: a bar that wraps would break the redraw.
        let line = format!(
            "{host:<w$} [{}{}] {:<8} {amount}",
            "#".repeat(fill),
            "-".repeat(BAR - fill),
            s.status(),
            w = self.width
        );
        match self.columns {
            Some(c) if line.chars().count() >= c => line.chars().take(c - 1).collect(),
            _ => line,
        }
    }

    /// Draws every bar (on a terminal).
    fn draw(&mut self, states: &[HostState]) {
        if !self.terminal {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.drawn {
            // Back to the first bar's line.
            let _ = write!(err, "\x1b[{}A", self.hosts.len());
        }
        for (h, s) in self.hosts.iter().zip(states) {
            let _ = writeln!(err, "\x1b[2K{}", self.bar_line(h, s));
        }
        let _ = err.flush();
        self.drawn = true;
    }

    /// Shows host `i`'s new state: all bars again on a terminal, one line otherwise.
    fn update(&mut self, states: &[HostState], i: usize) {
        if self.terminal {
            return self.draw(states);
        }
        let (host, s) = (&self.hosts[i], &states[i]);
        let (done, total) = s.bytes();
        let line = match &s.end {
            Some(Ok(_)) => format!("{host}: {} ({})", s.status(), size(done)),
            Some(Err(reason)) => format!("{host}: failed: {reason}"),
            None if total > 0 => format!(
                "{host}: {} of {} ({}%)",
                size(done),
                size(total),
                done * 100 / total
            ),
            None => format!("{host}: {}", size(done)),
        };
        eprintln!("{line}");
    }

    fn finish(&mut self, states: &[HostState]) {
        self.draw(states);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_and_sizes() {
        assert!(valid_image_name("el9"));
        assert!(valid_image_name("debian-12.4_x"));
        for bad in ["", "a b", "a/b", "a*", &"x".repeat(65)] {
            assert!(!valid_image_name(bad), "{bad:?}");
        }
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
