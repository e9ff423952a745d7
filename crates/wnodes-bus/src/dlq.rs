//! Dead letters: a message a consumer gave up on is copied to `wnodes.dlq.<consumer>` with the
//! original subject, the error and the attempt count in headers, the original payload and trace
//! headers unchanged, and only then terminated on the events stream.
//!
//! An operator reads them ([`read_all`], [`get`]) and redrives them ([`redrive`]): the payload
//! goes back to its original subject, where every consumer of that subject sees it again (the
//! ones that handled it skip it by its idempotency key), and the dead letter is deleted. Both
//! need the admin's rights (`wnodesctl dlq`).

use std::time::Duration;

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use futures::StreamExt;

use crate::{bus::Bus, error::BusError, subject};

pub const DLQ_SUBJECT_HEADER: &str = "Wnodes-Dlq-Subject";
pub const DLQ_ERROR_HEADER: &str = "Wnodes-Dlq-Error";
pub const DLQ_ATTEMPTS_HEADER: &str = "Wnodes-Dlq-Attempts";
pub const DLQ_CONSUMER_HEADER: &str = "Wnodes-Dlq-Consumer";
pub const DLQ_STREAM_SEQ_HEADER: &str = "Wnodes-Dlq-Stream-Seq";
pub const DLQ_REASON_HEADER: &str = "Wnodes-Dlq-Reason";

/// Why a message was dead-lettered (bounded set, used as a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The payload is not a valid event.
    Malformed,
    /// The handler rejected it as permanently failing.
    Rejected,
    /// The handler failed on every allowed attempt.
    Exhausted,
    /// The server redelivered it past the allowed attempts without a verdict from us (crash or
    /// ack timeout on the last attempt).
    NoVerdict,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
            Self::NoVerdict => "no_verdict",
        }
    }
}

/// A dead letter read back from the stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream (what `wnodesctl dlq show`/`redrive` take).
    pub sequence: u64,
    /// When it was dead-lettered.
    pub stored_at: Option<std::time::SystemTime>,
    pub dlq_subject: String,
    pub original_subject: String,
    pub error: String,
    pub reason: String,
    pub attempts: u32,
    pub consumer: String,
    pub stream_sequence: u64,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Header values are single lines of printable text.
fn header_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if v.len() > 2048 {
        let mut cut = 2048;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
    v
}

/// Writes the dead letter and waits for JetStream to store it.
pub(crate) async fn write(
    bus: &Bus,
    consumer: &str,
    msg: &jetstream::Message,
    stream_sequence: u64,
    attempts: u32,
    reason: DeadLetterReason,
    error: &str,
) -> Result<(), BusError> {
    let mut headers = HeaderMap::new();
    if let Some(orig) = &msg.headers {
        for (name, values) in orig.iter() {
            let n: &str = name.as_ref();
            if n.eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref()) {
                continue;
            }
            for v in values {
                headers.append(n, v.as_str());
            }
        }
    }
    let id = format!("dlq:{consumer}:{stream_sequence}");
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    headers.insert(DLQ_SUBJECT_HEADER, msg.subject.as_str());
    headers.insert(DLQ_ERROR_HEADER, header_value(error).as_str());
    headers.insert(DLQ_REASON_HEADER, reason.as_str());
    headers.insert(DLQ_ATTEMPTS_HEADER, attempts.to_string().as_str());
    headers.insert(DLQ_CONSUMER_HEADER, consumer);
    headers.insert(DLQ_STREAM_SEQ_HEADER, stream_sequence.to_string().as_str());
    bus.publish_raw(
        &subject::dlq_subject(consumer),
        headers,
        msg.payload.clone(),
        "dead_letter",
    )
    .await?;
    Ok(())
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// Reads every dead letter (of one consumer, or all) currently in the stream.
pub async fn read_all(bus: &Bus, consumer: Option<&str>) -> Result<Vec<DeadLetter>, BusError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| BusError::DeadLetterRead(e);
    let stream = bus
        .jetstream()
        .get_stream(subject::DLQ_STREAM)
        .await
        .map_err(|e| err(Box::new(e)))?;
    let filter = match consumer {
        Some(c) => subject::dlq_subject(c),
        None => subject::DLQ_SUBJECTS.to_owned(),
    };
    let reader = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: filter,
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| err(Box::new(e)))?;
    let mut out = Vec::new();
    loop {
        let mut batch = reader
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .map_err(|e| err(Box::new(e)))?;
        let mut got = 0;
        let mut pending = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(err)?;
            got += 1;
            if let Ok(info) = m.info() {
                pending = info.pending;
            }
            let (sequence, stored_at) = match m.info() {
                Ok(i) => (
                    i.stream_sequence,
                    Some(std::time::SystemTime::from(i.published)),
                ),
                Err(_) => (0, None),
            };
            out.push(from_parts(
                sequence,
                stored_at,
                m.subject.to_string(),
                m.headers.clone().unwrap_or_default(),
                m.payload.clone(),
            ));
        }
        if got == 0 || pending == 0 {
            break;
        }
    }
    Ok(out)
}

fn from_parts(
    sequence: u64,
    stored_at: Option<std::time::SystemTime>,
    dlq_subject: String,
    h: HeaderMap,
    payload: Bytes,
) -> DeadLetter {
    DeadLetter {
        sequence,
        stored_at,
        dlq_subject,
        original_subject: header(&h, DLQ_SUBJECT_HEADER),
        error: header(&h, DLQ_ERROR_HEADER),
        reason: header(&h, DLQ_REASON_HEADER),
        attempts: header(&h, DLQ_ATTEMPTS_HEADER).parse().unwrap_or_default(),
        consumer: header(&h, DLQ_CONSUMER_HEADER),
        stream_sequence: header(&h, DLQ_STREAM_SEQ_HEADER)
            .parse()
            .unwrap_or_default(),
        headers: h,
        payload,
    }
}

/// The dead letter at `sequence` of the dead-letter stream; `None` when there is none (never
/// stored, already redriven, or expired).
pub async fn get(bus: &Bus, sequence: u64) -> Result<Option<DeadLetter>, BusError> {
    let stream = bus
        .jetstream()
        .get_stream(subject::DLQ_STREAM)
        .await
        .map_err(|e| BusError::DeadLetterRead(Box::new(e)))?;
    match stream.get_raw_message(sequence).await {
        Ok(m) => Ok(Some(from_parts(
            m.sequence,
            Some(std::time::SystemTime::from(m.time)),
            m.subject.to_string(),
            m.headers,
            m.payload,
        ))),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::RawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(BusError::DeadLetterRead(Box::new(e))),
    }
}

/// What [`redrive`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redriven {
    /// Published again to `subject` (stream sequence `sequence`) and removed from the
    /// dead-letter stream.
    Published { subject: String, sequence: u64 },
    /// No dead letter at that sequence: nothing was published.
    NotFound,
}

/// The headers a redriven message carries: the original ones (trace context included, so the
/// redrive continues the run's trace) without the dead-letter headers, and `Nats-Msg-Id`
/// `redrive:<dead-letter sequence>`, so a redrive repeated within the duplicate window is
/// stored once.
fn redrive_headers(dead: &DeadLetter) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in dead.headers.iter() {
        let n: &str = name.as_ref();
        if n.starts_with("Wnodes-Dlq-")
            || n.eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref())
        {
            continue;
        }
        for v in values {
            headers.append(n, v.as_str());
        }
    }
    let id = format!("redrive:{}", dead.sequence);
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    headers
}

/// Publishes the dead letter at `sequence` to its original subject, waits for JetStream to
/// store it, then deletes the dead letter. A crash between the two leaves the dead letter in
/// place: redriving it again publishes a copy the consumers skip by its idempotency key.
pub async fn redrive(bus: &Bus, sequence: u64) -> Result<Redriven, BusError> {
    let Some(dead) = get(bus, sequence).await? else {
        return Ok(Redriven::NotFound);
    };
    if dead.original_subject.is_empty() {
        return Err(BusError::DeadLetterRead(
            format!("dead letter {sequence} has no {DLQ_SUBJECT_HEADER} header").into(),
        ));
    }
    let published = bus
        .publish_raw(
            &dead.original_subject,
            redrive_headers(&dead),
            dead.payload.clone(),
            "redrive",
        )
        .await?;
    let stream = bus
        .jetstream()
        .get_stream(subject::DLQ_STREAM)
        .await
        .map_err(|e| BusError::DeadLetterRead(Box::new(e)))?;
    match stream.delete_message(sequence).await {
        Ok(_) => {}
        // Deleted meanwhile (a concurrent redrive): the copy is stored once by its id.
        Err(e) if e.to_string().contains("no message found") => {}
        Err(e) => {
            return Err(BusError::DeadLetterDelete {
                sequence,
                source: Box::new(e),
            });
        }
    }
    Ok(Redriven::Published {
        subject: dead.original_subject,
        sequence: published.sequence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redrive_keeps_the_trace_drops_the_dead_letter_headers_and_has_its_own_id() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        h.insert(async_nats::header::NATS_MESSAGE_ID, "dlq:scratch-h:3");
        h.insert(DLQ_SUBJECT_HEADER, "wnodes.evt.h.vm.stopped");
        h.insert(DLQ_REASON_HEADER, "exhausted");
        let dead = from_parts(9, None, "wnodes.dlq.scratch-h".into(), h, Bytes::new());
        let out = redrive_headers(&dead);
        assert_eq!(
            out.get("traceparent").map(|v| v.as_str()),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(
            out.get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str()),
            Some("redrive:9")
        );
        assert!(out.get(DLQ_SUBJECT_HEADER).is_none());
        assert!(out.get(DLQ_REASON_HEADER).is_none());
    }
}
