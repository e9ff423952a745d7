//! Following one run's events until its VM stopped or failed, with an ephemeral ordered push
//! consumer (no durable state on the server; it goes away with the caller).
//!
//! Push, with one filter (the run's host) and a name: the API subject then carries the filter
//! (`$JS.API.CONSUMER.CREATE.WNODES_EVENTS.<name>.wnodes.evt.<host>.>`), so the job starter's
//! permissions can allow watches of its own host only, and the messages arrive in its own
//! inbox. A pull consumer would need `MSG.NEXT` on any name, which would let it pull from the
//! services' durables (ARCHITECTURE.md, "Trust boundaries").

use async_nats::jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
use futures::StreamExt;
use prost::Message;
use wnodes_bus::{ErrorChain, EventExt, proto, proto::event::Body, subject};

use crate::BridgeError;

/// Consecutive stream errors tolerated (the ordered consumer recreates itself after most).
const MAX_CONSECUTIVE_ERRORS: u32 = 20;

/// Where to start reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Every stored event: finds a run that ended before the call.
    All,
    /// From this stream sequence on (e.g. the sequence of the run's `JobStarted`).
    Sequence(u64),
}

/// How the run's VM ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    Stopped(proto::VmStopped),
    Failed(proto::VmFailed),
}

/// The end of a run, as seen on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub run_key: String,
    pub ending: Ending,
    /// A `JobCancelled` of the run was seen, or the VM stopped with reason `cancelled`.
    pub cancelled: bool,
}

impl RunOutcome {
    /// The gRPC form.
    pub fn to_proto(&self) -> proto::JobOutcome {
        use proto::job_outcome::Result as R;
        let (result, exit_code, failure_reason) = match &self.ending {
            Ending::Stopped(s) => (R::Stopped(s.clone()), s.exit_code, String::new()),
            Ending::Failed(f) => (R::Failed(f.clone()), 0, f.reason.clone()),
        };
        proto::JobOutcome {
            run_key: self.run_key.clone(),
            result: Some(result),
            exit_code,
            failure_reason,
            cancelled: self.cancelled,
        }
    }
}

/// A unique consumer name (`watch_<nuid>`; a name puts the filter into the API subject).
fn watch_name(bus: &wnodes_bus::Bus) -> String {
    let inbox = bus.client().new_inbox();
    format!("watch_{}", inbox.rsplit('.').next().unwrap_or_default())
}

/// Reads `host`'s events from `from` until the run `run_key` has a `VmStopped` or `VmFailed`,
/// calling `on_event` for each of the run's events on the way (the last one included).
pub async fn run_outcome(
    bus: &wnodes_bus::Bus,
    host: &str,
    from: From,
    run_key: &str,
    mut on_event: impl FnMut(&proto::Event),
) -> Result<RunOutcome, BridgeError> {
    let js_err = |e: Box<dyn std::error::Error + Send + Sync>| BridgeError::JetStream(e);
    let stream = bus
        .jetstream()
        .get_stream(subject::EVENTS_STREAM)
        .await
        .map_err(|e| js_err(Box::new(e)))?;
    let deliver_policy = match from {
        From::All => DeliverPolicy::All,
        From::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
    };
    let filter_subject = subject::host_filter(host)?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            name: Some(watch_name(bus)),
            deliver_subject: bus.client().new_inbox(),
            filter_subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| js_err(Box::new(e)))?;
    let mut messages = consumer.messages().await.map_err(|e| js_err(Box::new(e)))?;
    let mut cancelled = false;
    let mut errors = 0u32;
    while let Some(next) = messages.next().await {
        let msg = match next {
            Ok(m) => {
                errors = 0;
                m
            }
            Err(e) => {
                errors += 1;
                tracing::warn!(error = %ErrorChain(&e), errors, "Reading the run's events failed.");
                if errors >= MAX_CONSECUTIVE_ERRORS {
                    return Err(js_err(Box::new(e)));
                }
                continue;
            }
        };
        let Ok(event) = proto::Event::decode(msg.payload.clone()) else {
            tracing::debug!(subject = %msg.subject, "Skipping an undecodable message.");
            continue;
        };
        if event.run_key() != run_key {
            continue;
        }
        on_event(&event);
        match event.body {
            Some(Body::VmStopped(s)) => {
                let cancelled = cancelled || s.stop_reason == "cancelled";
                return Ok(RunOutcome {
                    run_key: run_key.to_owned(),
                    ending: Ending::Stopped(s),
                    cancelled,
                });
            }
            Some(Body::VmFailed(f)) => {
                return Ok(RunOutcome {
                    run_key: run_key.to_owned(),
                    ending: Ending::Failed(f),
                    cancelled,
                });
            }
            Some(Body::JobCancelled(_)) => cancelled = true,
            _ => {}
        }
    }
    Err(BridgeError::WatchEnded)
}
