//! The image cache within its disk, through the service: a real nats-server, the image
//! service's consumer in-process, "the launcher" publishing `vm.requested` / `vm.stopped`.
//! Under pressure the image a running VM uses stays (across a restart of the service too),
//! the least recently used image goes, and the metrics count it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use sha2::{Digest, Sha256};
use wnodes_bus::{
    Bus,
    proto::{self, event::Body},
};
use wnodes_image::{CatalogEntry, DiskFormat, Image, ImageConfig};
use wnodes_runtime::{Config, start::InProcess};
use wnodes_testkit::{
    NatsServer,
    bus::{EventSub, connect, subscribe},
    events::{Events, run, vm_requested as requested},
};

const HOST: &str = "hv1.example.org";
const SIZE: usize = 300_000;

fn from_launcher(job: &str, body: impl wnodes_testkit::events::IntoBody) -> proto::Event {
    Events::new(HOST, "launcher@hv1.example.org").build(&run(job), body)
}

fn vm_requested(job: &str, image: &str) -> proto::Event {
    from_launcher(
        job,
        requested(proto::VmSpec {
            vm_id: format!("vm-{job}"),
            image: image.into(),
            ..Default::default()
        }),
    )
}

fn vm_stopped(job: &str) -> proto::Event {
    from_launcher(
        job,
        wnodes_testkit::events::vm_stopped(&format!("vm-{job}")),
    )
}

/// Four images of `SIZE` bytes; a cap of 1,000,000 bytes, evicting above 100 % down to 90 %:
/// three fit, a fourth makes one go.
fn config(dir: &Path) -> (ImageConfig, BTreeMap<String, String>) {
    let mut catalog = BTreeMap::new();
    let mut digests = BTreeMap::new();
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let data = vec![i as u8 + 1; SIZE];
        let src = dir.join(format!("{name}.raw"));
        std::fs::write(&src, &data).unwrap();
        let sha = hex::encode(Sha256::digest(&data));
        digests.insert(name.to_owned(), sha.clone());
        catalog.insert(
            name.to_owned(),
            CatalogEntry {
                url: format!("file://{}", src.display()),
                sha256: sha,
                format: DiskFormat::Raw,
                kernel: None,
                initrd: None,
            },
        );
    }
    let config = ImageConfig {
        max_bytes: Some(1_000_000),
        high_watermark_percent: 100,
        low_watermark_percent: 90,
        catalog,
        ..Default::default()
    };
    (config, digests)
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn start(
    nats: &NatsServer,
    state: &Path,
    config: ImageConfig,
    http: SocketAddr,
) -> InProcess {
    let identity = nats
        .identity(&wnodes_bus::roles::IMAGE, HOST)
        .await
        .unwrap();
    let mut cfg = Config::local(&identity, HOST, state, config);
    cfg.common.http_addr = Some(http);
    InProcess::start::<Image>(cfg).await.unwrap()
}

/// The next `image.ready` / `image.failed`; panics on a failure.
async fn ready(sub: &mut EventSub, vm: &str) -> proto::ImageReady {
    let ev = sub.next(Duration::from_secs(20)).await.unwrap();
    match ev.body {
        Some(Body::ImageReady(r)) if r.vm_id == vm => r,
        other => panic!("expected image.ready of {vm}, got {other:?}"),
    }
}

/// The digests in the cache, sorted.
fn cached(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("cache/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn names(digests: &BTreeMap<String, String>, of: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = of.iter().map(|n| digests[*n].clone()).collect();
    v.sort();
    v
}

/// One sample of `/metrics`.
async fn metric(http: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Time for the file system's clock to tick between uses (the LRU order is the files' mtime).
async fn gap() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_pressure_the_image_in_use_stays_and_the_least_recently_used_goes() {
    let nats = NatsServer::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (config, digests) = config(tmp.path());
    let bus: Bus = connect(&nats.admin(), "launcher@hv1.example.org")
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.*.image.>").await.unwrap();
    let http = free_port();
    let running = start(&nats, &state, config.clone(), http).await;

    // vm-1 runs on a (the oldest image); b and c come and go with their VMs.
    bus.publish(&vm_requested("1", "a")).await.unwrap();
    assert!(!ready(&mut sub, "vm-1").await.cache_hit);
    gap().await;
    for job in ["2", "3"] {
        let image = if job == "2" { "b" } else { "c" };
        bus.publish(&vm_requested(job, image)).await.unwrap();
        ready(&mut sub, &format!("vm-{job}")).await;
        bus.publish(&vm_stopped(job)).await.unwrap();
        gap().await;
    }
    assert_eq!(cached(&state), names(&digests, &["a", "b", "c"]));

    // A restart: the pin of vm-1 (still running) comes back from the key store.
    assert_eq!(running.stop().await, 0);
    let running = start(&nats, &state, config.clone(), http).await;
    assert_eq!(cached(&state), names(&digests, &["a", "b", "c"]));

    // d takes the cache to 1,200,000 > 1,000,000: down to 900,000 by removing the least
    // recently used image nobody uses. a is older but vm-1 uses it: b goes.
    bus.publish(&vm_requested("4", "d")).await.unwrap();
    let d = ready(&mut sub, "vm-4").await;
    assert!(!d.cache_hit);
    assert!(Path::new(&d.path).exists());
    assert_eq!(cached(&state), names(&digests, &["a", "c", "d"]));
    assert_eq!(
        metric(http, "wnodes_image_cache_evictions_total").await,
        1.0
    );
    assert_eq!(
        metric(http, "wnodes_image_cache_evicted_bytes_total").await,
        SIZE as f64
    );
    assert_eq!(
        metric(http, "wnodes_image_cache_bytes").await,
        3.0 * SIZE as f64
    );
    assert_eq!(metric(http, "wnodes_image_cache_pinned").await, 2.0);
    // Since the restart: one lookup, a miss.
    assert_eq!(metric(http, "wnodes_image_cache_misses_total").await, 1.0);
    assert_eq!(metric(http, "wnodes_image_cache_hits_total").await, 0.0);

    // vm-1 ends; a may go now. A late, redelivered-looking vm.requested of that run (another
    // key) is answered but pins nothing (the release is a tombstone).
    bus.publish(&vm_stopped("1")).await.unwrap();
    let mut late = vm_requested("1", "a");
    late.id = format!("{}#late", late.id);
    bus.publish(&late).await.unwrap();
    assert!(ready(&mut sub, "vm-1").await.cache_hit);
    assert_eq!(metric(http, "wnodes_image_cache_hits_total").await, 1.0);
    gap().await;
    // b is wanted again: a miss that makes room by removing c, now the least recently used
    // (a was just looked up by the late request).
    bus.publish(&vm_requested("5", "b")).await.unwrap();
    assert!(!ready(&mut sub, "vm-5").await.cache_hit);
    assert_eq!(cached(&state), names(&digests, &["a", "b", "d"]));
    assert_eq!(
        metric(http, "wnodes_image_cache_evictions_total").await,
        2.0
    );
    assert_eq!(metric(http, "wnodes_image_cache_pinned").await, 2.0);

    // d's VM (vm-4) and b's (vm-5) still run; a is unpinned and least recently used now.
    gap().await;
    bus.publish(&vm_requested("6", "c")).await.unwrap();
    ready(&mut sub, "vm-6").await;
    assert_eq!(cached(&state), names(&digests, &["b", "c", "d"]));
    assert_eq!(running.stop().await, 0);
}
