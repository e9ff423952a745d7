//! Batched handling ([`Handler::BATCHED`]) against a real nats-server and a real SQLite store:
//! a verdict per message inside a batch, one transaction for the batch's effects and keys, and
//! a batch that fails as a whole handled message by message, and two batches in hand taking
//! turns at the store.

// Test helpers outside #[test] functions panic on failure too: that is the point of a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use wnodes_bus::{
    BatchCtx, BatchItem, Bus, BusError, Consumer, ConsumerSpec, ConsumerTuning, Handler,
    HandlerCtx, HandlerError, KeyStore, db::Db, dlq, on_db, proto, proto::event::Body, roles,
};
use wnodes_testkit::{
    NatsServer,
    bus::connect,
    events::{Events, run, vm_requested, vm_spec},
};

const WAIT: Duration = Duration::from_secs(30);

/// What the test handler does with a `vm.requested`, by its image name: `ok` (an effect),
/// `reject` (dead-lettered), `retry-once` (fails its first attempt), `poison` (fails the
/// whole batch after the others' effects were written; rejected when alone), `slow` (an
/// effect, its batch held 30 ms).
#[derive(Clone, Default)]
struct Scripted {
    /// Each batch handed over: its messages' (key, image).
    batches: Arc<Mutex<Vec<Batch>>>,
    /// Batches in `handle_batch` now, and the most there ever were at once.
    active: Arc<AtomicUsize>,
    most_active: Arc<AtomicUsize>,
}

/// Counts a batch in `handle_batch` until dropped.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn enter(h: &Scripted) -> Self {
        let now = h.active.fetch_add(1, Ordering::SeqCst) + 1;
        h.most_active.fetch_max(now, Ordering::SeqCst);
        Self(h.active.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Batch = Vec<(String, String)>;

fn image(item: &proto::Event) -> String {
    match &item.body {
        Some(Body::VmRequested(r)) => r.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
        _ => String::new(),
    }
}

async fn effect(db: &mut Db<'_>, key: &str, via: &str) -> Result<(), sqlx::Error> {
    on_db!(db, |c| {
        sqlx::query("INSERT INTO effects (key, via) VALUES ($1, $2)")
            .bind(key)
            .bind(via)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
    })?;
    Ok(())
}

impl Handler for Scripted {
    const BATCHED: bool = true;

    fn name(&self) -> &'static str {
        "test.scripted"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        match image(&event).as_str() {
            "reject" | "poison" => Err(HandlerError::reject("told to reject")),
            "retry-once" if ctx.attempt() == 1 => Err(HandlerError::retry("told to retry once")),
            _ => {
                let key = ctx.key().to_owned();
                let mut db = ctx.db().await?;
                effect(&mut db, &key, "alone")
                    .await
                    .map_err(HandlerError::retry)
            }
        }
    }

    async fn handle_batch(
        &self,
        batch: &mut BatchCtx,
        items: &mut [BatchItem],
    ) -> Result<(), HandlerError> {
        let _active = Active::enter(self);
        self.batches.lock().push(
            items
                .iter()
                .map(|i| (i.key().to_owned(), image(i.event())))
                .collect(),
        );
        let mut poisoned = false;
        for item in items.iter_mut() {
            match image(item.event()).as_str() {
                "reject" => item.fail(HandlerError::reject("told to reject")),
                "retry-once" if item.attempt() == 1 => {
                    item.fail(HandlerError::retry("told to retry once"));
                }
                "poison" => poisoned = true,
                image => {
                    if image == "slow" {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    let key = item.key().to_owned();
                    let mut db = batch.db().await?;
                    effect(&mut db, &key, "batch")
                        .await
                        .map_err(HandlerError::retry)?;
                }
            }
        }
        if poisoned {
            return Err(HandlerError::retry("a statement of the batch failed"));
        }
        Ok(())
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), BusError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn spec() -> ConsumerSpec {
    spec_with(ConsumerTuning::default().max_batch)
}

fn spec_with(max_batch: usize) -> ConsumerSpec {
    ConsumerSpec {
        durable: roles::ACCOUNTING.durable("").unwrap().unwrap(),
        filter_subjects: roles::ACCOUNTING.filters("").unwrap(),
        tuning: ConsumerTuning {
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            max_batch,
            ..Default::default()
        },
    }
}

async fn start(bus: &Bus, store: &KeyStore, handler: Scripted) -> Running {
    start_with(bus, store, handler, spec()).await
}

async fn start_with(bus: &Bus, store: &KeyStore, handler: Scripted, spec: ConsumerSpec) -> Running {
    wnodes_site::streams::provision_durable(
        bus.jetstream(),
        spec.expected(),
        wnodes_site::Mode::Apply,
    )
    .await
    .unwrap();
    let consumer = Consumer::bind(bus.clone(), store.clone(), spec, handler)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(consumer.run(stop.clone()));
    Running { stop, task }
}

fn requested(job: &str, image: &str) -> proto::Event {
    Events::new("hv1.example.org", "test@local").build(
        &run(job),
        vm_requested(proto::VmSpec {
            image: image.into(),
            ..vm_spec(&format!("vm-{job}"))
        }),
    )
}

async fn effects(store: &KeyStore) -> Vec<(String, String)> {
    sqlx::query_as("SELECT key, via FROM effects ORDER BY key")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

async fn wait_caught_up(bus: &Bus) {
    wnodes_testkit::bus::wait_caught_up(bus, &spec().durable, WAIT)
        .await
        .unwrap();
}

/// A nats-server, the admin's bus, and a key store with the test handler's `effects` table.
async fn setup() -> (NatsServer, Bus, tempfile::TempDir, KeyStore) {
    let nats = NatsServer::start().await.unwrap();
    let bus = connect(&nats.admin(), "test@local").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(&dir.path().join("keys.db")).await.unwrap();
    sqlx::query("CREATE TABLE effects (key TEXT PRIMARY KEY, via TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    (nats, bus, dir, store)
}

#[tokio::test(flavor = "multi_thread")]
async fn verdicts_are_per_message_and_a_failed_batch_is_handled_alone() {
    let (_nats, bus, _dir, store) = setup().await;
    let durable = spec().durable;

    // 1. Twenty sound messages, one to reject and one that fails once, all at hand together.
    let mut first: Vec<proto::Event> = (0..20)
        .map(|i| requested(&format!("1{i:02}"), "ok"))
        .collect();
    first.insert(7, requested("reject", "reject"));
    first.insert(13, requested("retry", "retry-once"));
    bus.publish_pipelined(&first, 64).await.unwrap();
    let handler = Scripted::default();
    let svc = start(&bus, &store, handler.clone()).await;
    wait_caught_up(&bus).await;
    let rows = effects(&store).await;
    assert_eq!(rows.len(), 21, "20 sound + the retried one: {rows:?}");
    assert!(rows.iter().all(|(_, via)| via == "batch"), "{rows:?}");
    let letters = dlq::read_all(&bus, Some(&durable)).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "rejected");
    assert!(letters[0].error.contains("told to reject"), "{letters:?}");
    let sizes: Vec<usize> = handler.batches.lock().iter().map(Vec::len).collect();
    assert!(
        sizes.iter().any(|n| *n > 1),
        "the messages were at hand together, yet every batch had one: {sizes:?}"
    );
    assert_eq!(
        bus.metrics().handled_count(&durable, "retry"),
        1,
        "only the retry-once message was retried"
    );
    svc.stop().await;

    // 2. A batch that fails as a whole (after writing the others' effects) rolls back, and
    //    each of its messages is handled alone: the sound ones once, the poison dead-lettered.
    let mut second: Vec<proto::Event> = (0..10)
        .map(|i| requested(&format!("2{i:02}"), "ok"))
        .collect();
    second.insert(4, requested("poison", "poison"));
    bus.publish_pipelined(&second, 64).await.unwrap();
    let handler = Scripted::default();
    let svc = start(&bus, &store, handler.clone()).await;
    wait_caught_up(&bus).await;
    let rows = effects(&store).await;
    assert_eq!(rows.len(), 31, "every sound message once: {rows:?}");
    let batches = handler.batches.lock().clone();
    let poisoned = batches
        .iter()
        .find(|b| b.iter().any(|(_, image)| image == "poison"))
        .expect("the poison came in a batch");
    assert!(
        poisoned.len() > 1,
        "the poison came with others: {batches:?}"
    );
    for (key, image) in poisoned.iter().filter(|(_, image)| image == "ok") {
        let via = rows
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, via)| via.as_str());
        assert_eq!(
            via,
            Some("alone"),
            "{key} ({image}) of the rolled-back batch"
        );
    }
    let letters = dlq::read_all(&bus, Some(&durable)).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l.error.contains("told to reject") && l.reason == "rejected"),
        "{letters:?}"
    );

    // 3. The same sound events again under new message ids: the keys committed with the
    //    batch's effects, so nothing is applied twice.
    for ev in first.iter().filter(|e| image(e) == "ok") {
        let again = format!("again-{}", ev.id);
        let duplicate = wnodes_testkit::bus::publish_again(&bus, ev, &again)
            .await
            .unwrap();
        assert!(!duplicate);
    }
    wait_caught_up(&bus).await;
    assert_eq!(effects(&store).await.len(), 31);
    assert_eq!(bus.metrics().handled_count(&durable, "duplicate"), 20);
    svc.stop().await;
}

/// Two batches are in hand at once but take turns at the store: while one is in its
/// transaction the next is collected and waits; never two in `handle_batch` together.
#[tokio::test(flavor = "multi_thread")]
async fn two_batches_in_hand_take_turns_at_the_store() {
    let (_nats, bus, _dir, store) = setup().await;
    let events: Vec<proto::Event> = (0..24)
        .map(|i| requested(&format!("3{i:02}"), "slow"))
        .collect();
    bus.publish_pipelined(&events, 64).await.unwrap();
    let handler = Scripted::default();
    let svc = start_with(&bus, &store, handler.clone(), spec_with(4)).await;
    wait_caught_up(&bus).await;
    svc.stop().await;
    let rows = effects(&store).await;
    assert_eq!(rows.len(), 24, "every message once: {rows:?}");
    let sizes: Vec<usize> = handler.batches.lock().iter().map(Vec::len).collect();
    assert!(
        sizes.iter().all(|n| *n <= 4) && sizes.len() >= 6,
        "batches of at most max_batch (4): {sizes:?}"
    );
    assert_eq!(
        handler.most_active.load(Ordering::SeqCst),
        1,
        "two batches were in handle_batch at once (batches {sizes:?})"
    );
}
