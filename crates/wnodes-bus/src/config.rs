//! Bus configuration: where NATS is, how to authenticate, TLS, stream settings and consumer
//! tuning. Embedded by every service's config under the `nats` key (env `WNODES_NATS__*`).

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::BusError;

/// How to reach NATS and how the streams are laid out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: `nats://host:4222` or `tls://host:4222`.
    pub url: String,
    /// User name for user/password authentication (with `password`).
    pub user: Option<String>,
    /// Password for user/password authentication.
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// NKey seed (`SU...`) for nkey authentication.
    pub nkey_seed: Option<String>,
    /// File holding the NKey seed (preferred over putting the seed in config).
    pub nkey_seed_file: Option<PathBuf>,
    /// Decentralised JWT authentication: a `.creds` file (user JWT + seed).
    pub creds_file: Option<PathBuf>,
    /// A directory of creds files named after their identity (`wnodesctl provision`'s
    /// `creds/`, or what configuration management copied of it): each process uses
    /// `<creds_dir>/<its identity>.creds` (`launcher-hv01_cnaf_infn_it.creds`, `accounting.creds`),
    /// so one configuration serves every service on every host. `creds_file` wins when set.
    pub creds_dir: Option<PathBuf>,
    /// Prefix of this connection's reply subjects. Default: `_INBOX.<identity>` when
    /// `creds_file` names an identity (the only replies its permissions let it receive), else
    /// `_INBOX`.
    pub inbox_prefix: Option<String>,
    /// TLS (rustls). When absent, TLS is used only if the URL says `tls://`.
    pub tls: Option<TlsConfig>,
    /// How long the first connection may take before start-up fails.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a publish is retried (same `Nats-Msg-Id`) before the caller gets an error.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Replicas of the streams (1 on one machine, 3 at a site).
    pub stream_replicas: usize,
    /// JetStream de-duplication window for `Nats-Msg-Id`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long events are kept in the events stream.
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// How long dead letters are kept.
    #[serde(with = "humantime_serde")]
    pub dlq_max_age: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            nkey_seed_file: None,
            creds_file: None,
            creds_dir: None,
            inbox_prefix: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(60),
            stream_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl NatsConfig {
    /// These settings for `identity` (`Role::identity`): with `creds_dir` and no `creds_file`,
    /// the creds file is `<creds_dir>/<identity>.creds`.
    #[must_use]
    pub fn for_identity(&self, identity: &str) -> Self {
        let mut c = self.clone();
        if c.creds_file.is_none()
            && let Some(dir) = &c.creds_dir
        {
            c.creds_file = Some(dir.join(format!("{identity}.creds")));
        }
        c
    }
}

/// rustls settings for the NATS connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key_file: Option<PathBuf>,
}

/// How a durable consumer retries and how much it does at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerTuning {
    /// Deliveries the handler gets before the message is dead-lettered.
    pub max_attempts: u32,
    /// How long the server waits for an ack before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long one handler call may run; past it the attempt counts as failed.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// Delay before the first retry; doubles per attempt up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Messages handled concurrently by one consumer (a handler that takes batches uses
    /// `max_batch` instead).
    pub max_in_flight: usize,
    /// Messages in one batch of a handler that takes batches (accounting's): two batches are
    /// in hand at once, one in its transaction while the other is collected, or publishes
    /// and acks. Larger batches ingest faster (`docs/benchmarks.md`, `accounting`).
    pub max_batch: usize,
    /// How long shutdown waits for in-flight handlers before nacking them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long processed idempotency keys are remembered.
    #[serde(with = "humantime_serde")]
    pub key_retention: Duration,
}

impl Default for ConsumerTuning {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            ack_wait: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(25),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_in_flight: 64,
            max_batch: 256,
            shutdown_grace: Duration::from_secs(10),
            key_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl ConsumerTuning {
    /// Checks the relations between the values.
    pub fn validate(&self) -> Result<(), BusError> {
        if self.max_attempts == 0 {
            return Err(BusError::Config("max_attempts must be at least 1".into()));
        }
        if self.handler_timeout >= self.ack_wait {
            return Err(BusError::Config(format!(
                "handler_timeout ({:?}) must be shorter than ack_wait ({:?}) so that a verdict \
                 reaches the server before it redelivers",
                self.handler_timeout, self.ack_wait
            )));
        }
        if self.max_in_flight == 0 {
            return Err(BusError::Config("max_in_flight must be at least 1".into()));
        }
        if self.max_batch == 0 {
            return Err(BusError::Config("max_batch must be at least 1".into()));
        }
        Ok(())
    }

    /// Retry delay after `attempt` (1-based) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let t = ConsumerTuning {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            ..Default::default()
        };
        assert_eq!(t.backoff(1), Duration::from_millis(100));
        assert_eq!(t.backoff(2), Duration::from_millis(200));
        assert_eq!(t.backoff(3), Duration::from_millis(400));
        assert_eq!(t.backoff(9), Duration::from_millis(500));
    }

    #[test]
    fn creds_dir_names_the_identitys_file_unless_a_file_is_given() {
        let c = NatsConfig {
            creds_dir: Some("/etc/wnodes/nats/creds".into()),
            ..Default::default()
        };
        assert_eq!(
            c.for_identity("launcher-hv1_x").creds_file,
            Some(PathBuf::from("/etc/wnodes/nats/creds/launcher-hv1_x.creds"))
        );
        let given = NatsConfig {
            creds_file: Some("/x.creds".into()),
            ..c
        };
        assert_eq!(
            given.for_identity("launcher-hv1_x").creds_file,
            Some(PathBuf::from("/x.creds"))
        );
        assert_eq!(NatsConfig::default().for_identity("a").creds_file, None);
    }

    #[test]
    fn handler_timeout_must_fit_in_ack_wait() {
        let t = ConsumerTuning {
            handler_timeout: Duration::from_secs(40),
            ..Default::default()
        };
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("handler_timeout"), "{err}");
    }
}
