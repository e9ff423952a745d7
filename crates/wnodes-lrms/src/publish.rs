//! Publishing normalised events through [`wnodes_bus::Bus`].
//!
//! [`Publisher`] converts events ([`crate::convert::to_event`]) and publishes them with
//! [`Bus::publish_pipelined`]: up to `window` acknowledgements outstanding, each event retried
//! with its own id until JetStream has it. [`replay_to_bus`] is the non-`--dry-run` replay; it
//! reads and parses on a blocking thread, one batch ahead of the publishing.
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
    #[error("the file reader stopped unexpectedly")]
    Reader(#[source] tokio::task::JoinError),
}

/// One batch from the reader thread: the wire events, and where they were read.
struct ReadBatch {
    events: Vec<Event>,
    path: PathBuf,
    line: u64,
}

/// Replays `files` into the bus, `batch` events per publish call. The files are read, parsed
/// and turned into events on a blocking thread while the previous batch is being published
/// (two batches in flight at most), so reading never stalls the runtime and parsing overlaps
/// the wait for acknowledgements.
pub async fn replay_to_bus(
    publisher: &Publisher,
    opts: &ReplayOptions,
    files: &[PathBuf],
    batch: usize,
) -> Result<Summary, PublishReplayError> {
    let batch = batch.max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<ReadBatch, ReplayError>>(1);
    let (opts, files) = (opts.clone(), files.to_vec());
    let (site, source) = (publisher.site.clone(), publisher.bus.source().to_owned());
    let reader = tokio::task::spawn_blocking(move || -> Summary {
        let mut summary = Summary::default();
        for path in &files {
            let mut r = match FileReader::open(&opts, path) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return summary;
                }
            };
            let mut events = Vec::with_capacity(batch);
            loop {
                let item = match r.next_item() {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return summary;
                    }
                };
                let done = item.is_none();
                if let Some(item) = item {
                    summary.count(&item, path);
                    if let Item::Event(e) = item {
                        events.push(to_event(&e, &site, &source));
                    }
                }
                if events.len() >= batch || (done && !events.is_empty()) {
                    let b = ReadBatch {
                        events: std::mem::replace(&mut events, Vec::with_capacity(batch)),
                        path: path.clone(),
                        line: r.line(),
                    };
                    if tx.blocking_send(Ok(b)).is_err() {
                        return summary; // the publisher gave up
                    }
                }
                if done {
                    break;
                }
            }
        }
        summary
    });
    while let Some(msg) = rx.recv().await {
        let b = msg.map_err(PublishReplayError::Read)?;
        publisher
            .bus
            .publish_pipelined(&b.events, publisher.window)
            .await
            .map_err(|source| PublishReplayError::Publish {
                path: b.path,
                line: b.line,
                source,
            })?;
    }
    reader.await.map_err(PublishReplayError::Reader)
}
