//! Service heartbeats: each service puts its state (version, readiness, when it started) into
//! the hosts bucket, a JetStream key-value bucket with one key per identity
//! (`<role>-<host token>` or `<role>`), every `heartbeat_interval`; `wnodesctl hosts` reads the
//! bucket back. A service may put only its own key (`wnodes-site` gives it publish on
//! `$KV.wnodes_hosts.<identity>` and nothing else of the bucket); the monitor reads.
//!
//! The bucket keeps one value per key (the last heartbeat) for [`HOSTS_MAX_AGE`], so a host
//! that stopped answering shows as stale for a day and then disappears. Values are JSON, so
//! that an operator can read them with `nats kv get wnodes_hosts KEY` as well.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

use crate::{error::BusError, layout::StreamLayout};

/// The key-value bucket of heartbeats.
pub const HOSTS_BUCKET: &str = "wnodes_hosts";
/// The stream behind [`HOSTS_BUCKET`] (JetStream's naming for a bucket).
pub const HOSTS_STREAM: &str = "KV_wnodes_hosts";
/// How long a key outlives its last heartbeat.
pub const HOSTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// A heartbeat older than this many intervals is stale: the service stopped beating
/// without saying so (killed, host down, NATS unreachable from it).
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// The subject a put of `identity`'s key is published to.
pub fn key_subject(identity: &str) -> String {
    format!("$KV.{HOSTS_BUCKET}.{identity}")
}

/// The bucket's stream, as provisioned (what `jetstream::Context::create_key_value` would
/// make for a bucket of history 1 and [`HOSTS_MAX_AGE`]).
pub fn hosts_stream(l: &StreamLayout) -> stream::Config {
    stream::Config {
        name: HOSTS_STREAM.into(),
        description: Some("WNoDeS service heartbeats (key-value bucket wnodes_hosts)".into()),
        subjects: vec![format!("$KV.{HOSTS_BUCKET}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: l.replicas,
        max_messages_per_subject: 1,
        max_age: HOSTS_MAX_AGE,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        max_consumers: -1,
        ..Default::default()
    }
}

/// What a service is doing, as it last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Beating: see `ready`.
    Running,
    /// Stopped on purpose (SIGTERM, its last heartbeat).
    Stopped,
}

/// One heartbeat: the value of a service's key. Unknown fields are ignored when read, so
/// that a newer service's heartbeat still reads with an older `wnodesctl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The service (its role's name, e.g. `launcher`).
    pub service: String,
    /// Its host; empty for a central service.
    pub host: String,
    /// Its NATS identity (the key).
    pub identity: String,
    /// Its version (the crate's).
    pub version: String,
    pub state: ServiceState,
    /// Whether its `/readyz` answers 200.
    pub ready: bool,
    /// Why it is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its `/healthz`, `/readyz`, `/metrics` address.
    pub http_addr: String,
    pub pid: u32,
    /// When it started and when it sent this, in Unix milliseconds.
    pub started_ms: i64,
    pub sent_ms: i64,
    /// How often it beats, in milliseconds.
    pub interval_ms: u64,
}

impl Heartbeat {
    /// Whether, seen at `now`, a heartbeat stored at `stored` is past
    /// [`STALE_AFTER_INTERVALS`] of its interval (a stopped service is never stale: it said
    /// goodbye).
    pub fn is_stale(&self, stored: SystemTime, now: SystemTime) -> bool {
        self.state == ServiceState::Running
            && now.duration_since(stored).unwrap_or_default()
                > Duration::from_millis(self.interval_ms) * STALE_AFTER_INTERVALS
    }
}

/// Puts `beat` under its identity's key, once (the next beat is the retry).
pub async fn put(
    js: &jetstream::Context,
    beat: &Heartbeat,
    timeout: Duration,
) -> Result<(), BusError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| BusError::Heartbeat {
        identity: beat.identity.clone(),
        source: e,
    };
    let payload = serde_json::to_vec(beat).map_err(|e| err(Box::new(e)))?;
    let ack = js
        .publish(key_subject(&beat.identity), payload.into())
        .await
        .map_err(|e| err(Box::new(e)))?;
    tokio::time::timeout(timeout, ack)
        .await
        .map_err(|e| err(Box::new(e)))?
        .map_err(|e| err(Box::new(e)))?;
    Ok(())
}

/// A heartbeat as read back, with when the server stored it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub beat: Heartbeat,
    pub stored: SystemTime,
}

/// What the bucket holds.
#[derive(Debug, Default)]
pub struct Hosts {
    /// Every readable heartbeat, by host then service.
    pub beats: Vec<Seen>,
    /// Keys whose value is not a heartbeat this version understands (named, and skipped).
    pub unreadable: Vec<String>,
}

/// Reads every key's last heartbeat (one direct get per key).
pub async fn read(js: &jetstream::Context) -> Result<Hosts, BusError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| BusError::EventsRead {
        what: format!("the heartbeats (bucket {HOSTS_BUCKET})"),
        source: e,
    };
    let stream = js
        .get_stream(HOSTS_STREAM)
        .await
        .map_err(|e| err(Box::new(e)))?;
    let prefix = format!("$KV.{HOSTS_BUCKET}.");
    let mut out = Hosts::default();
    let mut next = 1u64;
    loop {
        let msg = match stream
            .direct_get_next_for_subject(format!("{prefix}>"), Some(next))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(err(Box::new(e))),
        };
        next = msg.sequence + 1;
        let key = msg.subject.strip_prefix(&prefix).unwrap_or(&msg.subject);
        match serde_json::from_slice::<Heartbeat>(&msg.payload) {
            Ok(beat) => out.beats.push(Seen {
                beat,
                stored: SystemTime::from(msg.time),
            }),
            Err(_) => out.unreadable.push(key.to_owned()),
        }
    }
    out.beats
        .sort_by(|a, b| (&a.beat.host, &a.beat.service).cmp(&(&b.beat.host, &b.beat.service)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(interval_ms: u64, state: ServiceState) -> Heartbeat {
        Heartbeat {
            service: "image".into(),
            host: "hv1.example.org".into(),
            identity: "image-hv1_example_org".into(),
            version: "0.1.0".into(),
            state,
            ready: true,
            reason: None,
            http_addr: "127.0.0.1:9101".into(),
            pid: 1,
            started_ms: 0,
            sent_ms: 0,
            interval_ms,
        }
    }

    #[test]
    fn a_running_service_is_stale_after_three_intervals_and_a_stopped_one_never() {
        let stored = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let b = beat(10_000, ServiceState::Running);
        assert!(!b.is_stale(stored, stored + Duration::from_secs(30)));
        assert!(b.is_stale(stored, stored + Duration::from_secs(31)));
        assert!(
            !b.is_stale(stored, stored - Duration::from_secs(5)),
            "clock skew"
        );
        let s = beat(10_000, ServiceState::Stopped);
        assert!(!s.is_stale(stored, stored + Duration::from_secs(3600)));
    }

    #[test]
    fn the_json_round_trips_and_tolerates_newer_fields() {
        let b = beat(15_000, ServiceState::Running);
        let text = serde_json::to_string(&b).unwrap();
        assert!(text.contains("\"state\":\"running\""), "{text}");
        assert!(!text.contains("reason"), "{text}");
        assert_eq!(serde_json::from_str::<Heartbeat>(&text).unwrap(), b);
        let extra = text.replace("\"pid\"", "\"extra\":1,\"pid\"");
        assert_eq!(serde_json::from_str::<Heartbeat>(&extra).unwrap(), b);
        assert!(serde_json::from_str::<Heartbeat>("{\"service\":\"image\"}").is_err());
    }
}
