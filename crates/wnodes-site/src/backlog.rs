//! How far behind each durable consumer is: the age of its oldest unprocessed message, and
//! whether the events stream already dropped messages it had not acknowledged. Read as the
//! `monitor` identity (`wnodesctl backlog`), from outside the services, so a consumer that is
//! down is seen too.
//!
//! The events stream keeps messages `events_max_age` (limits retention). A durable whose oldest
//! unprocessed message gets near that age is about to lose events silently; the exporter's
//! `wnodes_consumer_oldest_unprocessed_age_seconds` against `wnodes_events_max_age_seconds`
//! is the alert (recovery: `docs/operations.md`, "A consumer fell behind the retention").
//!
//! The same measurement also gives the dead-letter stream's depth and, per host, how many VMs
//! are preparing or running by their `vm.*` events ([`wnodes_bus::vms`]: one walk of the
//! events stream's `vm.*` messages per measurement): the exporter's `wnodes_dead_letters` and
//! `wnodes_vms`.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use futures::TryStreamExt;
use serde::Serialize;
use wnodes_bus::{
    subject::{DLQ_STREAM, EVENTS_STREAM},
    vms::VmState,
};

use crate::error::SiteError;

/// One durable's backlog.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backlog {
    pub durable: String,
    /// Messages matching its filters not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: usize,
    /// Age of the oldest message it has not acknowledged; `None` when it is caught up.
    pub oldest_unprocessed_age_seconds: Option<f64>,
    /// The stream's first message is past this consumer's ack floor: messages it never
    /// acknowledged were removed by the retention (some may not have been its own).
    pub behind_retention: bool,
}

/// VMs not ended on one host, by their last `vm.*` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostVms {
    pub host: String,
    /// Requested, not yet running.
    pub preparing: u64,
    pub running: u64,
}

/// The stream's retention, every durable's backlog by name, the dead letters and the VMs per
/// host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub events_max_age_seconds: f64,
    pub first_sequence: u64,
    pub consumers: Vec<Backlog>,
    /// Messages in the dead-letter stream.
    pub dead_letters: u64,
    /// Every host with a `vm.*` event in the events stream, by name (zero counts included).
    pub vms: Vec<HostVms>,
}

/// Measures every durable of the events stream.
pub async fn measure(js: &jetstream::Context) -> Result<Report, SiteError> {
    let mut stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| SiteError::js("read", format!("stream {EVENTS_STREAM}"), e))?;
    let info = stream
        .info()
        .await
        .map_err(|e| SiteError::js("read", format!("stream {EVENTS_STREAM}"), e))?
        .clone();
    let first_sequence = info.state.first_sequence;
    let mut infos: Vec<consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .map_err(|e| SiteError::js("list the consumers of", EVENTS_STREAM, e))?;
    infos.retain(|i| i.config.durable_name.is_some());
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    let mut consumers = Vec::with_capacity(infos.len());
    for c in infos {
        let floor = c.ack_floor.stream_sequence;
        let oldest = if c.num_pending == 0 && c.num_ack_pending == 0 {
            None
        } else {
            oldest_after(&stream, &c.config, floor + 1).await?
        };
        consumers.push(Backlog {
            durable: c.name.clone(),
            pending: c.num_pending,
            ack_pending: c.num_ack_pending,
            oldest_unprocessed_age_seconds: oldest.map(|d| d.as_secs_f64()),
            // A new durable starts with its floor just before the stream's first message, so
            // only one that fell behind is flagged.
            behind_retention: floor + 1 < first_sequence,
        });
    }
    let dead_letters = js
        .get_stream(DLQ_STREAM)
        .await
        .map_err(|e| SiteError::js("read", format!("stream {DLQ_STREAM}"), e))?
        .info()
        .await
        .map_err(|e| SiteError::js("read", format!("stream {DLQ_STREAM}"), e))?
        .state
        .messages;
    let views = wnodes_bus::vms::read(js, None)
        .await
        .map_err(|e| SiteError::js("read", "the VMs (vm.* events)", e))?;
    let mut vms: Vec<HostVms> = Vec::new();
    for v in views {
        let i = match vms.iter().position(|h| h.host == v.host) {
            Some(i) => i,
            None => {
                vms.push(HostVms {
                    host: v.host.clone(),
                    preparing: 0,
                    running: 0,
                });
                vms.len() - 1
            }
        };
        match v.state {
            VmState::Preparing => vms[i].preparing += 1,
            VmState::Running => vms[i].running += 1,
            VmState::Stopped | VmState::Failed => {}
        }
    }
    vms.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(Report {
        events_max_age_seconds: info.config.max_age.as_secs_f64(),
        first_sequence,
        consumers,
        dead_letters,
        vms,
    })
}

/// The age of the first message at or after `from` matching any of the consumer's filters.
async fn oldest_after(
    stream: &jetstream::stream::Stream,
    config: &consumer::Config,
    from: u64,
) -> Result<Option<Duration>, SiteError> {
    let mut filters = config.filter_subjects.clone();
    if !config.filter_subject.is_empty() {
        filters.push(config.filter_subject.clone());
    }
    let mut oldest: Option<(u64, time::OffsetDateTime)> = None;
    for f in filters {
        match stream
            .direct_get_next_for_subject(f.clone(), Some(from))
            .await
        {
            Ok(m) => {
                if oldest.is_none_or(|(seq, _)| m.sequence < seq) {
                    oldest = Some((m.sequence, m.time));
                }
            }
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(SiteError::js("read the next message of", f, e)),
        }
    }
    Ok(oldest.map(|(_, t)| {
        let now = time::OffsetDateTime::from(SystemTime::now());
        Duration::try_from(now - t).unwrap_or_default()
    }))
}

/// The report in Prometheus text format.
pub fn prometheus_text(r: &Report) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("# HELP wnodes_events_max_age_seconds How long the events stream keeps a message.".into());
    line("# TYPE wnodes_events_max_age_seconds gauge".into());
    line(format!(
        "wnodes_events_max_age_seconds {}",
        r.events_max_age_seconds
    ));
    line("# HELP wnodes_consumer_oldest_unprocessed_age_seconds Age of the oldest message a durable has not acknowledged (0: caught up).".into());
    line("# TYPE wnodes_consumer_oldest_unprocessed_age_seconds gauge".into());
    for c in &r.consumers {
        line(format!(
            "wnodes_consumer_oldest_unprocessed_age_seconds{{durable=\"{}\"}} {}",
            c.durable,
            c.oldest_unprocessed_age_seconds.unwrap_or(0.0)
        ));
    }
    line(
        "# HELP wnodes_consumer_pending_messages Messages a durable has not been delivered yet."
            .into(),
    );
    line("# TYPE wnodes_consumer_pending_messages gauge".into());
    for c in &r.consumers {
        line(format!(
            "wnodes_consumer_pending_messages{{durable=\"{}\"}} {}",
            c.durable, c.pending
        ));
    }
    line("# HELP wnodes_consumer_behind_retention 1 when the stream removed messages a durable never acknowledged.".into());
    line("# TYPE wnodes_consumer_behind_retention gauge".into());
    for c in &r.consumers {
        line(format!(
            "wnodes_consumer_behind_retention{{durable=\"{}\"}} {}",
            c.durable,
            u8::from(c.behind_retention)
        ));
    }
    line("# HELP wnodes_dead_letters Messages in the dead-letter stream.".into());
    line("# TYPE wnodes_dead_letters gauge".into());
    line(format!("wnodes_dead_letters {}", r.dead_letters));
    line("# HELP wnodes_vms VMs not ended, per host and state (preparing, running), by their vm.* events.".into());
    line("# TYPE wnodes_vms gauge".into());
    for h in &r.vms {
        for (state, n) in [("preparing", h.preparing), ("running", h.running)] {
            line(format!(
                "wnodes_vms{{host=\"{}\",state=\"{state}\"}} {n}",
                h.host
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_the_dead_letters_and_each_hosts_vms() {
        let r = Report {
            events_max_age_seconds: 60.0,
            first_sequence: 1,
            consumers: vec![Backlog {
                durable: "image-hv1".into(),
                pending: 2,
                ack_pending: 0,
                oldest_unprocessed_age_seconds: Some(3.5),
                behind_retention: false,
            }],
            dead_letters: 4,
            vms: vec![HostVms {
                host: "hv1.example.org".into(),
                preparing: 1,
                running: 0,
            }],
        };
        let text = prometheus_text(&r);
        for l in [
            "wnodes_consumer_oldest_unprocessed_age_seconds{durable=\"image-hv1\"} 3.5",
            "wnodes_dead_letters 4",
            "wnodes_vms{host=\"hv1.example.org\",state=\"preparing\"} 1",
            "wnodes_vms{host=\"hv1.example.org\",state=\"running\"} 0",
        ] {
            assert!(text.lines().any(|x| x == l), "{l} not in:\n{text}");
        }
    }
}
