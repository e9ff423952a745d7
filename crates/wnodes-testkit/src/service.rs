//! Harness for a service's handler tests: a private nats-server with the streams, the handler
//! on a real durable consumer, every event on the bus recorded and waited for, and throwaway
//! network namespaces (`Netns`). Used by the network and gateway services' tests, which take
//! the event builders of [`crate::events`] from here too (`use wnodes_testkit::service::*`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test helpers: a failure is a test failure

use parking_lot::Mutex;
use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::{NatsServer, wait_until};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use wnodes_bus::{Bus, Consumer, ConsumerSpec, ConsumerTuning, Handler, KeyStore, Role, proto};

use crate::events::Events;
pub use crate::events::{
    IntoBody, Payload, RunEvents, RunRefExt, VmPayload, run, vm_failed, vm_of, vm_requested,
    vm_spec, vm_stopped,
};

pub const HOST: &str = "hv1.test";

/// Runs a command that must succeed; returns stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wnt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", self.0.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// `ip netns exec <ns> <args>` (must succeed).
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", self.0.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A bus with a private server and a recorder of every event.
#[derive(Debug)]
pub struct TestBus {
    pub server: NatsServer,
    pub bus: Bus,
    pub seen: Arc<Mutex<Vec<proto::Event>>>,
    pub dir: tempfile::TempDir,
    pub shutdown: CancellationToken,
}

impl TestBus {
    pub async fn start() -> Self {
        let server = NatsServer::start().await.unwrap();
        let bus = crate::bus::connect(&server.admin(), "test@hv1.test")
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut sub = bus.client().subscribe("wnodes.evt.>").await.unwrap();
        bus.client().flush().await.unwrap();
        let rec = seen.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(ev) = proto::Event::decode(msg.payload) {
                    rec.lock().push(ev);
                }
            }
        });
        Self {
            server,
            bus,
            seen,
            dir: tempfile::tempdir().unwrap(),
            shutdown: CancellationToken::new(),
        }
    }

    pub async fn store(&self, name: &str) -> KeyStore {
        KeyStore::open(&self.dir.path().join(name)).await.unwrap()
    }

    /// Starts `handler` as `role` on `host` would run it: its own identity's connection (its
    /// permissions apply to everything the handler publishes), its durable, provisioned here.
    pub async fn consume<H: Handler>(
        &self,
        store: KeyStore,
        role: &'static Role,
        host: &str,
        handler: H,
    ) -> CancellationToken {
        let tuning = ConsumerTuning {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            max_attempts: 20,
            ..Default::default()
        };
        let config = self
            .server
            .identity_tuned(role, host, &tuning)
            .await
            .unwrap();
        let source = format!("{}@{host}", role.name);
        let bus = crate::bus::connect(&config, &source).await.unwrap();
        let spec = ConsumerSpec {
            durable: role.durable(host).unwrap().unwrap(),
            filter_subjects: role.filters(host).unwrap(),
            tuning,
        };
        let consumer = Consumer::bind(bus, store, spec, handler).await.unwrap();
        let token = self.shutdown.child_token();
        let t = token.clone();
        tokio::spawn(async move { consumer.run(t).await });
        token
    }

    pub async fn publish(&self, ev: &proto::Event) {
        self.bus.publish(ev).await.unwrap();
    }

    /// Waits for the first event that `f` maps to `Some`; on timeout, panics listing every event
    /// seen (a `…failed` with its reason is usually why).
    pub async fn wait_for<T>(&self, what: &str, f: impl Fn(&proto::Event) -> Option<T>) -> T {
        let found = wait_until(Duration::from_secs(20), what, || {
            let found = self.seen.lock().iter().find_map(&f);
            async move { found }
        })
        .await;
        match found {
            Ok(t) => t,
            Err(e) => {
                let seen: Vec<String> = self
                    .seen
                    .lock()
                    .iter()
                    .map(|e| format!("  {} {:?}", e.id, e.body))
                    .collect();
                panic!("{e:#}; events seen:\n{}", seen.join("\n"))
            }
        }
    }

    /// Waits for the first `P` about `vm_id` (`network.ready`, `storage.failed`, ...).
    pub async fn wait_payload<P: VmPayload>(&self, vm_id: &str) -> P {
        self.wait_for(&format!("{} of {vm_id}", P::TYPE.name()), |e| {
            P::of_event(e).filter(|p| p.vm_id() == vm_id).cloned()
        })
        .await
    }

    /// Waits for the release of `vm_id`'s resource of `kind`; returns its detail.
    pub async fn wait_released(&self, vm_id: &str, kind: proto::ResourceKind) -> String {
        self.wait_for(&format!("resource.released of {vm_id}"), |e| {
            proto::ResourceReleased::of_event(e)
                .filter(|r| r.vm_id == vm_id && r.kind == kind as i32)
                .map(|r| r.detail.clone())
        })
        .await
    }

    /// Events about `vm_id` seen so far, in arrival order (ask them with [`RunEvents`]).
    pub fn events_of(&self, vm_id: &str) -> Vec<proto::Event> {
        self.seen
            .lock()
            .iter()
            .filter(|e| vm_of(e).as_deref() == Some(vm_id))
            .cloned()
            .collect()
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An event of `run` as the launcher on [`HOST`] would publish it.
pub fn ev(run: &proto::JobRunRef, body: impl IntoBody) -> proto::Event {
    Events::new(HOST, "launcher@hv1.test").build(run, body)
}
