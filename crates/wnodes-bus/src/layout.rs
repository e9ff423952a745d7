//! The streams and durable consumers as the operator provisions them (`wnodesctl provision`)
//! and as each service expects to find them: one definition of each, and the comparison that
//! names every difference. Services never create or update them (ARCHITECTURE.md, "Trust
//! boundaries"); at start each checks what it needs with [`check_stream`] and
//! [`check_consumer`] and is not ready while they differ.

use std::{fmt, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy},
    stream,
};

use crate::{
    config::{ConsumerTuning, NatsConfig},
    error::BusError,
    subject,
};

/// The stream settings a service's `[nats]` section and a site description share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLayout {
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub events_max_age: Duration,
    pub dlq_max_age: Duration,
}

impl From<&NatsConfig> for StreamLayout {
    fn from(c: &NatsConfig) -> Self {
        Self {
            replicas: c.stream_replicas,
            duplicate_window: c.duplicate_window,
            events_max_age: c.events_max_age,
            dlq_max_age: c.dlq_max_age,
        }
    }
}

/// The events stream: every lifecycle event, limits retention (several services read each).
/// `max_consumers` is the operator's (0: the server's default, 1,000 on 2.15).
pub fn events_stream(l: &StreamLayout, max_consumers: i32) -> stream::Config {
    stream::Config {
        name: subject::EVENTS_STREAM.into(),
        description: Some("WNoDeS job and VM lifecycle events".into()),
        subjects: vec![subject::EVENTS_SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: l.replicas,
        duplicate_window: l.duplicate_window,
        max_age: l.events_max_age,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        max_consumers,
        ..Default::default()
    }
}

/// The dead-letter stream.
pub fn dlq_stream(l: &StreamLayout) -> stream::Config {
    stream::Config {
        name: subject::DLQ_STREAM.into(),
        description: Some("WNoDeS dead letters: messages a consumer gave up on".into()),
        subjects: vec![subject::DLQ_SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: l.replicas,
        duplicate_window: l.duplicate_window,
        max_age: l.dlq_max_age,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        // Unlimited, as the server reports its default: only readers use it.
        max_consumers: -1,
        ..Default::default()
    }
}

/// A durable consumer on the events stream. `replicas` 0 inherits the stream's.
pub fn durable_consumer(
    durable: &str,
    filter_subjects: Vec<String>,
    t: &ConsumerTuning,
    replicas: usize,
) -> jetstream::consumer::Config {
    jetstream::consumer::Config {
        durable_name: Some(durable.into()),
        name: Some(durable.into()),
        description: Some(format!("WNoDeS consumer {durable}")),
        ack_policy: AckPolicy::Explicit,
        ack_wait: t.ack_wait,
        // The handler gets max_attempts tries; a delivery past them is dead-lettered without
        // running it (consumer.rs), so the server never gives up silently.
        max_deliver: i64::from(t.max_attempts) + 2,
        filter_subjects,
        max_ack_pending: max_ack_pending(t),
        deliver_policy: DeliverPolicy::All,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Unacknowledged messages the server lets one consumer have: room for the handlers in
/// flight (or a batched handler's two batches) and the next pulls already delivered.
pub fn max_ack_pending(t: &ConsumerTuning) -> i64 {
    (t.max_in_flight.max(t.max_batch) * 4).max(256) as i64
}

/// One setting that is not what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: &'static str,
    pub expected: String,
    pub found: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {} (expected {})",
            self.field, self.found, self.expected
        )
    }
}

/// Differences rendered as one line: `max_age is 1h (expected 7days); num_replicas is …`.
pub fn describe(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Which settings a comparison covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// What a service relies on.
    Service,
    /// Everything provisioning sets (adds `max_consumers`, consumer replicas, descriptions).
    Operator,
}

fn d(field: &'static str, expected: impl fmt::Debug, found: impl fmt::Debug) -> Difference {
    Difference {
        field,
        expected: format!("{expected:?}"),
        found: format!("{found:?}"),
    }
}

fn h(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn dur(field: &'static str, expected: Duration, found: Duration) -> Option<Difference> {
    (expected != found).then(|| Difference {
        field,
        expected: h(expected),
        found: h(found),
    })
}

macro_rules! same {
    ($out:ident, $e:ident, $f:ident, $($field:ident),+) => {
        $(
            if $e.$field != $f.$field {
                $out.push(d(stringify!($field), &$e.$field, &$f.$field));
            }
        )+
    };
}

/// How `found` differs from `expected` in the settings `coverage` covers.
pub fn stream_differences(
    expected: &stream::Config,
    found: &stream::Config,
    coverage: Coverage,
) -> Vec<Difference> {
    let mut out = Vec::new();
    same!(
        out,
        expected,
        found,
        subjects,
        retention,
        storage,
        num_replicas,
        discard,
        allow_direct
    );
    out.extend(dur("max_age", expected.max_age, found.max_age));
    out.extend(dur(
        "duplicate_window",
        expected.duplicate_window,
        found.duplicate_window,
    ));
    if coverage == Coverage::Operator {
        same!(out, expected, found, max_consumers, description);
    }
    out
}

/// How `found` differs from `expected` in the settings `coverage` covers.
pub fn consumer_differences(
    expected: &jetstream::consumer::Config,
    found: &jetstream::consumer::Config,
    coverage: Coverage,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut e_filters = expected.filter_subjects.clone();
    let mut f_filters = found.filter_subjects.clone();
    if !found.filter_subject.is_empty() {
        f_filters.push(found.filter_subject.clone());
    }
    e_filters.sort();
    f_filters.sort();
    if e_filters != f_filters {
        out.push(d("filter_subjects", e_filters, f_filters));
    }
    same!(
        out,
        expected,
        found,
        durable_name,
        ack_policy,
        max_deliver,
        max_ack_pending,
        deliver_policy
    );
    out.extend(dur("ack_wait", expected.ack_wait, found.ack_wait));
    if coverage == Coverage::Operator {
        same!(out, expected, found, num_replicas, description);
    }
    out
}

/// Checks that the stream `expected.name` exists with the settings a service relies on.
pub async fn check_stream(
    js: &jetstream::Context,
    expected: &stream::Config,
) -> Result<(), BusError> {
    let mut stream = js
        .get_stream(&expected.name)
        .await
        .map_err(|e| BusError::NotProvisioned {
            what: format!("stream `{}`", expected.name),
            source: Box::new(e),
        })?;
    let info = stream.info().await.map_err(|e| BusError::NotProvisioned {
        what: format!("stream `{}`", expected.name),
        source: Box::new(e),
    })?;
    let diffs = stream_differences(expected, &info.config, Coverage::Service);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(BusError::Mismatch {
            what: format!("stream `{}`", expected.name),
            differences: describe(&diffs),
        })
    }
}

/// Whether `err` is a stream check whose request timed out, rather than an answer (the stream
/// is missing or differs) or a server without JetStream (no responders): the state of a NATS
/// cluster that lost the server leading that stream, until a new leader is elected.
pub fn is_unanswered(err: &BusError) -> bool {
    use async_nats::jetstream::context::{
        GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind,
    };
    fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
        e.downcast_ref::<RequestError>()
            .is_some_and(|r| r.kind() == RequestErrorKind::TimedOut)
    }
    let BusError::NotProvisioned { source, .. } = err else {
        return false;
    };
    match source.downcast_ref::<GetStreamError>() {
        Some(e) => {
            e.kind() == GetStreamErrorKind::Request
                && std::error::Error::source(e).is_some_and(timed_out)
        }
        None => timed_out(source.as_ref()),
    }
}

/// Checks that durable `expected.durable_name` exists on the events stream with the settings
/// the service relies on, and returns it.
pub async fn check_consumer(
    js: &jetstream::Context,
    expected: &jetstream::consumer::Config,
) -> Result<jetstream::consumer::PullConsumer, BusError> {
    let name = expected.durable_name.clone().unwrap_or_default();
    let what = format!(
        "durable consumer `{name}` on stream `{}`",
        subject::EVENTS_STREAM
    );
    let consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(&name, subject::EVENTS_STREAM)
        .await
        .map_err(|e| BusError::NotProvisioned {
            what: what.clone(),
            source: Box::new(e),
        })?;
    let found = &consumer.cached_info().config;
    let diffs = consumer_differences(expected, found, Coverage::Service);
    if diffs.is_empty() {
        Ok(consumer)
    } else {
        Err(BusError::Mismatch {
            what,
            differences: describe(&diffs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_checks_that_got_no_answer_are_unanswered() {
        use async_nats::jetstream::context::{
            GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind,
        };
        let not_provisioned =
            |source: Box<dyn std::error::Error + Send + Sync>| BusError::NotProvisioned {
                what: "stream `WNODES_EVENTS`".into(),
                source,
            };
        let timed_out = || RequestError::new(RequestErrorKind::TimedOut);
        let unanswered = [
            not_provisioned(Box::new(GetStreamError::with_source(
                GetStreamErrorKind::Request,
                timed_out(),
            ))),
            not_provisioned(Box::new(timed_out())),
        ];
        for e in &unanswered {
            assert!(is_unanswered(e), "{e:?}");
        }
        let answered = [
            // A server without JetStream: nobody will ever answer.
            not_provisioned(Box::new(GetStreamError::with_source(
                GetStreamErrorKind::Request,
                RequestError::new(RequestErrorKind::NoResponders),
            ))),
            not_provisioned(Box::new(RequestError::new(RequestErrorKind::NoResponders))),
            not_provisioned(Box::new(GetStreamError::new(GetStreamErrorKind::Request))),
            not_provisioned(Box::new(GetStreamError::new(
                GetStreamErrorKind::InvalidStreamName,
            ))),
            not_provisioned(Box::new(RequestError::new(RequestErrorKind::Other))),
            not_provisioned(Box::new(std::io::Error::other("anything else"))),
            BusError::Mismatch {
                what: "stream `WNODES_EVENTS`".into(),
                differences: "max_age".into(),
            },
        ];
        for e in &answered {
            assert!(!is_unanswered(e), "{e:?}");
        }
    }

    #[test]
    fn differences_name_the_field_and_both_values() {
        let l = StreamLayout::from(&NatsConfig::default());
        let expected = events_stream(&l, 0);
        let mut found = expected.clone();
        assert!(stream_differences(&expected, &found, Coverage::Operator).is_empty());
        found.max_age = Duration::from_secs(3600);
        found.max_consumers = 5000;
        let service = stream_differences(&expected, &found, Coverage::Service);
        assert_eq!(describe(&service), "max_age is 1h (expected 7days)");
        let operator = stream_differences(&expected, &found, Coverage::Operator);
        assert_eq!(operator.len(), 2, "{operator:?}");
        assert_eq!(
            operator[1].to_string(),
            "max_consumers is 5000 (expected 0)"
        );
    }

    #[test]
    fn consumer_filters_compare_as_sets() {
        let t = ConsumerTuning::default();
        let e = durable_consumer("x", vec!["a.b".into(), "c.d".into()], &t, 0);
        let mut f = durable_consumer("x", vec!["c.d".into(), "a.b".into()], &t, 0);
        assert!(consumer_differences(&e, &f, Coverage::Service).is_empty());
        f.filter_subjects = vec!["a.b".into()];
        f.ack_wait = Duration::from_secs(5);
        let diffs = describe(&consumer_differences(&e, &f, Coverage::Service));
        assert!(diffs.contains("filter_subjects"), "{diffs}");
        assert!(diffs.contains("ack_wait is 5s (expected 30s)"), "{diffs}");
    }
}
