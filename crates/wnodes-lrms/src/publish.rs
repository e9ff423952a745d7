//! Publishing normalised events through [`wnodes_bus::Bus`].
//!
//! [`Publisher`] converts events ([`crate::convert::to_event`]) and publishes them with
//! [`Bus::publish_pipelined`]: up to `window` acknowledgements outstanding, each event retried
//! with its own id until JetStream has it. [`replay_to_bus`] is the non-`--dry-run` replay.
//! The follower's contract ([`crate::follow`]) is met by publishing a batch with
//! [`Publisher::publish`] and storing the batch's cursor only after it returns `Ok`.

use std::path::PathBuf;

use wnodes_bus::{Bus, BusError};
use wnodes_proto::v1::Event;

use crate::{
    convert::to_event,
    event::LrmsEvent,
    parse::Item,
    replay::{FileReader, ReplayError, ReplayOptions, Summary},
};

/// Publishes normalised events for one site.
#[derive(Debug, Clone)]
pub struct Publisher {
    bus: Bus,
    site: String,
    window: usize,
}

impl Publisher {
    /// Events of `site`, from the bus's own source, with `window` acks in flight.
    pub fn new(bus: Bus, site: impl Into<String>, window: usize) -> Self {
        Self {
            bus,
            site: site.into(),
            window: window.max(1),
        }
    }

    /// The wire events for `events`.
    pub fn events(&self, events: &[LrmsEvent]) -> Vec<Event> {
        events
            .iter()
            .map(|e| to_event(e, &self.site, self.bus.source()))
            .collect()
    }

    /// Publishes `events`; on `Ok` JetStream has stored (or de-duplicated) every one.
    pub async fn publish(&self, events: &[LrmsEvent]) -> Result<(), BusError> {
        let wire = self.events(events);
        self.bus.publish_pipelined(&wire, self.window).await
    }

    /// Publishes the events among `items`.
    pub async fn publish_items(&self, items: &[Item]) -> Result<(), BusError> {
        let events: Vec<LrmsEvent> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some((**e).clone()),
                _ => None,
            })
            .collect();
        self.publish(&events).await
    }
}

/// Why a publishing replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishReplayError {
    #[error("reading the LRMS files failed")]
    Read(#[source] ReplayError),
    #[error("publishing events read from {path} up to line {line} failed")]
    Publish {
        path: PathBuf,
        line: u64,
        #[source]
        source: BusError,
    },
}

/// Replays `files` into the bus, `batch` events at a time. File reads are synchronous between
/// publishes (run it on a multi-threaded runtime).
pub async fn replay_to_bus(
    publisher: &Publisher,
    opts: &ReplayOptions,
    files: &[PathBuf],
    batch: usize,
) -> Result<Summary, PublishReplayError> {
    let batch = batch.max(1);
    let mut summary = Summary::default();
    let mut pending: Vec<LrmsEvent> = Vec::with_capacity(batch);
    for path in files {
        let mut r = FileReader::open(opts, path).map_err(PublishReplayError::Read)?;
        loop {
            let item = r.next_item().map_err(PublishReplayError::Read)?;
            let done = item.is_none();
            if let Some(item) = item {
                summary.count(&item, path);
                if let Item::Event(e) = item {
                    pending.push(*e);
                }
            }
            if pending.len() >= batch || (done && !pending.is_empty()) {
                publisher.publish(&pending).await.map_err(|source| {
                    PublishReplayError::Publish {
                        path: path.clone(),
                        line: r.line(),
                        source,
                    }
                })?;
                pending.clear();
            }
            if done {
                break;
            }
        }
    }
    Ok(summary)
}
