//! The `[image]` configuration section (env `WNODES_IMAGE__...`): where the cache lives and
//! which images exist.
//!
//! ```toml
//! [image]
//! cache_dir = "/var/lib/wnodes/image/cache"   # default: <state_dir>/cache
//! max_bytes = 107374182400                     # the cache's cap (100 GiB); default: no cap
//! high_watermark_percent = 90                  # evict when the files exceed this much of max_bytes
//! low_watermark_percent = 80                   # ... down to this much (least recently used first)
//!
//! [image.catalog.sl6]
//! url = "https://images.example.org/sl6.raw"
//! sha256 = "ab12...64 lowercase hex"
//! format = "raw"                               # or "qcow2"; default "raw"
//! kernel = { url = "file:///srv/vmlinuz", sha256 = "..." }   # optional, direct boot
//! initrd = { url = "file:///srv/initrd.img", sha256 = "..." } # optional
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The service's own configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Root of the content-addressed cache; default `<state_dir>/cache`.
    pub cache_dir: Option<PathBuf>,
    /// The cache's cap (bytes of cached files); `None`: the cache grows without bound.
    pub max_bytes: Option<u64>,
    /// Eviction starts when the cached files exceed this percentage of `max_bytes`.
    pub high_watermark_percent: u8,
    /// Eviction stops once the cached files are within this percentage of `max_bytes`.
    pub low_watermark_percent: u8,
    /// Image catalog: catalog name → where to fetch it and its digest.
    pub catalog: BTreeMap<String, CatalogEntry>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_bytes: None,
            high_watermark_percent: 90,
            low_watermark_percent: 80,
            catalog: BTreeMap::new(),
        }
    }
}

/// The cache's size limits in bytes, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Eviction starts above this many bytes.
    pub high: u64,
    /// Eviction stops at or below this many bytes.
    pub low: u64,
}

impl Watermarks {
    /// `max_bytes` × the two percentages.
    pub fn of(max_bytes: u64, high_percent: u8, low_percent: u8) -> Self {
        let part =
            |p: u8| u64::try_from(u128::from(max_bytes) * u128::from(p) / 100).unwrap_or(max_bytes);
        Self {
            high: part(high_percent),
            low: part(low_percent),
        }
    }
}

/// One image of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// `file:///...`, `http://...` or `https://...`.
    pub url: String,
    /// Expected sha256 of the disk image, 64 lowercase hex characters.
    pub sha256: String,
    /// Disk image format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Kernel for direct boot; absent = boot through the image's bootloader.
    #[serde(default)]
    pub kernel: Option<Artifact>,
    /// Initrd for direct boot.
    #[serde(default)]
    pub initrd: Option<Artifact>,
}

/// A file fetched by URL and verified by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub url: String,
    pub sha256: String,
}

/// Disk image formats qemu is told about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The name used in events and on qemu's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("image.{key}: {problem}")]
    Limits { key: &'static str, problem: String },
}

/// A catalog entry that cannot be used; names the image and the field.
#[derive(Debug, thiserror::Error)]
#[error("image.catalog.{image}.{field}: {problem}")]
pub struct CatalogError {
    pub image: String,
    pub field: &'static str,
    pub problem: String,
}

impl CatalogEntry {
    /// The disk image as an [`Artifact`].
    pub fn disk(&self) -> Artifact {
        Artifact {
            url: self.url.clone(),
            sha256: self.sha256.clone(),
        }
    }
}

/// Whether `s` is a sha256 digest as the cache names files: 64 lowercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_url(image: &str, field: &'static str, url: &str) -> Result<(), CatalogError> {
    let scheme_ok = ["file:///", "http://", "https://"]
        .iter()
        .any(|p| url.starts_with(p));
    if !scheme_ok {
        return Err(CatalogError {
            image: image.to_owned(),
            field,
            problem: format!("{url:?} must start with file:///, http:// or https://"),
        });
    }
    Ok(())
}

fn check_digest(image: &str, field: &'static str, digest: &str) -> Result<(), CatalogError> {
    if !is_sha256_hex(digest) {
        return Err(CatalogError {
            image: image.to_owned(),
            field,
            problem: format!("{digest:?} is not a sha256 digest (64 lowercase hex characters)"),
        });
    }
    Ok(())
}

impl ImageConfig {
    /// The cache's watermarks in bytes; `None` without a cap.
    pub fn watermarks(&self) -> Option<Watermarks> {
        self.max_bytes
            .map(|max| Watermarks::of(max, self.high_watermark_percent, self.low_watermark_percent))
    }

    /// Checks the cache's limits and every catalog entry (URL schemes, digests), so a typo
    /// fails at start-up rather than at the first job.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limits = |key, problem: String| ConfigError::Limits { key, problem };
        if self.max_bytes == Some(0) {
            return Err(limits(
                "max_bytes",
                "must be greater than 0 (leave it out for no cap)".into(),
            ));
        }
        if self.high_watermark_percent == 0 || self.high_watermark_percent > 100 {
            return Err(limits(
                "high_watermark_percent",
                format!("{} must be between 1 and 100", self.high_watermark_percent),
            ));
        }
        if self.low_watermark_percent >= self.high_watermark_percent {
            return Err(limits(
                "low_watermark_percent",
                format!(
                    "{} must be below high_watermark_percent ({})",
                    self.low_watermark_percent, self.high_watermark_percent
                ),
            ));
        }
        for (name, e) in &self.catalog {
            check_url(name, "url", &e.url)?;
            check_digest(name, "sha256", &e.sha256)?;
            if let Some(k) = &e.kernel {
                check_url(name, "kernel.url", &k.url)?;
                check_digest(name, "kernel.sha256", &k.sha256)?;
            }
            if let Some(i) = &e.initrd {
                check_url(name, "initrd.url", &i.url)?;
                check_digest(name, "initrd.sha256", &i.sha256)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_are_checked_and_computed_from_the_cap() {
        let cfg = ImageConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.watermarks(), None);
        let cfg = ImageConfig {
            max_bytes: Some(1000),
            high_watermark_percent: 90,
            low_watermark_percent: 50,
            ..Default::default()
        };
        cfg.validate().unwrap();
        assert_eq!(
            cfg.watermarks(),
            Some(Watermarks {
                high: 900,
                low: 500
            })
        );
        let e = ImageConfig {
            low_watermark_percent: 95,
            ..cfg.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("image.low_watermark_percent") && e.contains("95"),
            "{e}"
        );
        let e = ImageConfig {
            high_watermark_percent: 101,
            ..cfg.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("image.high_watermark_percent"), "{e}");
        let e = ImageConfig {
            max_bytes: Some(0),
            ..cfg
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("image.max_bytes"), "{e}");
    }

    #[test]
    fn validation_names_the_image_and_field() {
        let mut cfg = ImageConfig::default();
        cfg.catalog.insert(
            "sl6".into(),
            CatalogEntry {
                url: "file:///x".into(),
                sha256: "a".repeat(64),
                format: DiskFormat::Raw,
                kernel: Some(Artifact {
                    url: "ftp://x".into(),
                    sha256: "b".repeat(64),
                }),
                initrd: None,
            },
        );
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("image.catalog.sl6.kernel.url"), "{e}");
        cfg.catalog.get_mut("sl6").unwrap().kernel = None;
        cfg.validate().unwrap();
        cfg.catalog.get_mut("sl6").unwrap().sha256 = "A".repeat(64);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("image.catalog.sl6.sha256"), "{e}");
    }
}
