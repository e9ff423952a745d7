//! The service's heartbeat ([`wnodes_bus::heartbeat`]): put at start (ready or not, with the
//! reason), then every `heartbeat_interval` and whenever readiness changes, and a last one
//! saying `stopped` when the service stops on purpose. A put that fails is logged once per run of failures (the next beat is
//! the retry); a service without a bucket to beat into still serves.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wnodes_bus::{
    Bus, ErrorChain,
    heartbeat::{self, Heartbeat, ServiceState},
};

use crate::http::Readiness;

/// How often readiness is looked at between beats.
const READINESS_POLL: Duration = Duration::from_millis(250);

/// How long one put may wait for the server's ack.
const PUT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running heartbeat; [`Beating::finish`] sends the last one.
pub(crate) struct Beating {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub(crate) struct Who {
    pub service: &'static str,
    pub host: Option<String>,
    pub identity: String,
    pub http_addr: SocketAddr,
    pub interval: Duration,
}

impl Beating {
    pub(crate) fn start(bus: Bus, who: Who, ready: Readiness) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let started_ms = unix_ms(SystemTime::now());
            let mut failing = false;
            let mut tick = tokio::time::interval(who.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // What the last beat said: a change of readiness is put at once, not at the next
            // tick.
            let mut said: Option<(bool, Option<String>)> = None;
            let mut watch = tokio::time::interval(READINESS_POLL);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    () = token.cancelled() => true,
                    _ = watch.tick() => {
                        if said.as_ref() == Some(&(ready.is_ready(), ready.reason())) {
                            continue;
                        }
                        false
                    }
                };
                said = Some((ready.is_ready(), ready.reason()));
                let is_ready = !stopping && ready.is_ready();
                let beat = Heartbeat {
                    service: who.service.into(),
                    host: who.host.clone().unwrap_or_default(),
                    identity: who.identity.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    state: if stopping {
                        ServiceState::Stopped
                    } else {
                        ServiceState::Running
                    },
                    ready: is_ready,
                    reason: (!is_ready && !stopping)
                        .then(|| ready.reason().unwrap_or_else(|| "starting".into())),
                    http_addr: who.http_addr.to_string(),
                    pid: std::process::id(),
                    started_ms,
                    sent_ms: unix_ms(SystemTime::now()),
                    interval_ms: u64::try_from(who.interval.as_millis()).unwrap_or(u64::MAX),
                };
                match heartbeat::put(bus.jetstream(), &beat, PUT_TIMEOUT).await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(identity = %who.identity, "Heartbeats are stored again.");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %ErrorChain(&e), "Cannot store the heartbeat (is the hosts bucket provisioned? `wnodesctl provision`); `wnodesctl hosts` will show this service as stale. Retrying at every beat.");
                    }
                    Err(_) => {}
                }
                if stopping {
                    break;
                }
            }
        });
        Self { stop, task }
    }

    /// Sends the last heartbeat (`stopped`) and ends the task.
    pub(crate) async fn finish(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        // A service that fails to start stops beating without a goodbye: it turns stale.
        self.task.abort();
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
