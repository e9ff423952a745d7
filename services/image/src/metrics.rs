//! The image cache's Prometheus metrics (`wnodes_image_cache_*`).

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

/// Counters of the image cache; cheap to clone (every clone counts into the same metrics).
#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) evictions: Counter,
    pub(crate) evicted_bytes: Counter,
    pub(crate) fetched_bytes: Counter,
    pub(crate) bytes: Gauge,
    pub(crate) pinned: Gauge,
}

impl CacheMetrics {
    /// Registers the metrics under `wnodes_image_cache_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("wnodes_image_cache");
        r.register(
            "hits",
            "Lookups of an image, kernel or initrd found in the cache",
            m.hits.clone(),
        );
        r.register(
            "misses",
            "Lookups that had to fetch (or join a running fetch)",
            m.misses.clone(),
        );
        r.register(
            "evictions",
            "Files removed to keep the cache within its cap",
            m.evictions.clone(),
        );
        r.register(
            "evicted_bytes",
            "Bytes of the files removed to keep the cache within its cap",
            m.evicted_bytes.clone(),
        );
        r.register(
            "fetched_bytes",
            "Bytes fetched into the cache",
            m.fetched_bytes.clone(),
        );
        r.register(
            "bytes",
            "Bytes of the cached files, as last measured",
            m.bytes.clone(),
        );
        r.register(
            "pinned",
            "Files pinned by a VM that uses or is about to use them",
            m.pinned.clone(),
        );
        m
    }

    pub fn hits(&self) -> u64 {
        self.hits.get()
    }

    pub fn misses(&self) -> u64 {
        self.misses.get()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    pub fn evicted_bytes(&self) -> u64 {
        self.evicted_bytes.get()
    }

    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes.get()
    }

    /// Bytes of the cached files when the cache last measured them.
    pub fn bytes(&self) -> i64 {
        self.bytes.get()
    }
}
