//! Starting, stopping and tearing down the stack: [`Stack`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wnodes_testkit::NatsServer;

use crate::{
    options::{ImageServing, NetworkChoice, StackOptions},
    otlp_relay::OtlpRelay,
};

/// The services, in start order (the hypervisor services first, the bridge last).
pub const SERVICES: [&str; 7] = [
    "image",
    "scratch",
    "network",
    "gateway",
    "launcher",
    "accounting",
    "bridge",
];

/// The optional service [`StackOptions::usage_exporter`] adds (started last).
pub const USAGE_EXPORTER: &str = "usage";

/// The optional host agent [`StackOptions::host_agent`] adds (started last).
pub const HOST_AGENT: &str = "agent";

/// The bridge and address the tap mode creates in the private namespace.
pub const BRIDGE: &str = "wnbr0";
pub const BRIDGE_ADDR: &str = "10.231.1.1/24";
pub const POOL: &str = "10.231.1.0/24";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running stack. Dropping it stops every service (SIGTERM, then SIGKILL after 5 s), kills any
/// qemu whose command line names the work dir, and stops nats-server.
#[derive(Debug)]
pub struct Stack {
    pub(crate) opts: StackOptions,
    pub(crate) network: NetworkChoice,
    pub(crate) bin_dir: PathBuf,
    pub(crate) config_path: PathBuf,
    pub(crate) nats: NatsServer,
    pub(crate) http_ports: BTreeMap<&'static str, u16>,
    /// [`SERVICES`], then [`USAGE_EXPORTER`] when asked for.
    services: Vec<&'static str>,
    pub(crate) grpc_addr: SocketAddr,
    /// Each service's NATS credentials, and the job starter's (`agent`): authorization is on,
    /// provisioned as `wnodesctl provision` does it.
    pub(crate) creds: BTreeMap<&'static str, PathBuf>,
    children: BTreeMap<&'static str, Child>,
    image_server: Option<tokio::task::JoinHandle<()>>,
    /// Dropped after the services (fields drop after `Drop::drop`), so their last spans,
    /// flushed on SIGTERM, still get through.
    otlp_relay: Option<OtlpRelay>,
}

/// `n` distinct ports nobody listens on right now, picked at random in 21000–31999: below the
/// kernel's ephemeral range (32768–60999 by default), where other processes' port-0 binds land,
/// and above the gateway's default 20000–20999. A port the kernel hands out for port 0 (as this
/// used to take) can go to another process between our check and the service's own bind; one
/// out here can only collide with another stack's random pick.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    use std::hash::{BuildHasher, Hasher};
    let mut picked = Vec::with_capacity(n);
    let mut tries = 0;
    while picked.len() < n {
        tries += 1;
        anyhow::ensure!(
            tries <= 1000,
            "no free port in 21000-31999 after 1000 tries"
        );
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(tries);
        let port = 21_000 + u16::try_from(h.finish() % 11_000).unwrap_or(0);
        if !picked.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            picked.push(port);
        }
    }
    Ok(picked)
}

fn run_cmd(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A TOML basic string.
fn q(s: impl AsRef<str>) -> String {
    let mut out = String::from("\"");
    for c in s.as_ref().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn qp(p: &Path) -> String {
    q(p.display().to_string())
}

/// `sha256` of each guest artefact from the guest's `manifest.json`.
/// What the one config file needs besides the [`StackOptions`].
#[derive(Debug)]
pub struct ConfigInputs<'a> {
    pub network: NetworkChoice,
    pub nats_url: String,
    /// The directory of every identity's creds (`[nats] creds_dir`): each service and the job
    /// starter pick their own.
    pub creds_dir: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub otlp_endpoint: Option<String>,
    /// Where the catalog's image, kernel and initrd are fetched from (`file://` or `http://`).
    pub image_base: String,
    /// sha256 of `rootfs.ext4`, `vmlinux`, `initrd.img` (the guest's manifest).
    pub digests: &'a BTreeMap<String, String>,
    pub work: &'a Path,
    pub export: &'a Path,
}

/// The one TOML file every service of the stack reads (the demo's configuration).
pub fn render_config(opts: &StackOptions, c: &ConfigInputs<'_>) -> String {
    let (network, digests, work, export, image_base) =
        (c.network, c.digests, c.work, c.export, &c.image_base);
    let (otlp_endpoint, grpc_addr) = (&c.otlp_endpoint, c.grpc_addr);
    let p = &opts.policy;
    let mut cfg = String::new();
    let _ = writeln!(
        cfg,
        "# Written by wnodes-devstack: one file for every service."
    );
    let _ = writeln!(cfg, "site = {}", q(&opts.site));
    let _ = writeln!(cfg, "host = {}", q(&opts.host));
    let _ = writeln!(cfg, "log_level = {}", q(&opts.log_level));
    if let Some(e) = &otlp_endpoint {
        let _ = writeln!(cfg, "otlp_endpoint = {}", q(e));
    }
    let _ = writeln!(cfg, "\n[nats]\nurl = {}", q(&c.nats_url));
    if let Some(dir) = &c.creds_dir {
        let _ = writeln!(cfg, "creds_dir = {}", qp(dir));
    }
    let _ = writeln!(cfg, "\n[bridge]\ngrpc_addr = {}", q(grpc_addr.to_string()));
    if let Some(spool) = &opts.slurm_events {
        let _ = writeln!(
            cfg,
            "\n[bridge.slurm_queue]\nenabled = true\nevery = \"1s\"\n\n[[bridge.sources]]\n\
             lrms = \"slurm\"\npath = {}\nstart_at_end = true",
            qp(spool)
        );
    }
    // The host agent's socket (read only by `wnodes-agent`, run with `host_agent`).
    let _ = writeln!(cfg, "\n[agent]\nsocket = {}", qp(&work.join("agent.sock")));
    // What APEL messages need that a usage record does not say. The benchmark is a stand-in
    // (this machine was never benchmarked); a site sets its hosts' HS06 or HEPscore23 score.
    let _ = writeln!(
        cfg,
        "\n[accounting.apel]\nsubmit_host = \"wnodes-dev\"\n\
         infrastructure_description = \"WNODES-DEV\"\n\
         cloud_compute_service = \"wnodes-dev\"\n\
         benchmark = {{ kind = \"hepspec06\", per_core = 10.0 }}"
    );
    let _ = writeln!(
        cfg,
        "\n[launcher]\naccel = \"tcg\"\nprepare_deadline = \"120s\"\n\
         image_roots = [{}]\nscratch_roots = [{}]",
        qp(&work.join("state/image/cache")),
        qp(&work.join("state/scratch/volumes")),
    );
    if let Some(limit) = opts.output_limit_bytes {
        let _ = writeln!(cfg, "output_limit_bytes = {limit}");
    }
    // Each VM's qemu as a uid of its own needs root; without it qemu runs as the caller.
    let _ = writeln!(
        cfg,
        "\n[launcher.confinement]\nvm_users = {}",
        crate::netns::is_root()
    );
    let _ = writeln!(
        cfg,
        "\n[launcher.policy]\nvo_images = {{ {} }}\nnetwork_mode = {}\n\
         default_cores = {}\nmax_cores = {}\ndefault_memory_bytes = {}\nmax_memory_bytes = {}\n\
         default_scratch_bytes = {}\nmax_scratch_bytes = {}\ndefault_walltime = \"{}s\"",
        std::iter::once((opts.vo.as_str(), "demo"))
            .chain(
                opts.extra_images
                    .iter()
                    .map(|e| (e.vo.as_str(), e.name.as_str()))
            )
            .map(|(vo, image)| format!("{} = {}", q(vo), q(image)))
            .collect::<Vec<_>>()
            .join(", "),
        if network == NetworkChoice::Tap {
            "\"virtio_tap\""
        } else {
            "\"user\""
        },
        p.default_cores,
        p.max_cores,
        p.default_memory_bytes,
        p.max_memory_bytes,
        p.default_scratch_bytes,
        p.max_scratch_bytes,
        p.default_walltime_secs,
    );
    if opts.storage_export {
        let _ = writeln!(
            cfg,
            "\n[[launcher.policy.storage_exports]]\nname = \"shared\"\nhost_path = {}\nguest_path = \"/shared\"",
            qp(export)
        );
    }
    let _ = writeln!(
        cfg,
        "\n[image.catalog.demo]\nurl = {}\nsha256 = {}\nformat = \"raw\"\n\
         kernel = {{ url = {}, sha256 = {} }}\ninitrd = {{ url = {}, sha256 = {} }}",
        q(format!("{image_base}/rootfs.ext4")),
        q(&digests["rootfs.ext4"]),
        q(format!("{image_base}/vmlinux")),
        q(&digests["vmlinux"]),
        q(format!("{image_base}/initrd.img")),
        q(&digests["initrd.img"]),
    );
    for extra in &opts.extra_images {
        let _ = writeln!(
            cfg,
            "\n[image.catalog.{}]\nurl = {}\nsha256 = {}\nformat = \"raw\"\n\
             kernel = {{ url = {}, sha256 = {} }}\ninitrd = {{ url = {}, sha256 = {} }}",
            q(&extra.name),
            q(extra
                .rootfs_url
                .clone()
                .unwrap_or_else(|| format!("{image_base}/rootfs.ext4"))),
            q(extra
                .rootfs_sha256
                .as_deref()
                .unwrap_or(&digests["rootfs.ext4"])),
            q(format!("{image_base}/vmlinux")),
            q(&digests["vmlinux"]),
            q(format!("{image_base}/initrd.img")),
            q(&digests["initrd.img"]),
        );
    }
    let _ = writeln!(
        cfg,
        "\n[scratch]\ndir = {}\nmax_bytes = {}\ndefault_bytes = {}",
        qp(&work.join("state/scratch/volumes")),
        p.max_scratch_bytes,
        p.default_scratch_bytes.max(1),
    );
    let _ = writeln!(
        cfg,
        "\n[network]\nmode = {}\nbridge = {}\npool = {}",
        if network == NetworkChoice::Tap {
            "\"tap\""
        } else {
            "\"user\""
        },
        q(BRIDGE),
        q(POOL)
    );
    let _ = writeln!(
        cfg,
        "\n[gateway]\nport_range = \"{}-{}\"\nexport_roots = [{}]",
        opts.gateway_ports.0,
        opts.gateway_ports.1,
        qp(export)
    );
    cfg
}

fn guest_digests(guest: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = guest.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (build the test guest: guest/build.sh)",
            path.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut out = BTreeMap::new();
    for f in ["vmlinux", "initrd.img", "rootfs.ext4"] {
        let d = v["sha256"][f]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{}: no sha256.{f}", path.display()))?;
        anyhow::ensure!(
            guest.join(f).is_file(),
            "{} missing (guest/build.sh)",
            guest.join(f).display()
        );
        out.insert(f.to_owned(), d.to_owned());
    }
    Ok(out)
}

/// Serves the files of `dir` over HTTP/1.0 GET on `127.0.0.1:<port>` (image fetch tests),
/// waiting `delay` before each answer.
async fn serve_dir(
    dir: PathBuf,
    delay: Duration,
) -> anyhow::Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let dir = dir.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let name = path.trim_start_matches('/');
                let file = (!name.contains('/') && !name.is_empty()).then(|| dir.join(name));
                tokio::time::sleep(delay).await;
                match file.map(std::fs::read) {
                    Some(Ok(body)) => {
                        let h = format!(
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(h.as_bytes()).await;
                        let _ = sock.write_all(&body).await;
                    }
                    _ => {
                        let _ = sock
                            .write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                            .await;
                    }
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((port, task))
}

/// GET `/readyz` on 127.0.0.1:`port`; true on 200.
async fn ready(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    let head = String::from_utf8_lossy(&buf);
    head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")
}

/// The last `n` lines of a file (for error messages).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SIGTERM, wait up to `grace`, SIGKILL; reaps.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Stack {
    /// Starts the stack described by `opts`: checks the binaries and the guest, (tap mode)
    /// creates bridge `wnbr0` 10.231.1.1/24 in the current network namespace, (with
    /// [`StackOptions::otlp_netns`]) starts the [`OtlpRelay`] to the OTLP endpoint, writes
    /// `<work_dir>/wnodes.toml`, starts nats-server and the seven services (and the usage exporter
    /// with [`StackOptions::usage_exporter`]) and waits until each answers `/readyz` with 200.
    pub async fn start(opts: StackOptions) -> anyhow::Result<Self> {
        let network = opts.network.resolve();
        let bin_dir = opts.resolve_bin_dir()?;
        let digests = guest_digests(&opts.guest_dir)?;
        let work = &opts.work_dir;
        for d in ["logs", "state", "export"] {
            std::fs::create_dir_all(work.join(d))
                .with_context(|| format!("creating {}", work.join(d).display()))?;
        }
        let work = std::fs::canonicalize(work)?;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755))?;
        let export = work.join("export");
        std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o755))?;
        if crate::netns::is_root() {
            std::os::unix::fs::chown(&export, Some(opts.job_uid), Some(opts.job_gid))
                .with_context(|| format!("chown {}", export.display()))?;
        }
        let mut opts = opts;
        opts.work_dir = work.clone();

        if network == NetworkChoice::Tap {
            let exists = Command::new("ip")
                .args(["link", "show", BRIDGE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !exists {
                run_cmd(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
                run_cmd(&["ip", "addr", "add", BRIDGE_ADDR, "dev", BRIDGE])?;
            }
            run_cmd(&["ip", "link", "set", BRIDGE, "up"])?;
            open_tun_device()?;
        }

        let (image_base, image_server) = match opts.image_serving {
            ImageServing::File => {
                let g = std::fs::canonicalize(&opts.guest_dir)?;
                (format!("file://{}", g.display()), None)
            }
            ImageServing::Http => {
                let (port, task) = serve_dir(opts.guest_dir.clone(), opts.image_http_delay).await?;
                (format!("http://127.0.0.1:{port}"), Some(task))
            }
        };

        let otlp_relay = match (&opts.otlp_endpoint, &opts.otlp_netns) {
            (Some(endpoint), Some(netns)) => Some(OtlpRelay::start(endpoint, netns.clone())?),
            _ => None,
        };
        let otlp_endpoint = match &otlp_relay {
            Some(relay) => Some(relay.endpoint()),
            None => opts.otlp_endpoint.clone(),
        };

        let nats = NatsServer::start()
            .await
            .context("starting nats-server (scripts/install-deps.sh nats)")?;
        let mut services = SERVICES.to_vec();
        if opts.usage_exporter {
            services.push(USAGE_EXPORTER);
        }
        if opts.host_agent {
            services.push(HOST_AGENT);
        }
        let mut ports = free_ports(services.len() + 1)?;
        let grpc_addr: SocketAddr = format!("127.0.0.1:{}", ports.remove(0)).parse()?;
        let http_ports: BTreeMap<_, _> = services.iter().copied().zip(ports).collect();

        let cfg = render_config(
            &opts,
            &ConfigInputs {
                network,
                nats_url: nats.url(),
                creds_dir: nats.site().map(|s| s.dir().join("creds")),
                grpc_addr,
                otlp_endpoint: otlp_endpoint.clone(),
                image_base: image_base.clone(),
                digests: &digests,
                work: &work,
                export: &export,
            },
        );
        let config_path = work.join("wnodes.toml");
        std::fs::write(&config_path, cfg)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let mut creds = BTreeMap::new();
        // The optional roles are not part of the stack, unless the usage exporter is asked for.
        for role in wnodes_bus::roles::ALL
            .into_iter()
            .filter(|r| !r.optional || (opts.usage_exporter && r.name == USAGE_EXPORTER))
        {
            let c = nats
                .identity(role, &opts.host)
                .await
                .with_context(|| format!("provisioning {}'s identity", role.name))?;
            if let Some(path) = c.creds_file {
                creds.insert(role.name, path);
            }
        }

        let mut stack = Self {
            opts,
            network,
            bin_dir,
            config_path,
            nats,
            http_ports,
            services,
            grpc_addr,
            creds,
            children: BTreeMap::new(),
            image_server,
            otlp_relay,
        };
        for s in stack.services.clone() {
            stack.start_service(s).await?;
        }
        Ok(stack)
    }

    /// The options the stack runs with (`work_dir` canonicalised).
    pub fn options(&self) -> &StackOptions {
        &self.opts
    }

    /// Tap or user (never `Auto`).
    pub fn network(&self) -> NetworkChoice {
        self.network
    }

    /// The OTLP endpoint the services export to: [`StackOptions::otlp_endpoint`], or the
    /// relay's `http://127.0.0.1:<port>` when [`StackOptions::otlp_netns`] is set.
    pub fn otlp_endpoint(&self) -> Option<String> {
        match &self.otlp_relay {
            Some(relay) => Some(relay.endpoint()),
            None => self.opts.otlp_endpoint.clone(),
        }
    }

    /// The config file every service reads.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// The services this stack runs: [`SERVICES`], and [`USAGE_EXPORTER`] with
    /// [`StackOptions::usage_exporter`].
    pub fn services(&self) -> &[&'static str] {
        &self.services
    }

    /// `127.0.0.1:<port>`: where `service` serves `/metrics`, `/readyz` and `/healthz`.
    pub fn http_addr(&self, service: &str) -> Option<SocketAddr> {
        self.http_ports
            .get(service)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
    }

    /// The host agent's socket, `<work_dir>/agent.sock` (served with
    /// [`StackOptions::host_agent`]).
    pub fn agent_socket(&self) -> PathBuf {
        self.opts.work_dir.join("agent.sock")
    }

    /// The bridge's gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// `<work_dir>/export`, mounted on `/shared` in every VM.
    pub fn export_dir(&self) -> PathBuf {
        self.opts.work_dir.join("export")
    }

    /// `<work_dir>/state/<service>`.
    pub fn state_dir(&self, service: &str) -> PathBuf {
        self.opts.work_dir.join("state").join(service)
    }

    /// `<work_dir>/logs/<service>.log` (stdout and stderr of the service).
    pub fn log_path(&self, service: &str) -> PathBuf {
        self.opts
            .work_dir
            .join("logs")
            .join(format!("{service}.log"))
    }

    /// `wnodes-<service>` in the binaries' directory.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(format!("wnodes-{name}"))
    }

    /// A command for `wnodes-<name>` with the stack's config file and `service`'s state dir
    /// and HTTP address in its environment.
    pub(crate) fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin(name));
        c.env("WNODES_CONFIG", &self.config_path)
            .env("WNODES_STATE_DIR", self.state_dir(name))
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null());
        if let Some(port) = self.http_ports.get(name) {
            c.env("WNODES_HTTP_ADDR", format!("127.0.0.1:{port}"));
        }
        c
    }

    /// The operator's NATS connection settings (reads everything).
    pub fn nats_admin(&self) -> wnodes_bus::NatsConfig {
        self.nats.admin()
    }

    /// The monitor's NATS connection settings (`wnodesctl backlog`).
    pub fn nats_monitor(&self) -> wnodes_bus::NatsConfig {
        self.nats.monitor()
    }

    /// The creds file of `role` (a service's name, or `agent` for the job starter).
    pub fn creds(&self, role: &str) -> Option<&Path> {
        self.creds.get(role).map(PathBuf::as_path)
    }

    /// The pid of nats-server (as root, `/proc/<pid>/ns/net` is the stack's network namespace).
    pub fn nats_pid(&self) -> Option<u32> {
        self.nats.pid()
    }

    /// Stops every service (SIGTERM, then SIGKILL after 10 s each), leaving nats-server up.
    pub fn stop_services(&mut self) {
        for name in self.services.clone() {
            let _ = self.stop_service(name);
        }
    }

    fn service_name(&self, name: &str) -> anyhow::Result<&'static str> {
        self.services
            .iter()
            .copied()
            .find(|s| *s == name)
            .ok_or_else(|| anyhow::anyhow!("unknown service {name:?} (one of {:?})", self.services))
    }

    /// Starts (or restarts) one service and waits for `/readyz` = 200. Its output is appended
    /// to [`Stack::log_path`].
    pub async fn start_service(&mut self, name: &str) -> anyhow::Result<()> {
        let name = self.service_name(name)?;
        if let Some(mut old) = self.children.remove(name) {
            stop_child(&mut old, Duration::from_secs(10));
        }
        std::fs::create_dir_all(self.state_dir(name))?;
        let log_path = self.log_path(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = self.command(name);
        if matches!(name, "bridge" | "accounting" | USAGE_EXPORTER) {
            cmd.arg("serve");
        }
        let mut child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin(name).display()))?;
        let port = self.http_ports[name];
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "wnodes-{name} exited with {status} during start-up; {}:\n{}",
                    log_path.display(),
                    tail(&log_path, 30)
                );
            }
            if ready(port).await {
                break;
            }
            if start.elapsed() > READY_TIMEOUT {
                stop_child(&mut child, Duration::from_secs(2));
                anyhow::bail!(
                    "wnodes-{name} not ready within {READY_TIMEOUT:?}; {}:\n{}",
                    log_path.display(),
                    tail(&log_path, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.children.insert(name, child);
        Ok(())
    }

    /// SIGTERM (a clean drain), SIGKILL after 10 s; the service stays down.
    pub fn stop_service(&mut self, name: &str) -> anyhow::Result<()> {
        let name = self.service_name(name)?;
        if let Some(mut c) = self.children.remove(name) {
            stop_child(&mut c, Duration::from_secs(10));
        }
        Ok(())
    }

    /// SIGKILL (a crash); the service stays down.
    pub fn kill_service(&mut self, name: &str) -> anyhow::Result<()> {
        let name = self.service_name(name)?;
        if let Some(mut c) = self.children.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// The pid of a running service.
    pub fn service_pid(&self, name: &str) -> Option<u32> {
        self.children.get(name).map(Child::id)
    }

    /// SIGKILLs every qemu whose command line mentions the work dir (cleanup after a failure).
    pub fn kill_qemus(&self) {
        for pid in crate::leftovers::qemu_pids(&self.opts.work_dir) {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let names: Vec<&'static str> = self.children.keys().copied().collect();
        for name in &names {
            if let Some(c) = self.children.get(name)
                && let Ok(pid) = i32::try_from(c.id())
            {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for name in names {
            if let Some(mut c) = self.children.remove(name) {
                loop {
                    if !matches!(c.try_wait(), Ok(None)) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        self.kill_qemus();
        if let Some(t) = self.image_server.take() {
            t.abort();
        }
    }
}

/// Each VM's qemu runs as a uid of its own and opens `/dev/net/tun` itself (the tap it then
/// attaches is that uid's): the device must be open to everyone, mode 0666, as udev's default
/// rule makes it on a standard host (`KERNEL=="tun", MODE="0666"`). Hosts without udev (this
/// project's machines) have it 0600: the stack sets 0666, as udev would, and says so.
fn open_tun_device() -> anyhow::Result<()> {
    let tun = std::path::Path::new("/dev/net/tun");
    let mode = std::fs::metadata(tun)
        .with_context(|| format!("inspecting {}", tun.display()))?
        .permissions()
        .mode();
    if mode & 0o666 != 0o666 {
        std::fs::set_permissions(tun, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("chmod 0666 {}", tun.display()))?;
        eprintln!(
            "wnodes-dev: {} was mode {:o}; set to 0666 as udev's default rule does (each VM's qemu runs as its own uid and opens it)",
            tun.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(q("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(q("x\ny"), r#""x\u000Ay""#);
        let v: BTreeMap<String, String> =
            serde_json::from_str(r#"{"k": "a\"b\\c\ny"}"#).unwrap_or_default();
        assert_eq!(q(&v["k"]), r#""a\"b\\c\u000Ay""#);
    }
}
