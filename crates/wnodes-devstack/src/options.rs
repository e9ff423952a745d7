//! What stack to start: [`StackOptions`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::netns::HostNetns;

/// How VMs are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkChoice {
    /// A tap per VM on bridge `wnbr0` (10.231.1.1/24) with the nftables filter; the caller must
    /// already be in a private network namespace ([`crate::enter_private_netns`]). Needs root.
    Tap,
    /// qemu user-mode networking (no root, no per-VM filter).
    User,
    /// [`NetworkChoice::Tap`] when running as root, else [`NetworkChoice::User`].
    Auto,
}

impl NetworkChoice {
    /// Resolves `Auto` (euid 0 → tap).
    pub fn resolve(self) -> NetworkChoice {
        match self {
            Self::Auto if crate::netns::is_root() => Self::Tap,
            Self::Auto => Self::User,
            other => other,
        }
    }
}

/// How the image service fetches the guest artefacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageServing {
    /// `file:///…/.cache/guest/rootfs.ext4` (default).
    File,
    /// `http://127.0.0.1:<port>/…` from a loopback HTTP server inside this process.
    Http,
}

/// A second catalog image: the test guest's artefacts under another name, for VO `vo`, with
/// the rootfs digest replaced by `rootfs_sha256` and its URL by `rootfs_url` when set (a wrong
/// digest or a URL with nothing behind it makes the image service answer `image.failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraImage {
    /// Catalog name.
    pub name: String,
    /// The VO the launcher maps to it.
    pub vo: String,
    /// 64 lowercase hex digits; `None` = the guest's real digest.
    pub rootfs_sha256: Option<String>,
    /// `None` = the guest's rootfs, served as [`StackOptions::image_serving`] says.
    pub rootfs_url: Option<String>,
}

/// The site policy maxima (and defaults) the launcher enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    pub default_cores: u32,
    pub max_cores: u32,
    /// bytes
    pub default_memory_bytes: u64,
    /// bytes
    pub max_memory_bytes: u64,
    /// bytes
    pub default_scratch_bytes: u64,
    /// bytes
    pub max_scratch_bytes: u64,
    /// seconds
    pub default_walltime_secs: u64,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        const MIB: u64 = 1 << 20;
        Self {
            default_cores: 1,
            max_cores: 2,
            default_memory_bytes: 256 * MIB,
            max_memory_bytes: 1024 * MIB,
            default_scratch_bytes: 64 * MIB,
            max_scratch_bytes: 1024 * MIB,
            default_walltime_secs: 600,
        }
    }
}

/// Everything [`crate::Stack::start`] needs.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Config, logs, state, export; created if missing. Must be traversable by the job uid
    /// (the export lives under it): `Stack::start` makes it mode 0755.
    pub work_dir: PathBuf,
    pub network: NetworkChoice,
    /// OTLP/gRPC endpoint every service exports spans to, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
    /// The network namespace `otlp_endpoint` is reached from, when it is not the stack's own:
    /// the host's, as returned by [`crate::enter_private_netns`]. Then the stack relays the
    /// services' OTLP connections there ([`crate::OtlpRelay`]) and the endpoint must be
    /// `http://HOST:PORT`. `None` (default): the services connect to `otlp_endpoint` directly.
    pub otlp_netns: Option<Arc<HostNetns>>,
    /// Where the `wnodes-*` binaries are; default [`default_bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// The built test guest (`vmlinux`, `initrd.img`, `rootfs.ext4`, `manifest.json`); default
    /// `<workspace>/.cache/guest`.
    pub guest_dir: PathBuf,
    /// The VO whose image is the guest (catalog name `demo`).
    pub vo: String,
    /// uid the job runs as (and owns the export). 65534 (`nobody`): `sftp-server` needs a
    /// passwd entry for it.
    pub job_uid: u32,
    pub job_gid: u32,
    /// The job user's name (`nobody`).
    pub job_user: String,
    pub image_serving: ImageServing,
    /// With [`ImageServing::Http`]: how long the loopback server waits before answering each
    /// request (a slow image preparation). Default zero.
    pub image_http_delay: std::time::Duration,
    /// More catalog images and the VOs mapped to them (default none).
    pub extra_images: Vec<ExtraImage>,
    pub policy: PolicyLimits,
    /// Ports the gateway hands to VMs, `"first-last"`.
    pub gateway_ports: (u16, u16),
    /// `log_level` of every service.
    pub log_level: String,
    /// Site name (run keys, accounting).
    pub site: String,
    /// This hypervisor's host name in events.
    pub host: String,
    /// Configure the storage export (`<work_dir>/export` on `/shared`, served by the gateway
    /// over sshfs). Default `true`. `false` writes no `[[launcher.policy.storage_exports]]`:
    /// VMs then get no export, the gateway answers `storage.ready` with port 0 and the guest
    /// mounts nothing (the vm-start benchmark uses this so both of its sides boot the same
    /// guest work).
    pub storage_export: bool,
    /// Also run the usage exporter (`wnodes-usage serve`, the optional `usage` role: its
    /// identity and durable provisioned) after the seven services. Default `false`.
    pub usage_exporter: bool,
    /// Also run the host agent (`wnodes-agent`, socket `<work_dir>/agent.sock`, mode 0666) that
    /// LRMS job starters (`wnodes-bridge job-starter`) talk to; jobs then need no NATS
    /// credentials. It takes Slurm jobs (`SLURM_CONF` from this process's environment).
    /// Default `false`.
    pub host_agent: bool,
    /// `[launcher] output_limit_bytes` (the serial output a VM may leave on the host); `None`
    /// keeps the launcher's default (64 MiB).
    pub output_limit_bytes: Option<u64>,
    /// Slurm's own events into this stack: the bridge follows this jobcomp spool file (written
    /// by `slurm/wnodes-slurm-jobcomp`, see [`crate::slurm::jobcomp_spool`]) from its end and
    /// polls `squeue` for pending jobs every second. `None` (default): neither.
    pub slurm_events: Option<PathBuf>,
}

/// The workspace root this crate was built in.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl StackOptions {
    /// Defaults: network `Auto`, guest from `<workspace>/.cache/guest`, VO `demo`, job
    /// 65534/65534, image over `file://`, [`PolicyLimits::default`], the storage export on.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
            network: NetworkChoice::Auto,
            otlp_endpoint: None,
            otlp_netns: None,
            bin_dir: None,
            guest_dir: workspace_root().join(".cache/guest"),
            vo: "demo".into(),
            job_uid: 65534,
            job_gid: 65534,
            job_user: "nobody".into(),
            image_serving: ImageServing::File,
            image_http_delay: std::time::Duration::ZERO,
            extra_images: Vec::new(),
            policy: PolicyLimits::default(),
            gateway_ports: (20000, 20999),
            log_level: "info".into(),
            site: "WNODES-DEV".into(),
            host: "hv1.wnodes.dev".into(),
            storage_export: true,
            usage_exporter: false,
            host_agent: false,
            output_limit_bytes: None,
            slurm_events: None,
        }
    }

    /// The binaries' directory: `bin_dir`, else [`default_bin_dir`].
    pub fn resolve_bin_dir(&self) -> anyhow::Result<PathBuf> {
        match &self.bin_dir {
            Some(d) => {
                check_bins(d)?;
                Ok(d.clone())
            }
            None => default_bin_dir(),
        }
    }
}

const NEEDED_BINS: [&str; 8] = [
    "wnodes-bridge",
    "wnodes-agent",
    "wnodes-launcher",
    "wnodes-image",
    "wnodes-scratch",
    "wnodes-network",
    "wnodes-gateway",
    "wnodes-accounting",
];

fn check_bins(dir: &Path) -> anyhow::Result<()> {
    let missing: Vec<_> = NEEDED_BINS
        .iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{missing:?} not found in {} (run `cargo build --workspace --bins`)",
        dir.display()
    );
    Ok(())
}

/// The directory next to the current executable (`target/<profile>/`), or its parent when the
/// executable is a test binary in `target/<profile>/deps/`. Errors (naming
/// `cargo build --workspace --bins`) when the `wnodes-*` binaries are not there.
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no parent", exe.display()))?;
    let candidates = [here.to_path_buf(), here.join("..")];
    for c in &candidates {
        if check_bins(c).is_ok() {
            return Ok(c.clone());
        }
    }
    anyhow::bail!(
        "the wnodes-* service binaries are not next to {} (looked in {} and {}): run `cargo build --workspace --bins`",
        exe.display(),
        candidates[0].display(),
        candidates[1].display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bin_dir_without_the_binaries_names_the_build_command() {
        let mut o = StackOptions::new("/nonexistent");
        o.bin_dir = Some(PathBuf::from("/nonexistent/bin"));
        let e = format!(
            "{:#}",
            o.resolve_bin_dir()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
        assert!(e.contains("cargo build --workspace --bins"), "{e}");
        assert!(e.contains("wnodes-launcher"), "{e}");
        assert_eq!(NetworkChoice::User.resolve(), NetworkChoice::User);
        assert_eq!(NetworkChoice::Tap.resolve(), NetworkChoice::Tap);
        let auto = NetworkChoice::Auto.resolve();
        assert_eq!(auto == NetworkChoice::Tap, crate::netns::is_root());
    }
}
