//! Prefetch requests from the operator (`wnodesctl prefetch`), on
//! `wnodes.ctl.<host token>.image.prefetch` ([`wnodes_bus::control`]): a catalog image (disk,
//! kernel, initrd) is fetched into the cache now, through the same single-flight cache as
//! `vm.requested`, so a prefetch that joins a running fetch, or races a VM's request for the
//! same image, downloads nothing twice.
//!
//! Answers (`wnodes.v1.PrefetchProgress`) go to the request's reply subject: one at once naming
//! the parts and their sizes, one every [`PROGRESS_EVERY`] while anything is being fetched, and
//! a last one with the outcome (only that one when everything is cached): done (fetched, or everything was already cached) or failed with
//! a reason. The service stops answering when the requester's `wait` ends, at most
//! [`ANSWER_WINDOW`] (inside the identity's `resp` permission), or when it stops; the fetch
//! itself goes on in the cache.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::FutureExt;
use prost::Message;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use wnodes_bus::{
    BusError, ErrorChain,
    control::{Replier, Request, Requests},
    proto,
};

use crate::{
    cache::{Cache, Fetch, Started},
    config::{Artifact, CatalogEntry},
};

/// How often a request that waits for a fetch hears how far it is.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The longest a request is answered: below the `resp` permission's TTL, and at one progress
/// message per [`PROGRESS_EVERY`] below its message count.
pub const ANSWER_WINDOW: Duration = Duration::from_secs(55 * 60);

/// Serves the prefetch requests of one host.
#[derive(Debug, Clone)]
pub struct PrefetchServer {
    catalog: Arc<BTreeMap<String, CatalogEntry>>,
    cache: Cache,
    host: String,
}

/// One part of the image, as the request sees it.
enum Part {
    Cached(u64),
    Fetching(Fetch),
    Fetched(u64),
}

impl PrefetchServer {
    pub fn new(catalog: BTreeMap<String, CatalogEntry>, cache: Cache, host: String) -> Self {
        Self {
            catalog: Arc::new(catalog),
            cache,
            host,
        }
    }

    /// Answers `requests` until `shutdown`; each request is answered in its own task, and those
    /// still waiting at shutdown end with "the image service is stopping".
    pub async fn run(
        self,
        mut requests: Requests,
        shutdown: CancellationToken,
    ) -> Result<(), wnodes_runtime::BoxError> {
        tracing::info!(subject = requests.subject(), "Taking prefetch requests.");
        let answers = TaskTracker::new();
        let ended = loop {
            tokio::select! {
                () = shutdown.cancelled() => break None,
                req = requests.next() => match req {
                    Some(req) => {
                        let (this, stop) = (self.clone(), shutdown.clone());
                        answers.spawn(async move { this.answer(req, stop).await });
                    }
                    None => break Some(requests.subject().to_owned()),
                },
            }
        };
        answers.close();
        answers.wait().await;
        match ended {
            None => Ok(()),
            Some(subject) => Err(format!("the subscription to {subject} ended").into()),
        }
    }

    async fn answer(&self, req: Request, shutdown: CancellationToken) {
        let Some(replier) = req.replier else {
            tracing::warn!("A prefetch request without a reply subject; ignored.");
            return;
        };
        let span = tracing::info_span!("image.prefetch", image = tracing::field::Empty);
        wnodes_bus::propagation::set_parent_from(&span, req.headers.as_ref());
        let work = async {
            let image = match proto::PrefetchRequest::decode(req.payload) {
                Ok(r) => r,
                Err(e) => {
                    let reason = format!("malformed prefetch request: {e}");
                    tracing::warn!(%reason, "Prefetch refused.");
                    return self.send(&replier, "", Vec::new(), failed(reason)).await;
                }
            };
            tracing::Span::current().record("image", image.image.as_str());
            self.prefetch(&image, &replier, shutdown).await
        };
        if let Err(e) = work.instrument(span).await {
            tracing::warn!(error = %ErrorChain(&e), "Cannot answer a prefetch request.");
        }
    }

    async fn send(
        &self,
        replier: &Replier,
        image: &str,
        artifacts: Vec<proto::PrefetchArtifact>,
        outcome: Option<proto::prefetch_progress::Outcome>,
    ) -> Result<(), BusError> {
        replier
            .send(&proto::PrefetchProgress {
                host: self.host.clone(),
                image: image.to_owned(),
                artifacts,
                outcome,
            })
            .await
    }

    async fn prefetch(
        &self,
        req: &proto::PrefetchRequest,
        replier: &Replier,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let image = req.image.as_str();
        let wait = req
            .wait
            .and_then(|d| Duration::try_from(d).ok())
            .map_or(ANSWER_WINDOW, |d| d.min(ANSWER_WINDOW));
        let Some(entry) = self.catalog.get(image) else {
            let reason = format!("image '{image}' is not in this host's catalog");
            tracing::warn!(%reason, "Prefetch refused.");
            return self.send(replier, image, Vec::new(), failed(reason)).await;
        };
        let named: Vec<(&'static str, Artifact)> = std::iter::once(("disk", entry.disk()))
            .chain(entry.kernel.clone().map(|k| ("kernel", k)))
            .chain(entry.initrd.clone().map(|i| ("initrd", i)))
            .collect();
        let mut parts = Vec::with_capacity(named.len());
        for (name, art) in &named {
            match self.cache.start(art) {
                Ok(Started::Cached(c)) => parts.push(Part::Cached(c.size_bytes)),
                Ok(Started::Fetching(f)) => parts.push(Part::Fetching(f)),
                Err(e) => {
                    let reason = format!("{}: {}", label(name, image), ErrorChain(&e));
                    return self.send(replier, image, Vec::new(), failed(reason)).await;
                }
            }
        }
        let fetched = parts.iter().any(|p| matches!(p, Part::Fetching(_)));
        let waits = futures::future::try_join_all(parts.iter().enumerate().filter_map(|(i, p)| {
            let Part::Fetching(f) = p else { return None };
            let name = named[i].0;
            Some(
                f.wait()
                    .map(move |r| r.map(|c| (i, c)).map_err(|e| (name, e))),
            )
        }));
        let snapshot = |parts: &[Part]| -> Vec<proto::PrefetchArtifact> {
            parts
                .iter()
                .zip(&named)
                .map(|(p, (name, art))| {
                    let (done, total, cached) = match p {
                        Part::Cached(size) => (*size, *size, true),
                        Part::Fetched(size) => (*size, *size, false),
                        Part::Fetching(f) => (
                            f.progress().done(),
                            f.progress().total().unwrap_or(0),
                            false,
                        ),
                    };
                    proto::PrefetchArtifact {
                        part: (*name).to_owned(),
                        sha256: art.sha256.clone(),
                        bytes_done: done,
                        bytes_total: total,
                        cached,
                    }
                })
                .collect()
        };
        if !fetched {
            tracing::info!(fetched, "Prefetch done.");
            let done = proto::prefetch_progress::Outcome::Done(proto::PrefetchDone { fetched });
            self.send(replier, image, snapshot(&parts), Some(done))
                .await?;
            return replier.flush().await;
        }
        self.send(replier, image, snapshot(&parts), None).await?;
        replier.flush().await?;
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(waits, deadline);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let results = loop {
            tokio::select! {
                r = &mut waits => break r,
                _ = tick.tick() => self.send(replier, image, snapshot(&parts), None).await?,
                () = &mut deadline => {
                    let reason = format!(
                        "image '{image}' is still being fetched after {wait:?}; the fetch goes on"
                    );
                    return self.send(replier, image, snapshot(&parts), failed(reason)).await;
                }
                () = shutdown.cancelled() => {
                    let reason = "the image service is stopping".to_owned();
                    return self.send(replier, image, snapshot(&parts), failed(reason)).await;
                }
            }
        };
        match results {
            Ok(done) => {
                for (i, cached) in done {
                    parts[i] = Part::Fetched(cached.size_bytes);
                }
                tracing::info!(fetched, "Prefetch done.");
                let done = proto::prefetch_progress::Outcome::Done(proto::PrefetchDone { fetched });
                self.send(replier, image, snapshot(&parts), Some(done))
                    .await?;
            }
            Err((name, e)) => {
                let reason = format!("{}: {}", label(name, image), ErrorChain(&*e));
                tracing::warn!(%reason, "Prefetch failed.");
                self.send(replier, image, snapshot(&parts), failed(reason))
                    .await?;
            }
        }
        replier.flush().await
    }
}

/// How a reason names a part, as `image.failed` does: "image 'el9'", "kernel of image 'el9'".
fn label(part: &str, image: &str) -> String {
    if part == "disk" {
        format!("image '{image}'")
    } else {
        format!("{part} of image '{image}'")
    }
}

fn failed(reason: String) -> Option<proto::prefetch_progress::Outcome> {
    Some(proto::prefetch_progress::Outcome::Failed(
        proto::PrefetchFailed { reason },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answers_fit_the_identitys_response_permission() {
        use wnodes_bus::control::{RESPONSE_MAX_MSGS, RESPONSE_TTL};
        assert!(ANSWER_WINDOW < RESPONSE_TTL);
        // The first answer, one per interval, and the last.
        let most = ANSWER_WINDOW.as_secs() / PROGRESS_EVERY.as_secs() + 2;
        assert!(most <= u64::from(RESPONSE_MAX_MSGS), "{most}");
    }
}
