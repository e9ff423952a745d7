//! The image service end to end: a real nats-server, the service's consumer in-process, a
//! `vm.requested` published by "the launcher", `image.ready` / `image.failed` read back from a
//! core subscription on `wnodes.evt.>`.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use sha2::{Digest, Sha256};
use wnodes_bus::{
    Bus, ConsumerTuning, EventExt,
    proto::{self, event::Body},
};
use wnodes_image::{Artifact, CatalogEntry, DiskFormat, Image, ImageConfig};
use wnodes_runtime::{Config, start::InProcess};
use wnodes_testkit::{
    NatsServer,
    bus::{EventSub, connect, subscribe},
    events::{Events, run, vm_requested as requested},
    http::serve,
};

const HOST: &str = "hv1.example.org";

fn vm_requested(job: &str, image: &str) -> proto::Event {
    Events::new(HOST, "launcher@hv1.example.org").build(
        &run(job),
        requested(proto::VmSpec {
            vm_id: format!("vm-{job}"),
            image: image.into(),
            ..Default::default()
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_requested_is_answered_with_ready_or_failed() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = b"a tiny disk image".repeat(1000);
    let src = tmp.path().join("sl6.raw");
    std::fs::write(&src, &image).unwrap();
    let sha = hex::encode(Sha256::digest(&image));
    let kernel = tmp.path().join("vmlinuz");
    std::fs::write(&kernel, b"kernel bytes").unwrap();
    let kernel_sha = hex::encode(Sha256::digest(b"kernel bytes"));
    let wrong = hex::encode(Sha256::digest(b"something else"));
    let config = ImageConfig {
        cache_dir: None,
        catalog: BTreeMap::from([
            (
                "sl6".to_owned(),
                CatalogEntry {
                    url: format!("file://{}", src.display()),
                    sha256: sha.clone(),
                    format: DiskFormat::Qcow2,
                    kernel: Some(Artifact {
                        url: format!("file://{}", kernel.display()),
                        sha256: kernel_sha.clone(),
                    }),
                    initrd: None,
                },
            ),
            (
                "broken".to_owned(),
                raw(format!("file://{}", src.display()), wrong.clone()),
            ),
        ]),
        ..Default::default()
    };
    let bus = connect(&nats.admin(), &format!("image@{HOST}"))
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.>").await.unwrap();

    let running = InProcess::start::<Image>(Config::local(
        &nats
            .identity(&wnodes_bus::roles::IMAGE, HOST)
            .await
            .unwrap(),
        HOST,
        tmp.path(),
        config,
    ))
    .await
    .unwrap();

    bus.publish(&vm_requested("1", "sl6")).await.unwrap();
    bus.publish(&vm_requested("2", "centos9")).await.unwrap();
    bus.publish(&vm_requested("4", "broken")).await.unwrap();

    let (mut ready, mut failed, mut mismatch) = (None, None, None);
    let collected = tokio::time::timeout(Duration::from_secs(20), async {
        while ready.is_none() || failed.is_none() || mismatch.is_none() {
            let ev = sub.next(Duration::from_secs(20)).await.unwrap();
            match ev.body.clone() {
                Some(Body::ImageReady(r)) => ready = Some((ev, r)),
                Some(Body::ImageFailed(f)) if f.vm_id == "vm-4" => mismatch = Some(f),
                Some(Body::ImageFailed(f)) => failed = Some((ev, f)),
                _ => {}
            }
        }
    })
    .await;
    assert!(
        collected.is_ok(),
        "ready={ready:?} failed={failed:?} mismatch={mismatch:?}"
    );
    let (ev, r) = ready.unwrap();
    assert_eq!(ev.id, "image.ready:T1/htcondor/1/1");
    assert_eq!(ev.host, HOST);
    assert_eq!(ev.source, format!("image@{HOST}"));
    assert_eq!(
        ev.subject().unwrap(),
        "wnodes.evt.hv1_example_org.image.ready"
    );
    assert_eq!(r.vm_id, "vm-1");
    assert_eq!(r.image, "sl6");
    assert_eq!(r.sha256, sha);
    assert_eq!(r.format, "qcow2");
    assert_eq!(r.size_bytes, image.len() as u64);
    assert!(!r.cache_hit);
    assert_eq!(
        r.path,
        tmp.path()
            .join("cache/sha256")
            .join(&sha)
            .display()
            .to_string()
    );
    assert_eq!(std::fs::read(&r.path).unwrap(), image);
    assert_eq!(
        r.kernel_path,
        tmp.path()
            .join("cache/sha256")
            .join(&kernel_sha)
            .display()
            .to_string()
    );
    assert!(r.initrd_path.is_empty());

    let (ev, f) = failed.unwrap();
    assert_eq!(ev.run, Some(run("2")));
    assert_eq!(f.vm_id, "vm-2");
    assert_eq!(f.reason, "image 'centos9' is not in the catalog");

    let f = mismatch.unwrap();
    assert!(
        f.reason.starts_with("image 'broken': sha256 mismatch"),
        "{}",
        f.reason
    );
    assert!(
        f.reason.contains(&format!("expected {wrong}, got {sha}")),
        "{}",
        f.reason
    );

    // A second VM with the same image is a cache hit.
    bus.publish(&vm_requested("3", "sl6")).await.unwrap();
    let hit = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let ev = sub.next(Duration::from_secs(20)).await.unwrap();
            if let Some(Body::ImageReady(r)) = ev.body
                && r.vm_id == "vm-3"
            {
                return r;
            }
        }
    })
    .await
    .unwrap();
    assert!(hit.cache_hit);

    assert_eq!(running.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_queued_with_an_image_hint_prefetches_without_an_event() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = b"prefetched".repeat(5000);
    let src = tmp.path().join("el9.raw");
    std::fs::write(&src, &image).unwrap();
    let sha = hex::encode(Sha256::digest(&image));
    let config = ImageConfig {
        cache_dir: Some(tmp.path().join("c")),
        catalog: BTreeMap::from([(
            "el9".to_owned(),
            raw(format!("file://{}", src.display()), sha.clone()),
        )]),
        ..Default::default()
    };
    let bus = connect(&nats.admin(), &format!("image@{HOST}"))
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.*.image.>").await.unwrap();
    let running = InProcess::start::<Image>(Config::local(
        &nats
            .identity(&wnodes_bus::roles::IMAGE, HOST)
            .await
            .unwrap(),
        HOST,
        tmp.path(),
        config,
    ))
    .await
    .unwrap();

    let queued = |job: &str, hint: &str| {
        Events::new("", "bridge@ce.example.org").build(
            &run(job),
            proto::JobQueued {
                job: Some(proto::JobDescription {
                    run: Some(run(job)),
                    image_hint: hint.into(),
                    ..Default::default()
                }),
            },
        )
    };
    bus.publish(&queued("q1", "el9")).await.unwrap();
    bus.publish(&queued("q2", "not-in-catalog")).await.unwrap();
    let cached = tmp.path().join("c/sha256").join(&sha);
    wnodes_testkit::wait_until(Duration::from_secs(20), "the prefetched image", || {
        let cached = cached.clone();
        async move { cached.exists().then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), image);

    // The VM that follows finds it cached.
    bus.publish(&vm_requested("q1", "el9")).await.unwrap();
    let ev = sub.next(Duration::from_secs(20)).await.unwrap();
    let Some(Body::ImageReady(r)) = ev.body else {
        panic!("the first image event must be vm-q1's ready (prefetch publishes nothing): {ev:?}")
    };
    assert_eq!(r.vm_id, "vm-q1");
    assert!(r.cache_hit);

    assert_eq!(running.stop().await, 0);
}

/// A running image service for the retry tests.
struct Svc {
    _nats: NatsServer,
    bus: Bus,
    sub: EventSub,
    running: InProcess,
    _tmp: tempfile::TempDir,
}

impl Svc {
    async fn start(config: ImageConfig, tuning: ConsumerTuning) -> anyhow::Result<Svc> {
        let nats = NatsServer::start().await?;
        let tmp = tempfile::tempdir()?;
        let bus = connect(&nats.admin(), &format!("image@{HOST}")).await?;
        let sub = subscribe(&bus, "wnodes.evt.*.image.>").await?;
        let identity = nats
            .identity_tuned(&wnodes_bus::roles::IMAGE, HOST, &tuning)
            .await?;
        let mut cfg = Config::local(&identity, HOST, tmp.path(), config);
        cfg.common.consumer = tuning;
        let running = InProcess::start::<Image>(cfg)
            .await
            .map_err(|code| anyhow::anyhow!("the image service exited with {code}"))?;
        Ok(Svc {
            _nats: nats,
            bus,
            sub,
            running,
            _tmp: tmp,
        })
    }

    async fn next_event(&mut self, within: Duration) -> anyhow::Result<proto::Event> {
        self.sub.next(within).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        let code = self.running.stop().await;
        anyhow::ensure!(code == 0, "the image service exited with {code}");
        Ok(())
    }
}

/// A raw image at `url` with digest `sha256`, without kernel or initrd.
fn raw(url: String, sha256: String) -> CatalogEntry {
    CatalogEntry {
        url,
        sha256,
        format: DiskFormat::Raw,
        kernel: None,
        initrd: None,
    }
}

fn one_image(url: String, sha256: String) -> ImageConfig {
    ImageConfig {
        cache_dir: None,
        catalog: BTreeMap::from([("sl6".to_owned(), raw(url, sha256))]),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_then_reported_on_the_last_attempt() {
    let (base, count) = serve(Vec::new(), Duration::ZERO).await.unwrap();
    let tuning = ConsumerTuning {
        max_attempts: 2,
        backoff_base: Duration::from_millis(50),
        ..Default::default()
    };
    let config = one_image(format!("{base}/unavailable"), "c".repeat(64));
    let mut svc = Svc::start(config, tuning).await.unwrap();
    svc.bus.publish(&vm_requested("t1", "sl6")).await.unwrap();
    let ev = svc.next_event(Duration::from_secs(20)).await.unwrap();
    let Some(Body::ImageFailed(f)) = ev.body else {
        panic!("expected image.failed, got {ev:?}")
    };
    assert!(
        f.reason.starts_with("image 'sl6': fetching "),
        "{}",
        f.reason
    );
    assert!(f.reason.contains("503"), "{}", f.reason);
    assert_eq!(count.load(Ordering::SeqCst), 2, "one fetch per attempt");
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_longer_than_the_handler_timeout_survives_and_is_downloaded_once() {
    let data = b"slow image".repeat(1000);
    let (base, count) = serve(data.clone(), Duration::from_millis(2500))
        .await
        .unwrap();
    // Each attempt waits 0.8 s; the download takes 2.5 s: attempts 1-3 give up waiting, a
    // later one finds the same fetch finished.
    let tuning = ConsumerTuning {
        max_attempts: 10,
        handler_timeout: Duration::from_secs(1),
        ack_wait: Duration::from_secs(3),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    };
    let config = one_image(format!("{base}/img"), hex::encode(Sha256::digest(&data)));
    let mut svc = Svc::start(config, tuning).await.unwrap();
    svc.bus.publish(&vm_requested("t2", "sl6")).await.unwrap();
    let ev = svc.next_event(Duration::from_secs(20)).await.unwrap();
    let Some(Body::ImageReady(r)) = ev.body else {
        panic!("expected image.ready, got {ev:?}")
    };
    assert_eq!(r.size_bytes, data.len() as u64);
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "one download across the attempts"
    );
    svc.stop().await.unwrap();
}
