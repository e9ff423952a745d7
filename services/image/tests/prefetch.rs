//! Prefetch requests (`wnodes.ctl.<host>.image.prefetch`) to the image service running on a
//! real nats-server as its own identity: progress while an image is fetched from a slow HTTP
//! server, a second request finding it cached, one download for concurrent prefetches and a
//! VM's request, and the reasons of an unknown image and of a host without an image service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use prost::Message;
use sha2::{Digest, Sha256};
use wnodes_bus::{
    Bus,
    control::{self, Reply},
    proto::{self, event::Body, prefetch_progress::Outcome},
};
use wnodes_image::{Artifact, CatalogEntry, DiskFormat, Image, ImageConfig};
use wnodes_runtime::{Config, start::InProcess};
use wnodes_testkit::{
    NatsServer,
    bus::{connect, subscribe},
    events::{Events, run, vm_requested as requested},
};

const HOST: &str = "hv1.example.org";

/// Serves `body` on `/img` in `chunks` pieces, one every `every`, with its `Content-Length`;
/// counts requests.
async fn serve_slowly(body: Vec<u8>, chunks: usize, every: Duration) -> (String, Arc<AtomicUsize>) {
    use axum::{body::Body, http::header, response::IntoResponse, routing};
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let body = Arc::new(body);
    let app = axum::Router::new().route(
        "/img",
        routing::get(move || {
            c.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            async move {
                let size = body.len().div_ceil(chunks);
                let pieces: Vec<axum::body::Bytes> = body
                    .chunks(size)
                    .map(axum::body::Bytes::copy_from_slice)
                    .collect();
                let stream = futures::stream::iter(pieces).then(move |p| async move {
                    tokio::time::sleep(every).await;
                    Ok::<_, std::io::Error>(p)
                });
                (
                    [(header::CONTENT_LENGTH, body.len())],
                    Body::from_stream(stream),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), count)
}

fn digest(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct Svc {
    nats: NatsServer,
    admin: Bus,
    running: InProcess,
    tmp: tempfile::TempDir,
}

impl Svc {
    async fn start(catalog: BTreeMap<String, CatalogEntry>) -> Svc {
        let nats = NatsServer::start().await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let admin = connect(&nats.admin(), "wnodesctl@test").await.unwrap();
        let config = ImageConfig {
            cache_dir: None,
            catalog,
            ..Default::default()
        };
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
        Svc {
            nats,
            admin,
            running,
            tmp,
        }
    }

    fn cached(&self, sha: &str) -> std::path::PathBuf {
        self.tmp.path().join("cache/sha256").join(sha)
    }

    /// Every answer to one prefetch of `image` on `host`, until its outcome.
    async fn prefetch(&self, host: &str, image: &str) -> Vec<proto::PrefetchProgress> {
        let subject = wnodes_bus::subject::image_prefetch_subject(host).unwrap();
        let mut replies = control::request(
            &self.admin,
            &subject,
            &proto::PrefetchRequest {
                image: image.into(),
                wait: None,
            },
        )
        .await
        .unwrap();
        let mut answers = Vec::new();
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
                .await
                .unwrap_or_else(|_| panic!("no outcome within 30 s: {answers:?}"))
                .unwrap();
            let Reply::Answer(body) = reply else {
                panic!("no responders on {subject}")
            };
            let p = proto::PrefetchProgress::decode(body).unwrap();
            let last = p.outcome.is_some();
            answers.push(p);
            if last {
                return answers;
            }
        }
    }
}

fn raw(url: String, sha256: String) -> CatalogEntry {
    CatalogEntry {
        url,
        sha256,
        format: DiskFormat::Raw,
        kernel: None,
        initrd: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_image_is_fetched_with_progress_then_found_cached() {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    // 8 chunks, one every 400 ms: about 3.2 s, so several progress answers at one a second.
    let (base, count) = serve_slowly(data.clone(), 8, Duration::from_millis(400)).await;
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("vmlinuz");
    std::fs::write(&kernel, b"kernel bytes").unwrap();
    let mut el9 = raw(format!("{base}/img"), digest(&data));
    el9.kernel = Some(Artifact {
        url: format!("file://{}", kernel.display()),
        sha256: digest(b"kernel bytes"),
    });
    let svc = Svc::start(BTreeMap::from([("el9".to_owned(), el9)])).await;

    let answers = svc.prefetch(HOST, "el9").await;
    assert!(answers.len() >= 3, "{answers:?}");
    for a in &answers {
        assert_eq!(a.host, HOST);
        assert_eq!(a.image, "el9");
        assert_eq!(a.artifacts.len(), 2, "{a:?}");
        assert_eq!(a.artifacts[0].part, "disk");
        assert_eq!(a.artifacts[0].sha256, digest(&data));
        assert_eq!(a.artifacts[1].part, "kernel");
        assert!(!a.artifacts[0].cached);
    }
    // The disk's bytes only grow, its size is known from Content-Length once the answer came,
    // and some answer saw it part way.
    let disk: Vec<(u64, u64)> = answers
        .iter()
        .map(|a| (a.artifacts[0].bytes_done, a.artifacts[0].bytes_total))
        .collect();
    assert!(disk.windows(2).all(|w| w[0].0 <= w[1].0), "{disk:?}");
    let total = data.len() as u64;
    assert!(
        disk.iter()
            .any(|(done, t)| *t == total && 0 < *done && *done < total),
        "no answer saw the fetch part way: {disk:?}"
    );
    assert!(
        answers[..answers.len() - 1]
            .iter()
            .all(|a| a.outcome.is_none())
    );
    let last = answers.last().unwrap();
    assert_eq!(
        last.outcome,
        Some(Outcome::Done(proto::PrefetchDone { fetched: true }))
    );
    assert_eq!(disk.last(), Some(&(total, total)));
    assert_eq!(last.artifacts[1].bytes_done, 12);
    let file = std::fs::read(svc.cached(&digest(&data))).unwrap();
    assert_eq!(digest(&file), digest(&data));
    assert!(svc.cached(&digest(b"kernel bytes")).exists());

    // Again: everything is cached, nothing fetched, one answer.
    let again = svc.prefetch(HOST, "el9").await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        again[0].outcome,
        Some(Outcome::Done(proto::PrefetchDone { fetched: false }))
    );
    assert!(again[0].artifacts.iter().all(|a| a.cached), "{again:?}");
    assert_eq!(again[0].artifacts[0].bytes_done, total);
    assert_eq!(count.load(Ordering::SeqCst), 1, "one download");
    assert_eq!(svc.running.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prefetches_and_a_vm_request_download_once() {
    let data = b"shared image".repeat(50_000);
    let (base, count) = serve_slowly(data.clone(), 10, Duration::from_millis(300)).await;
    let svc = Svc::start(BTreeMap::from([(
        "sl6".to_owned(),
        raw(format!("{base}/img"), digest(&data)),
    )]))
    .await;
    let launcher = connect(&svc.nats.admin(), "launcher@hv1.example.org")
        .await
        .unwrap();
    let mut events = subscribe(&launcher, "wnodes.evt.*.image.>").await.unwrap();
    let vm = Events::new(HOST, "launcher@hv1.example.org").build(
        &run("race"),
        requested(proto::VmSpec {
            vm_id: "vm-race".into(),
            image: "sl6".into(),
            ..Default::default()
        }),
    );
    let (a, b, published) = tokio::join!(
        svc.prefetch(HOST, "sl6"),
        svc.prefetch(HOST, "sl6"),
        launcher.publish(&vm)
    );
    published.unwrap();
    for answers in [&a, &b] {
        assert_eq!(
            answers.last().unwrap().outcome,
            Some(Outcome::Done(proto::PrefetchDone { fetched: true })),
            "{answers:?}"
        );
    }
    let ev = events.next(Duration::from_secs(30)).await.unwrap();
    let Some(Body::ImageReady(r)) = ev.body else {
        panic!("expected image.ready, got {ev:?}")
    };
    assert_eq!(r.vm_id, "vm-race");
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "three requests, one download"
    );
    assert_eq!(svc.running.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_image_a_bad_source_and_a_host_without_an_image_service_fail_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let svc = Svc::start(BTreeMap::from([(
        "gone".to_owned(),
        raw(
            format!("file://{}/missing.raw", tmp.path().display()),
            digest(b"x"),
        ),
    )]))
    .await;

    let answers = svc.prefetch(HOST, "centos9").await;
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].outcome,
        Some(Outcome::Failed(proto::PrefetchFailed {
            reason: "image 'centos9' is not in this host's catalog".into()
        }))
    );

    let answers = svc.prefetch(HOST, "gone").await;
    let Some(Outcome::Failed(f)) = &answers.last().unwrap().outcome else {
        panic!("{answers:?}")
    };
    assert!(
        f.reason
            .starts_with("image 'gone': cannot open the source ")
            && f.reason.contains("missing.raw"),
        "{}",
        f.reason
    );

    // No image service on hv2: the server answers "no responders" at once.
    let subject = wnodes_bus::subject::image_prefetch_subject("hv2.example.org").unwrap();
    let mut replies = control::request(&svc.admin, &subject, &proto::PrefetchRequest::default())
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .unwrap();
    assert_eq!(reply, Some(Reply::NoResponders));
    assert_eq!(svc.running.stop().await, 0);
}
