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
//! a caller that gives up (handler timeout) does not cancel the fetch for the others.

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared},
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Artifact, is_sha256_hex};

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

enum Lookup {
    Hit(u64),
    Wait(SharedFetch),
}

/// Handle to the cache; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    client: reqwest::Client,
    in_flight: Mutex<HashMap<String, SharedFetch>>,
    downloads: AtomicU64,
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
    /// Opens the cache under `cache_dir` (creating `<cache_dir>/sha256`).
    pub fn open(cache_dir: &Path) -> Result<Self, CacheError> {
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
        let path = self.path_of(&artifact.sha256);
        match self.lookup(artifact).map_err(Arc::new)? {
            Lookup::Hit(size_bytes) => Ok(Cached {
                path,
                size_bytes,
                hit: true,
            }),
            Lookup::Wait(fetch) => fetch.await.map(|size_bytes| Cached {
                path,
                size_bytes,
                hit: false,
            }),
        }
    }

    /// Starts fetching `artifact` unless it is cached or being fetched; does not wait.
    pub fn prefetch(&self, artifact: &Artifact) -> Result<(), CacheError> {
        self.lookup(artifact).map(drop)
    }

    fn lookup(&self, artifact: &Artifact) -> Result<Lookup, CacheError> {
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
        if let Some(fetch) = in_flight.get(digest) {
            return Ok(Lookup::Wait(fetch.clone()));
        }
        match std::fs::metadata(&path) {
            Ok(m) => return Ok(Lookup::Hit(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", &path)(e)),
        }
        self.inner.downloads.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let art = artifact.clone();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let res = fetch(&inner, &art).await;
            match &res {
                Ok(size) => {
                    tracing::info!(url = %art.url, sha256 = %art.sha256, size, elapsed = ?started.elapsed(), "Fetched into the cache.")
                }
                Err(e) => {
                    tracing::warn!(url = %art.url, sha256 = %art.sha256, error = %wnodes_bus::ErrorChain(e), "Fetch failed.")
                }
            }
            inner.in_flight.lock().remove(&art.sha256);
            res.map_err(Arc::new)
        });
        let owned_digest = digest.to_owned();
        let shared = async move {
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
        in_flight.insert(digest.to_owned(), shared.clone());
        Ok(Lookup::Wait(shared))
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

async fn fetch(inner: &Inner, art: &Artifact) -> Result<u64, CacheError> {
    let tmp = inner.dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        art.sha256,
        uuid::Uuid::new_v4().simple()
    ));
    let res = fetch_into(inner, art, &tmp).await;
    if res.is_err()
        && let Err(e) = tokio::fs::remove_file(&tmp).await
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %tmp.display(), error = %e, "Cannot remove the temporary file.");
    }
    res
}

async fn fetch_into(inner: &Inner, art: &Artifact, tmp: &Path) -> Result<u64, CacheError> {
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
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http)?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io_err("write", tmp))?;
            size += chunk.len() as u64;
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
