//! The content-addressed cache against real files and a loopback HTTP server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{os::unix::fs::PermissionsExt, path::Path, sync::atomic::Ordering, time::Duration};

use wnodes_testkit::http::serve;

use sha2::{Digest, Sha256};
use wnodes_image::{Artifact, Cache, CacheError};

fn digest(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn payload() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
}

/// Files in the cache directory (temporary ones included).
fn cache_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn file_url_is_fetched_verified_read_only_then_hit() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("disk.raw");
    let data = payload();
    std::fs::write(&src, &data).unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let art = Artifact {
        url: format!("file://{}", src.display()),
        sha256: digest(&data),
    };
    let first = cache.ensure(&art).await.unwrap();
    assert!(!first.hit);
    assert_eq!(first.size_bytes, data.len() as u64);
    assert_eq!(
        first.path,
        tmp.path().join("cache/sha256").join(&art.sha256)
    );
    assert_eq!(std::fs::read(&first.path).unwrap(), data);
    let mode = std::fs::metadata(&first.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);

    let second = cache.ensure(&art).await.unwrap();
    assert!(second.hit, "second request must be a cache hit");
    assert_eq!(second.path, first.path);
    assert_eq!(second.size_bytes, first.size_bytes);
    assert_eq!(cache.fetches_started(), 1);
    assert_eq!(cache_entries(cache.dir()), vec![art.sha256.clone()]);
}

#[tokio::test]
async fn digest_mismatch_fails_naming_both_digests_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("disk.raw");
    std::fs::write(&src, b"not the image you expected").unwrap();
    let cache = Cache::open(&tmp.path().join("cache")).unwrap();
    let expected = digest(b"the real image");
    let art = Artifact {
        url: format!("file://{}", src.display()),
        sha256: expected.clone(),
    };
    let err = cache.ensure(&art).await.unwrap_err();
    assert!(matches!(*err, CacheError::Mismatch { .. }), "{err:?}");
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(msg.contains(&expected), "{msg}");
    assert!(
        msg.contains(&digest(b"not the image you expected")),
        "{msg}"
    );
    assert!(
        cache_entries(cache.dir()).is_empty(),
        "temp file left behind"
    );
    // A failed fetch is forgotten: the next request tries again.
    assert!(cache.ensure(&art).await.is_err());
    assert_eq!(cache.fetches_started(), 2);
}

#[tokio::test]
async fn missing_file_and_bad_digest_are_permanent_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let err = cache
        .ensure(&Artifact {
            url: format!("file://{}/nope.raw", tmp.path().display()),
            sha256: digest(b"x"),
        })
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    let err = cache
        .ensure(&Artifact {
            url: "file:///etc/hostname".into(),
            sha256: "../../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(*err, CacheError::BadDigest { .. }), "{err:?}");
}

#[tokio::test]
async fn http_fetch_from_loopback_server() {
    let data = payload();
    let (base, count) = serve(data.clone(), Duration::ZERO).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let art = Artifact {
        url: format!("{base}/img"),
        sha256: digest(&data),
    };
    let got = cache.ensure(&art).await.unwrap();
    assert!(!got.hit);
    assert_eq!(std::fs::read(&got.path).unwrap(), data);
    assert!(cache.ensure(&art).await.unwrap().hit);
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let err = cache
        .ensure(&Artifact {
            url: format!("{base}/missing"),
            sha256: digest(b"y"),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(*err, CacheError::Status { status: 404, .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_download() {
    let data = payload();
    let (base, count) = serve(data.clone(), Duration::from_millis(300))
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    let art = Artifact {
        url: format!("{base}/img"),
        sha256: digest(&data),
    };
    let (a, b, c) = tokio::join!(cache.ensure(&art), cache.ensure(&art), async {
        // A prefetch joining the same flight does not start another download either.
        cache.prefetch(&art).unwrap();
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    let () = c;
    assert_eq!(a.path, b.path);
    assert!(!a.hit && !b.hit);
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "two requests, one download"
    );
    assert_eq!(cache.fetches_started(), 1);
}

#[tokio::test]
async fn stale_temp_files_are_removed_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path()).unwrap();
    std::fs::write(cache.dir().join(".tmp-abc-123"), b"partial").unwrap();
    std::fs::write(cache.dir().join(digest(b"k")), b"k").unwrap();
    assert_eq!(cache.remove_stale_temp_files().await.unwrap(), 1);
    assert_eq!(cache_entries(cache.dir()), vec![digest(b"k")]);
}

/// An image of `size` bytes made of `tag`, written as `<name>.raw` under `dir`.
fn image_file(dir: &Path, name: &str, tag: u8, size: usize) -> Artifact {
    let data = vec![tag; size];
    let src = dir.join(format!("{name}.raw"));
    std::fs::write(&src, &data).unwrap();
    Artifact {
        url: format!("file://{}", src.display()),
        sha256: digest(&data),
    }
}

/// A cap of 1000 bytes, evicting above 900 down to 600; four images of 300 bytes. The oldest
/// image is pinned (a VM uses it): under pressure the least recently used *unpinned* image
/// goes, the pinned one stays however old it is, and a looked-up image counts as used.
#[tokio::test]
async fn eviction_removes_the_least_recently_used_and_never_a_pinned_image() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = wnodes_image::CacheMetrics::default();
    let limits = wnodes_image::Watermarks::of(1000, 90, 60);
    assert_eq!(
        limits,
        wnodes_image::Watermarks {
            high: 900,
            low: 600
        }
    );
    let cache = Cache::open_with(&tmp.path().join("cache"), Some(limits), metrics.clone()).unwrap();
    let [a, b, c, d] =
        [("a", 1u8), ("b", 2), ("c", 3), ("d", 4)].map(|(n, t)| image_file(tmp.path(), n, t, 300));
    // mtimes have nanoseconds, but the file system's clock ticks: leave a gap between uses.
    let gap = || tokio::time::sleep(Duration::from_millis(20));

    cache.pin("run-a", vec![a.sha256.clone()]);
    assert!(!cache.ensure(&a).await.unwrap().hit);
    gap().await;
    cache.ensure(&b).await.unwrap();
    gap().await;
    cache.ensure(&c).await.unwrap();
    gap().await;
    // 900 bytes: at the high watermark, not above it; nothing goes.
    assert_eq!(metrics.evictions(), 0);
    assert_eq!(metrics.bytes(), 900);
    // b is used again: c is now the least recently used unpinned image.
    assert!(cache.ensure(&b).await.unwrap().hit);
    gap().await;
    // d takes the cache to 1200 > 900: evict down to 600, least recently used first (a, c,
    // b, d), skipping a (pinned): c goes (900 left), then b (600 left), leaving a and d.
    cache.ensure(&d).await.unwrap();
    let mut left = cache_entries(cache.dir());
    left.sort();
    let mut want = vec![a.sha256.clone(), d.sha256.clone()];
    want.sort();
    assert_eq!(left, want);
    assert_eq!(metrics.evictions(), 2);
    assert_eq!(metrics.evicted_bytes(), 600);
    assert_eq!(metrics.bytes(), 600);
    assert_eq!(metrics.hits(), 1);
    assert_eq!(metrics.misses(), 4);
    assert_eq!(metrics.fetched_bytes(), 1200);

    // The VM using a ends: at 600 bytes the cache is within its cap, nothing goes.
    assert!(cache.unpin("run-a"));
    let e = cache.enforce().await.unwrap();
    assert!(e.removed.is_empty(), "{e:?}");
    assert_eq!(e.bytes_after, 600);
    // Pressure again: b (900, not above the high watermark), then c (1200): now a, unpinned
    // and the least recently used, goes first, then d.
    cache.ensure(&b).await.unwrap();
    gap().await;
    cache.ensure(&c).await.unwrap();
    let mut left = cache_entries(cache.dir());
    left.sort();
    let mut want = vec![b.sha256.clone(), c.sha256.clone()];
    want.sort();
    assert_eq!(left, want);
    assert_eq!(metrics.evictions(), 4);
}

/// Without a cap nothing is evicted, however large the cache grows.
#[tokio::test]
async fn without_a_cap_nothing_is_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = wnodes_image::CacheMetrics::default();
    let cache = Cache::open_with(&tmp.path().join("cache"), None, metrics.clone()).unwrap();
    for (n, t) in [("a", 1u8), ("b", 2), ("c", 3)] {
        cache
            .ensure(&image_file(tmp.path(), n, t, 4000))
            .await
            .unwrap();
    }
    assert_eq!(cache_entries(cache.dir()).len(), 3);
    assert_eq!((metrics.evictions(), metrics.bytes()), (0, 12000));
}
