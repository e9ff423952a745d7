//! Permission violations the server reports: NATS answers a denied publish with an
//! asynchronous `-ERR 'Permissions Violation for Publish to "<subject>"'` and never acks it, so
//! without this a publish would retry until `publish_timeout`. The connection's event callback
//! records each violation (and logs it once, at error level); a publish waiting for its ack
//! fails at once with [`BusError::PermissionDenied`](crate::BusError::PermissionDenied).

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Violations not yet claimed by a waiting publish, by subject (bounded).
#[derive(Debug, Clone, Default)]
pub struct Denials {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_subject: Mutex<HashMap<String, String>>,
    notify: Notify,
}

const MAX_REMEMBERED: usize = 1024;

/// The subject of a publish violation: `Permissions Violation for Publish to "a.b"`.
pub fn denied_publish_subject(message: &str) -> Option<&str> {
    let rest = message
        .split_once("Permissions Violation for Publish to ")?
        .1
        .trim()
        .trim_matches('\'');
    let rest = rest.strip_prefix('"')?;
    rest.split('"').next()
}

impl Denials {
    /// Records a server error; returns true when it was a permission violation.
    pub fn record(&self, message: &str) -> bool {
        if !message.contains("Permissions Violation") {
            return false;
        }
        tracing::error!(error = %message, "NATS refused an operation: this identity is not permitted to do it.");
        if let Some(subject) = denied_publish_subject(message) {
            let mut map = self.inner.by_subject.lock();
            if map.len() >= MAX_REMEMBERED {
                map.clear();
            }
            map.insert(subject.to_owned(), message.to_owned());
        }
        self.inner.notify.notify_waiters();
        true
    }

    /// Resolves with the server's message once a publish to `subject` is refused.
    pub async fn refused(&self, subject: &str) -> String {
        loop {
            let notified = self.inner.notify.notified();
            if let Some(m) = self.inner.by_subject.lock().remove(subject) {
                return m;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_subject_of_a_publish_violation() {
        assert_eq!(
            denied_publish_subject(
                "nats: Permissions Violation for Publish to \"wnodes.evt.h2.vm.requested\""
            ),
            Some("wnodes.evt.h2.vm.requested")
        );
        assert_eq!(
            denied_publish_subject("Permissions Violation for Subscription to \"x\""),
            None
        );
    }

    #[tokio::test]
    async fn a_waiting_publish_gets_the_violation() {
        let d = Denials::default();
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.refused("a.b").await }
        });
        tokio::task::yield_now().await;
        assert!(!d.record("nats: slow consumer"));
        assert!(d.record("Permissions Violation for Publish to \"a.b\""));
        let m = waiter.await.unwrap();
        assert!(m.contains("a.b"), "{m}");
    }
}
