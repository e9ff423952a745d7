//! Dead letters: a message a consumer gave up on is copied to `wnodes.dlq.<consumer>` with the
//! original subject, the error and the attempt count in headers, the original payload and trace
//! headers unchanged, and only then terminated on the events stream.

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
            let h = m.headers.clone().unwrap_or_default();
            out.push(DeadLetter {
                dlq_subject: m.subject.to_string(),
                original_subject: header(&h, DLQ_SUBJECT_HEADER),
                error: header(&h, DLQ_ERROR_HEADER),
                reason: header(&h, DLQ_REASON_HEADER),
                attempts: header(&h, DLQ_ATTEMPTS_HEADER).parse().unwrap_or_default(),
                consumer: header(&h, DLQ_CONSUMER_HEADER),
                stream_sequence: header(&h, DLQ_STREAM_SEQ_HEADER)
                    .parse()
                    .unwrap_or_default(),
                headers: h,
                payload: m.payload.clone(),
            });
        }
        if got == 0 || pending == 0 {
            break;
        }
    }
    Ok(out)
}
