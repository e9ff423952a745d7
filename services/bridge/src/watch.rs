//! Following one run's events until its VM stopped or failed, with an ephemeral ordered
//! consumer (no durable state on the server; it goes away with the caller).

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
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

/// Filter subjects for the end of a run on `host` (and its cancellation).
pub fn ending_filters(host: &str) -> Result<Vec<String>, BridgeError> {
    Ok(vec![
        subject::event_filter(Some(host), "vm.stopped")?,
        subject::event_filter(Some(host), "vm.failed")?,
        subject::event_filter(Some(host), "job.cancelled")?,
    ])
}

/// Every event of `host`.
pub fn all_filters(host: &str) -> Result<Vec<String>, BridgeError> {
    Ok(vec![subject::host_filter(host)?])
}

/// Reads `filters` from `from` until the run `run_key` has a `VmStopped` or `VmFailed`, calling
/// `on_event` for each of the run's events on the way (the last one included).
pub async fn run_outcome(
    bus: &wnodes_bus::Bus,
    filters: Vec<String>,
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
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subjects: filters,
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
