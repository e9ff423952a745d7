//! The streams (events, dead letters, the heartbeats' bucket) and durable consumers on the server: made, checked or updated from the site
//! description, with the same definitions the services check against
//! ([`wnodes_bus::layout`]).

use std::collections::HashMap;

use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt;
use wnodes_bus::{
    heartbeat,
    layout::{self, Coverage},
    subject::EVENTS_STREAM,
};

use crate::{
    auth::Mode,
    description::SiteDescription,
    error::SiteError,
    report::{Action, Change, Report},
};

/// Settings of a stream the server cannot change in place.
const IMMUTABLE_STREAM: [&str; 3] = ["retention", "storage", "max_consumers"];
/// Settings of a consumer the server cannot change in place.
const IMMUTABLE_CONSUMER: [&str; 3] = ["deliver_policy", "ack_policy", "durable_name"];

/// Makes or checks both streams and every durable the description needs.
pub async fn provision(
    js: &jetstream::Context,
    site: &SiteDescription,
    mode: Mode,
) -> Result<Report, SiteError> {
    let mut report = Report::default();
    let l = site.layout();
    let events = layout::events_stream(&l, site.streams.max_consumers);
    let events_exists = provision_stream(js, events, mode, &mut report).await?;
    provision_stream(js, layout::dlq_stream(&l), mode, &mut report).await?;
    // The services' heartbeats (`wnodesctl hosts`): a key-value bucket's stream.
    provision_stream(js, heartbeat::hosts_stream(&l), mode, &mut report).await?;

    // Every consumer of the events stream, listed in pages (one request per 256, not one per
    // durable: a site has tens of thousands).
    let mut existing: HashMap<String, consumer::Config> = HashMap::new();
    if events_exists {
        let stream = js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| SiteError::js("read", format!("stream {EVENTS_STREAM}"), e))?;
        let mut list = stream.consumers();
        while let Some(info) = list
            .try_next()
            .await
            .map_err(|e| SiteError::js("list the consumers of", EVENTS_STREAM, e))?
        {
            existing.insert(info.name.clone(), info.config);
        }
    }
    let mut wanted = std::collections::HashSet::new();
    for d in site.durables()? {
        let expected = layout::durable_consumer(
            &d.name,
            d.filters.clone(),
            &site.consumer,
            site.streams.consumer_replicas,
        );
        wanted.insert(d.name.clone());
        report.push(provision_consumer(js, expected, existing.get(&d.name), mode).await?);
    }
    // Durables of hosts or roles the description no longer names. Ephemeral watches (no
    // durable name) are the services' own and expire by themselves.
    let mut stale: Vec<&String> = existing
        .iter()
        .filter(|(name, cfg)| cfg.durable_name.is_some() && !wanted.contains(*name))
        .map(|(name, _)| name)
        .collect();
    stale.sort();
    for name in stale {
        report.push(Change::new(
            format!("consumer {name}"),
            Action::Stale,
            "not in the site description (remove it with `nats consumer rm` once drained)",
        ));
    }
    Ok(report)
}

/// Makes, checks or updates one durable, given what the server has (`found`).
async fn provision_consumer(
    js: &jetstream::Context,
    expected: consumer::Config,
    found: Option<&consumer::Config>,
    mode: Mode,
) -> Result<Change, SiteError> {
    let object = format!(
        "consumer {}",
        expected.durable_name.as_deref().unwrap_or_default()
    );
    let (action, detail) = match found {
        None => (Action::Create, String::new()),
        Some(found) => {
            let diffs = layout::consumer_differences(&expected, found, Coverage::Operator);
            if diffs.is_empty() {
                (Action::Unchanged, String::new())
            } else if diffs.iter().any(|d| IMMUTABLE_CONSUMER.contains(&d.field)) {
                (Action::CannotChange, layout::describe(&diffs))
            } else {
                (Action::Update, layout::describe(&diffs))
            }
        }
    };
    if mode == Mode::Apply && matches!(action, Action::Create | Action::Update) {
        js.create_consumer_on_stream(expected, EVENTS_STREAM)
            .await
            .map_err(|e| SiteError::js("create or update", object.clone(), e))?;
    }
    Ok(Change::new(object, action, detail))
}

/// Makes, checks or updates one durable on the events stream (tests and benchmarks that tune
/// one consumer differently from the rest of the site).
pub async fn provision_durable(
    js: &jetstream::Context,
    expected: consumer::Config,
    mode: Mode,
) -> Result<Change, SiteError> {
    let name = expected.durable_name.clone().unwrap_or_default();
    let found = match js
        .get_consumer_from_stream::<consumer::Config, _, _>(&name, EVENTS_STREAM)
        .await
    {
        Ok(c) => Some(c.cached_info().config.clone()),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) =>
        {
            None
        }
        Err(e) => return Err(SiteError::js("read", format!("consumer {name}"), e)),
    };
    provision_consumer(js, expected, found.as_ref(), mode).await
}

/// Makes, checks or updates one stream. Returns whether it exists afterwards.
async fn provision_stream(
    js: &jetstream::Context,
    expected: stream::Config,
    mode: Mode,
    report: &mut Report,
) -> Result<bool, SiteError> {
    let object = format!("stream {}", expected.name);
    let found = match js.get_stream(&expected.name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map_err(|e| SiteError::js("read", object.clone(), e))?
                .config
                .clone(),
        ),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(e) => return Err(SiteError::js("read", object, e)),
    };
    let (action, detail) = match &found {
        None => (Action::Create, String::new()),
        Some(found) => {
            let diffs = layout::stream_differences(&expected, found, Coverage::Operator);
            if diffs.is_empty() {
                (Action::Unchanged, String::new())
            } else if diffs.iter().any(|d| IMMUTABLE_STREAM.contains(&d.field)) {
                (Action::CannotChange, layout::describe(&diffs))
            } else {
                (Action::Update, layout::describe(&diffs))
            }
        }
    };
    let exists = match (mode, &action) {
        (Mode::Apply, Action::Create) => {
            js.create_stream(expected)
                .await
                .map_err(|e| SiteError::js("create", object.clone(), e))?;
            true
        }
        (Mode::Apply, Action::Update) => {
            js.update_stream(expected)
                .await
                .map_err(|e| SiteError::js("update", object.clone(), e))?;
            true
        }
        _ => found.is_some(),
    };
    report.push(Change::new(object, action, detail));
    Ok(exists)
}
