//! How far behind each durable consumer is: the age of its oldest unprocessed message, and
//! whether the events stream already dropped messages it had not acknowledged. Read as the
//! `monitor` identity (`wnodesctl backlog`), from outside the services, so a consumer that is
//! down is seen too.
//!
//! The events stream keeps messages `events_max_age` (limits retention). A durable whose oldest
//! unprocessed message gets near that age is about to lose events silently; the exporter's
//! `wnodes_consumer_oldest_unprocessed_age_seconds` against `wnodes_events_max_age_seconds`
//! is the alert (recovery: `docs/operations.md`, "A consumer fell behind the retention").

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use futures::TryStreamExt;
use serde::Serialize;
use wnodes_bus::subject::EVENTS_STREAM;

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

/// The stream's retention and every durable's backlog, by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub events_max_age_seconds: f64,
    pub first_sequence: u64,
    pub consumers: Vec<Backlog>,
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
    Ok(Report {
        events_max_age_seconds: info.config.max_age.as_secs_f64(),
        first_sequence,
        consumers,
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
    out
}
