//! The content-addressed image cache: `<cache_dir>/sha256/<hex>`, read-only files named by
//! their verified digest.
//!
//! A fetch streams the source (`file://` or `http(s)://`) into a temporary file in the same
//! directory (`.tmp-<hex>-<uuid>`), hashing while it writes; the file is fsynced, checked
//! against the expected digest, made read-only (0444), renamed into place and the directory is
//! fsynced. A mismatch removes the temporary file. So a name in the cache is always a complete,
//! verified file, whatever crashed when.
//!
//! Single flight: every fetch runs in its own task registered under its digest; a request for a
//! digest that is being fetched waits for that task instead of starting another download, and
//! a caller that gives up (handler timeout) does not cancel the fetch for the others. The
//! flight counts its bytes ([`FetchProgress`]), so every request that joins it, however late,
//! can report how far it is.
//!
//! Within its disk: with a cap ([`Watermarks`]), [`Cache::enforce`] removes the least recently
//! used files once the cached files exceed the high watermark, until they are within the low
//! one. A file is used when it is fetched or found (its mtime is set to that moment, so the
//! order survives a restart). A file some holder has pinned ([`Cache::pin`]: the image service
//! pins a VM's image, kernel and initrd from its `vm.requested` until its `vm.stopped` or
//! `vm.failed`) is never removed; pins are taken before the lookup and eviction holds the pin
//! lock while it removes, so a file is either pinned before eviction looks or looked up again
//! (and fetched again) after it. Enforcement runs after every fetch, after an unpin and at
//! start; the cap is the point where eviction starts, not a reservation (a fetch may take the
//! files above it until it ends).

use parking_lot::Mutex;
use std::{
    collections::{HashMap, HashSet},
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    config::{Artifact, Watermarks, is_sha256_hex},
    metrics::CacheMetrics,
};

/// Prefix of temporary files in the cache directory.
const TMP_PREFIX: &str = ".tmp-";
/// Read size for `file://` sources.
const FILE_CHUNK: usize = 256 * 1024;

/// Why an artifact could not be put into the cache. The `Display` text never repeats the
/// `#[source]`; render reasons with [`wnodes_bus::ErrorChain`].
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{digest:?} is not a sha256 digest (64 lowercase hex characters)")]
    BadDigest { digest: String },
    #[error("bad URL {url:?}: {problem}")]
    BadUrl { url: String, problem: String },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("fetching {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("fetching {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("sha256 mismatch for {url}: expected {expected}, got {actual}")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("the fetch of {digest} ended abnormally: {detail}")]
    Task { digest: String, detail: String },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

impl CacheError {
    /// True when trying again later may succeed (network trouble, a 5xx/429 answer, local I/O);
    /// false for a wrong digest, a missing source or a 4xx answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Http { .. } | Self::Task { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::Io { op, source, .. } => {
                !(*op == "open the source" && source.kind() == io::ErrorKind::NotFound)
            }
            Self::BadDigest { .. }
            | Self::BadUrl { .. }
            | Self::Mismatch { .. }
            | Self::Client(_) => false,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError + use<> {
    let path = path.display().to_string();
    move |source| CacheError::Io { op, path, source }
}

/// A verified file in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub path: PathBuf,
    pub size_bytes: u64,
    /// True when the file was already there (nothing was fetched for this request).
    pub hit: bool,
}

type FetchResult = Result<u64, Arc<CacheError>>;
type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

/// How far one fetch is: bytes written so far, and the size expected (the source file's size,
/// or the HTTP answer's `Content-Length`) once known. Shared by every request waiting for it.
#[derive(Debug)]
pub struct FetchProgress {
    done: AtomicU64,
    /// `UNKNOWN` until the source told.
    total: AtomicU64,
}

const UNKNOWN: u64 = u64::MAX;

impl FetchProgress {
    fn new() -> Self {
        Self {
            done: AtomicU64::new(0),
            total: AtomicU64::new(UNKNOWN),
        }
    }

    /// Bytes fetched so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The expected size, when the source said.
    pub fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|t| *t != UNKNOWN)
    }

    fn set_total(&self, total: Option<u64>) {
        if let Some(t) = total {
            self.total.store(t, Ordering::Relaxed);
        }
    }

    fn add(&self, n: usize) {
        self.done.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A fetch registered under its digest: what its waiters await, and its progress.
#[derive(Clone)]
struct Flight {
    result: SharedFetch,
    progress: Arc<FetchProgress>,
}

/// What [`Cache::start`] found.
#[derive(Debug)]
pub enum Started {
    /// Already in the cache.
    Cached(Cached),
    /// Being fetched (by this call or an earlier one).
    Fetching(Fetch),
}

/// A request's handle on a running fetch: its progress, and the wait for its end.
pub struct Fetch {
    flight: Flight,
    path: PathBuf,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("path", &self.path)
            .field("progress", &self.flight.progress)
            .finish_non_exhaustive()
    }
}

impl Fetch {
    /// How far the fetch is (shared with every other request for the same digest).
    pub fn progress(&self) -> &FetchProgress {
        &self.flight.progress
    }

    /// Waits for the fetch's end; dropping the wait does not cancel the fetch.
    pub fn wait(&self) -> impl Future<Output = Result<Cached, Arc<CacheError>>> + Send + 'static {
        let (result, path) = (self.flight.result.clone(), self.path.clone());
        async move {
            result.await.map(|size_bytes| Cached {
                path,
                size_bytes,
                hit: false,
            })
        }
    }
}

/// Handle to the cache; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    client: reqwest::Client,
    in_flight: Mutex<HashMap<String, Flight>>,
    downloads: AtomicU64,
    limits: Option<Watermarks>,
    /// Holder (a run key) → the digests it pinned.
    pins: Mutex<HashMap<String, Vec<String>>>,
    metrics: CacheMetrics,
}

/// What one [`Cache::enforce`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    /// The digests removed, least recently used first, with their sizes.
    pub removed: Vec<(String, u64)>,
    /// Bytes of cached files afterwards.
    pub bytes_after: u64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.dir)
            .field("downloads", &self.downloads)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Opens the cache under `cache_dir` (creating `<cache_dir>/sha256`), without a cap.
    pub fn open(cache_dir: &Path) -> Result<Self, CacheError> {
        Self::open_with(cache_dir, None, CacheMetrics::default())
    }

    /// Opens the cache under `cache_dir` with its cap (`None`: no eviction) and the metrics it
    /// counts into.
    pub fn open_with(
        cache_dir: &Path,
        limits: Option<Watermarks>,
        metrics: CacheMetrics,
    ) -> Result<Self, CacheError> {
        let dir = cache_dir.join("sha256");
        std::fs::create_dir_all(&dir).map_err(io_err("create the cache directory", &dir))?;
        wnodes_bus::connect::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("wnodes-image/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(CacheError::Client)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                client,
                in_flight: Mutex::new(HashMap::new()),
                downloads: AtomicU64::new(0),
                limits,
                pins: Mutex::new(HashMap::new()),
                metrics,
            }),
        })
    }

    /// The directory holding the cached files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Where a file with digest `sha256` lives in the cache.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.inner.dir.join(sha256)
    }

    /// How many fetches this handle started (for tests and metrics).
    pub fn fetches_started(&self) -> u64 {
        self.inner.downloads.load(Ordering::Relaxed)
    }

    /// Makes sure `artifact` is in the cache: a hit returns at once, otherwise waits for the
    /// (single) fetch of its digest, starting it if nobody has.
    pub async fn ensure(&self, artifact: &Artifact) -> Result<Cached, Arc<CacheError>> {
        match self.start(artifact).map_err(Arc::new)? {
            Started::Cached(cached) => Ok(cached),
            Started::Fetching(fetch) => fetch.wait().await,
        }
    }

    /// Starts fetching `artifact` unless it is cached or being fetched; does not wait.
    pub fn prefetch(&self, artifact: &Artifact) -> Result<(), CacheError> {
        self.start(artifact).map(drop)
    }

    /// A hit, or a handle on the (single) fetch of `artifact`'s digest, started by this call
    /// unless one is running; does not wait.
    pub fn start(&self, artifact: &Artifact) -> Result<Started, CacheError> {
        let digest = artifact.sha256.as_str();
        if !is_sha256_hex(digest) {
            return Err(CacheError::BadDigest {
                digest: digest.to_owned(),
            });
        }
        let path = self.path_of(digest);
        // The map lock is held across the existence check, so a fetch that finishes (renames
        // and deregisters) in between cannot make us start a second download.
        let mut in_flight = self.inner.in_flight.lock();
        if let Some(flight) = in_flight.get(digest) {
            self.inner.metrics.misses.inc();
            return Ok(Started::Fetching(Fetch {
                flight: flight.clone(),
                path,
            }));
        }
        match std::fs::metadata(&path) {
            Ok(m) => {
                self.inner.metrics.hits.inc();
                touch(&path);
                return Ok(Started::Cached(Cached {
                    path,
                    size_bytes: m.len(),
                    hit: true,
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", &path)(e)),
        }
        self.inner.metrics.misses.inc();
        self.inner.downloads.fetch_add(1, Ordering::Relaxed);
        let cache = self.clone();
        let art = artifact.clone();
        let progress = Arc::new(FetchProgress::new());
        let counter = progress.clone();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let res = fetch(&cache.inner, &art, &counter).await;
            match &res {
                Ok(size) => {
                    cache.inner.metrics.fetched_bytes.inc_by(*size);
                    tracing::info!(url = %art.url, sha256 = %art.sha256, size, elapsed = ?started.elapsed(), "Fetched into the cache.")
                }
                Err(e) => {
                    tracing::warn!(url = %art.url, sha256 = %art.sha256, error = %wnodes_bus::ErrorChain(e), "Fetch failed.")
                }
            }
            cache.inner.in_flight.lock().remove(&art.sha256);
            if res.is_ok()
                && let Err(e) = cache.enforce().await
            {
                tracing::warn!(error = %wnodes_bus::ErrorChain(&e), "Cannot keep the image cache within its cap.");
            }
            res.map_err(Arc::new)
        });
        let owned_digest = digest.to_owned();
        let result = async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Arc::new(CacheError::Task {
                    digest: owned_digest,
                    detail: e.to_string(),
                })),
            }
        }
        .boxed()
        .shared();
        let flight = Flight { result, progress };
        in_flight.insert(digest.to_owned(), flight.clone());
        Ok(Started::Fetching(Fetch { flight, path }))
    }

    /// Pins `digests` for `holder` (replacing what it pinned before): [`Cache::enforce`] never
    /// removes them until [`Cache::unpin`]. Pin before looking an image up.
    pub fn pin(&self, holder: &str, digests: Vec<String>) {
        self.inner.pins.lock().insert(holder.to_owned(), digests);
        self.inner.metrics.pinned.set(self.pinned().len() as i64);
    }

    /// Drops `holder`'s pins; true when it had some.
    pub fn unpin(&self, holder: &str) -> bool {
        let had = self.inner.pins.lock().remove(holder).is_some();
        self.inner.metrics.pinned.set(self.pinned().len() as i64);
        had
    }

    /// Every digest some holder pinned.
    pub fn pinned(&self) -> HashSet<String> {
        self.inner.pins.lock().values().flatten().cloned().collect()
    }

    /// The cap's watermarks, `None` without a cap.
    pub fn limits(&self) -> Option<Watermarks> {
        self.inner.limits
    }

    /// Keeps the cache within its cap: when the cached files exceed the high watermark,
    /// removes unpinned files, least recently used first, until they are within the low one
    /// (or only pinned files are left, which is logged). Without a cap it only measures.
    pub async fn enforce(&self) -> Result<Evicted, CacheError> {
        let cache = self.clone();
        tokio::task::spawn_blocking(move || cache.enforce_now())
            .await
            .map_err(|e| io_err("keep within its cap", &self.inner.dir)(io::Error::other(e)))?
    }

    fn enforce_now(&self) -> Result<Evicted, CacheError> {
        let inner = &self.inner;
        // Held while removing: a pin taken meanwhile waits, then finds the file gone and
        // fetches it again.
        let pins = inner.pins.lock();
        let mut files = self.files()?;
        let mut total: u64 = files.iter().map(|f| f.size).sum();
        let mut done = Evicted::default();
        if let Some(limits) = inner.limits
            && total > limits.high
        {
            let pinned: HashSet<&str> = pins.values().flatten().map(String::as_str).collect();
            files.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.digest.cmp(&b.digest)));
            for f in &files {
                if total <= limits.low {
                    break;
                }
                if pinned.contains(f.digest.as_str()) {
                    continue;
                }
                let path = inner.dir.join(&f.digest);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("evict", &path)(e)),
                }
                total = total.saturating_sub(f.size);
                inner.metrics.evictions.inc();
                inner.metrics.evicted_bytes.inc_by(f.size);
                tracing::info!(sha256 = %f.digest, size = f.size, "Evicted the least recently used image from the cache.");
                done.removed.push((f.digest.clone(), f.size));
            }
            if total > limits.low {
                tracing::warn!(
                    bytes = total,
                    low_watermark = limits.low,
                    pinned = pinned.len(),
                    "The image cache stays above its low watermark: what is left is in use."
                );
            }
        }
        drop(pins);
        inner
            .metrics
            .bytes
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        done.bytes_after = total;
        Ok(done)
    }

    /// The complete files in the cache: digest, size, last use.
    fn files(&self) -> Result<Vec<CachedFile>, CacheError> {
        let dir = &self.inner.dir;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().filter(|n| is_sha256_hex(n)) else {
                continue;
            };
            // Removed meanwhile: not there any more.
            let Ok(m) = entry.metadata() else { continue };
            out.push(CachedFile {
                digest: digest.to_owned(),
                size: m.len(),
                used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    /// Removes temporary files a crash left in the cache directory; returns how many.
    pub async fn remove_stale_temp_files(&self) -> Result<usize, CacheError> {
        let dir = &self.inner.dir;
        let mut rd = tokio::fs::read_dir(dir)
            .await
            .map_err(io_err("list", dir))?;
        let mut removed = 0;
        while let Some(entry) = rd.next_entry().await.map_err(io_err("list", dir))? {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                // A fetch of this process may be writing it; only called before any fetch.
                tokio::fs::remove_file(&path)
                    .await
                    .map_err(io_err("remove", &path))?;
                tracing::info!(path = %path.display(), "Removed a stale temporary file.");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A complete file in the cache.
struct CachedFile {
    digest: String,
    size: u64,
    used: SystemTime,
}

/// Records a use of a cached file: its mtime becomes now (the LRU order, kept across restarts).
/// The file is read-only; its owner may still set its times.
fn touch(path: &Path) {
    let res = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "Cannot record the use of a cached image.");
    }
}

async fn fetch(inner: &Inner, art: &Artifact, progress: &FetchProgress) -> Result<u64, CacheError> {
    let tmp = inner.dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        art.sha256,
        uuid::Uuid::new_v4().simple()
    ));
    let res = fetch_into(inner, art, &tmp, progress).await;
    if res.is_err()
        && let Err(e) = tokio::fs::remove_file(&tmp).await
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), error = %e, "Cannot remove the temporary file.");
    }
    res
}

async fn fetch_into(
    inner: &Inner,
    art: &Artifact,
    tmp: &Path,
    progress: &FetchProgress,
) -> Result<u64, CacheError> {
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .await
        .map_err(io_err("create", tmp))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    if art.url.starts_with("file:") {
        let src = reqwest::Url::parse(&art.url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| CacheError::BadUrl {
                url: art.url.clone(),
                problem: "not an absolute file:/// URL".into(),
            })?;
        let mut input = tokio::fs::File::open(&src)
            .await
            .map_err(io_err("open the source", &src))?;
        progress.set_total(input.metadata().await.ok().map(|m| m.len()));
        let mut buf = vec![0u8; FILE_CHUNK];
        loop {
            let n = input.read(&mut buf).await.map_err(io_err("read", &src))?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            out.write_all(chunk).await.map_err(io_err("write", tmp))?;
            size += n as u64;
            progress.add(n);
        }
    } else if art.url.starts_with("http://") || art.url.starts_with("https://") {
        let http = |source| CacheError::Http {
            url: art.url.clone(),
            source,
        };
        let resp = inner.client.get(&art.url).send().await.map_err(http)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(CacheError::Status {
                url: art.url.clone(),
                status: status.as_u16(),
            });
        }
        progress.set_total(resp.content_length());
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http)?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io_err("write", tmp))?;
            size += chunk.len() as u64;
            progress.add(chunk.len());
        }
    } else {
        return Err(CacheError::BadUrl {
            url: art.url.clone(),
            problem: "only file:///, http:// and https:// are supported".into(),
        });
    }
    out.flush().await.map_err(io_err("write", tmp))?;
    out.sync_all().await.map_err(io_err("fsync", tmp))?;
    drop(out);
    let actual = hex::encode(hasher.finalize());
    if actual != art.sha256 {
        return Err(CacheError::Mismatch {
            url: art.url.clone(),
            expected: art.sha256.clone(),
            actual,
        });
    }
    tokio::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o444))
        .await
        .map_err(io_err("make read-only", tmp))?;
    let dest = inner.dir.join(&art.sha256);
    tokio::fs::rename(tmp, &dest)
        .await
        .map_err(io_err("rename into place", &dest))?;
    let dir = tokio::fs::File::open(&inner.dir)
        .await
        .map_err(io_err("open", &inner.dir))?;
    dir.sync_all().await.map_err(io_err("fsync", &inner.dir))?;
    Ok(size)
}
