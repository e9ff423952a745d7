//! Publishing normalised events through [`wnodes_bus::Bus`].
//!
//! [`Publisher`] converts events ([`crate::convert::to_event`]) and publishes them with
//! [`Bus::publish_pipelined`]: up to `window` acknowledgements outstanding, each event retried
//! with its own id until JetStream has it. [`replay_to_bus`] is the non-`--dry-run` replay; it
//! reads and parses on a blocking thread, one batch ahead of the publishing.
//! The follower's contract ([`crate::follow`]) is met by publishing a batch with
//! [`Publisher::publish_items`] and storing the batch's cursor only after it returns `Ok`;
//! [`follow_to_bus`] is that loop.

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
    hints: crate::event::ImageHints,
}

impl Publisher {
    /// Events of `site`, from the bus's own source, with `window` acks in flight.
    pub fn new(bus: Bus, site: impl Into<String>, window: usize) -> Self {
        Self {
            bus,
            site: site.into(),
            window: window.max(1),
            hints: Default::default(),
        }
    }

    /// Applies the site's image hints to the queued events [`Self::publish_items`] publishes
    /// (replays apply them while reading, through [`ReplayOptions::image_hints`]).
    pub fn with_image_hints(mut self, hints: crate::event::ImageHints) -> Self {
        self.hints = hints;
        self
    }

    /// The wire events for `events`.
    pub fn events(&self, events: &[LrmsEvent]) -> Vec<Event> {
        events
            .iter()
            .map(|e| to_event(e, &self.site, self.bus.source()))
            .collect()
    }

    /// Publishes `events`; on `Ok` JetStream has stored (or de-duplicated) every one. Each is
    /// published in a producer span of its own, `bridge.lrms_event`, in its run's trace (the
    /// trace id derived from the run key: `wnodes_bus::propagation::run_context`), so that what
    /// the LRMS reports joins the trace of the run's VM.
    pub async fn publish(&self, events: &[LrmsEvent]) -> Result<(), BusError> {
        let wire = self.events(events);
        let spans: Vec<tracing::Span> = wire
            .iter()
            .zip(events)
            .map(|(w, e)| {
                let key = w
                    .run
                    .as_ref()
                    .map(wnodes_bus::event::run_key)
                    .unwrap_or_default();
                let span = tracing::info_span!(
                    "bridge.lrms_event",
                    otel.kind = "producer",
                    wnodes.run = key.as_str(),
                    lrms.record = e.lrms_record.as_str(),
                    messaging.message.id = w.id.as_str(),
                );
                wnodes_bus::propagation::set_parent(
                    &span,
                    wnodes_bus::propagation::run_context(&key),
                );
                span
            })
            .collect();
        let pairs: Vec<(&Event, &tracing::Span)> = wire.iter().zip(&spans).collect();
        self.bus.publish_pipelined_in(&pairs, self.window).await
    }

    /// Publishes the events among `items`.
    pub async fn publish_items(&self, items: &[Item]) -> Result<(), BusError> {
        let events: Vec<LrmsEvent> = items
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => {
                    let mut e = (**e).clone();
                    self.hints.apply(&mut e);
                    Some(e)
                }
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

/// How [`follow_to_bus`] paces itself.
#[derive(Debug, Clone)]
pub struct FollowLoopOptions {
    /// Sleep between polls when the file had nothing new.
    pub poll_interval: std::time::Duration,
    /// After this long without new data, events held back for enrichment (an HTCondor submit
    /// waiting for its 028) are published.
    pub idle_flush: std::time::Duration,
}

impl Default for FollowLoopOptions {
    fn default() -> Self {
        Self {
            poll_interval: std::time::Duration::from_millis(250),
            idle_flush: std::time::Duration::from_secs(2),
        }
    }
}

/// What a [`follow_to_bus`] loop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowStats {
    /// Events published (each acknowledged by JetStream before its cursor was stored).
    pub published: u64,
    /// Malformed records skipped (each logged with file and line).
    pub malformed: u64,
    /// Cursors stored.
    pub cursors_saved: u64,
}

/// Why a [`follow_to_bus`] loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowToBusError {
    #[error("following the LRMS file failed")]
    Follow(#[source] crate::follow::FollowError),
    #[error("publishing events of {path} failed")]
    Publish {
        path: PathBuf,
        #[source]
        source: BusError,
    },
    #[error("the file reader stopped unexpectedly")]
    Reader(#[source] tokio::task::JoinError),
}

/// Follows one file into the bus until `shutdown`: poll (on a blocking thread), publish the
/// batch, and only then store its cursor in `store`. A restart with the same store resumes
/// where the last acknowledged batch ended (see [`crate::follow`]).
pub async fn follow_to_bus(
    publisher: &Publisher,
    follower: crate::follow::Follower,
    store: crate::follow::CursorFile,
    opts: &FollowLoopOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<FollowStats, FollowToBusError> {
    let path = follower.path().to_owned();
    let mut follower = Some(follower);
    let mut stats = FollowStats::default();
    let mut summary = Summary::default();
    let mut last_saved: Option<crate::follow::Cursor> = None;
    let mut idle_since = tokio::time::Instant::now();
    let mut flushed = false;
    while !shutdown.is_cancelled() {
        let Some(mut f) = follower.take() else {
            break;
        };
        let idle_for = idle_since.elapsed();
        let flush = !flushed && idle_for >= opts.idle_flush;
        let (f, res) = tokio::task::spawn_blocking(move || {
            let r = if flush { Ok(f.flush_held()) } else { f.poll() };
            (f, r)
        })
        .await
        .map_err(FollowToBusError::Reader)?;
        follower = Some(f);
        let batch = res.map_err(FollowToBusError::Follow)?;
        for note in &batch.notes {
            tracing::info!(file = %path.display(), "{note}");
        }
        let before = summary.emitted;
        let malformed_before = summary.malformed;
        for item in &batch.items {
            summary.count(item, &path);
        }
        stats.malformed += summary.malformed - malformed_before;
        let events = summary.emitted - before;
        if events > 0 {
            publisher
                .publish_items(&batch.items)
                .await
                .map_err(|source| FollowToBusError::Publish {
                    path: path.clone(),
                    source,
                })?;
            stats.published += events;
        }
        if last_saved.as_ref() != Some(&batch.cursor) {
            let (s, c) = (store.clone(), batch.cursor.clone());
            tokio::task::spawn_blocking(move || s.save(&c))
                .await
                .map_err(FollowToBusError::Reader)?
                .map_err(FollowToBusError::Follow)?;
            stats.cursors_saved += 1;
            last_saved = Some(batch.cursor);
        }
        if batch.items.is_empty() {
            if flush {
                flushed = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(opts.poll_interval) => {}
            }
        } else {
            idle_since = tokio::time::Instant::now();
            flushed = flush;
        }
    }
    Ok(stats)
}
