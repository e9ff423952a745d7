//! A private `nats-server` (with JetStream) per test.
//!
//! The server picks its own port (`-p -1`) and reports it through `--ports_file_dir`; we read the
//! ports file named after *our* child's pid, so a test can never silently talk to some other
//! nats-server that happens to listen on a well-known port (there is no bind-then-release race
//! either). Everything the server writes (JetStream store, log, ports file, config) lives in one
//! temp dir that is removed on drop.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;

/// How long start-up (ports file + accepting connections) may take.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NatsServer::restart`] keeps retrying when the old port is still busy.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Oldest server accepted (async-nats 0.51 enables the 2.10+ JetStream APIs).
const MIN_VERSION: (u32, u32) = (2, 10);
/// How many log lines an error message carries.
const LOG_TAIL_LINES: usize = 30;

/// A `nats-server` child process with JetStream enabled, listening on `127.0.0.1`.
///
/// Dropping it SIGKILLs and reaps the process and removes its temp dir (store included).
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    /// Holds the store, log, config and ports files; removed on drop.
    dir: tempfile::TempDir,
    store_dir: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    conf_path: Option<PathBuf>,
    port: u16,
    child: Option<Child>,
    /// The provisioned site when authorization is on ([`NatsServer::start`]).
    site: Option<crate::site::TestSite>,
}

impl NatsServer {
    /// nats-server with JetStream (`-js`), store in its own temp dir, listening on 127.0.0.1 on a
    /// port the server picks itself (`-p -1`) and reports through `--ports_file_dir`, with
    /// authorization on: a [`TestSite`](crate::site::TestSite) provisioned as `wnodesctl
    /// provision` does it, streams made. Connect with [`Self::admin`] or [`Self::identity`].
    pub async fn start() -> anyhow::Result<Self> {
        let (site, conf) = crate::site::TestSite::new()?;
        let mut server = Self::start_inner(Some(&conf)).await?;
        site.provision_streams(&server.url()).await?;
        server.site = Some(site);
        Ok(server)
    }

    /// Without authorization and without streams: for tests of the server, the client or an
    /// auth method itself.
    pub async fn start_open() -> anyhow::Result<Self> {
        Self::start_inner(None).await
    }

    /// The operator's connection settings (everything allowed); on an open server, the URL.
    pub fn admin(&self) -> wnodes_bus::NatsConfig {
        match &self.site {
            Some(site) => site.admin(&self.url()),
            None => self.open_config(),
        }
    }

    /// The monitor's connection settings (reads stream and consumer state).
    pub fn monitor(&self) -> wnodes_bus::NatsConfig {
        match &self.site {
            Some(site) => site.monitor(&self.url()),
            None => self.open_config(),
        }
    }

    /// `role`'s connection settings on `host`, its durable provisioned with the default
    /// consumer tuning.
    pub async fn identity(
        &self,
        role: &'static wnodes_bus::Role,
        host: &str,
    ) -> anyhow::Result<wnodes_bus::NatsConfig> {
        self.identity_tuned(role, host, &wnodes_bus::ConsumerTuning::default())
            .await
    }

    /// [`Self::identity`] with the durable made for `tuning` (the service's `[consumer]`).
    pub async fn identity_tuned(
        &self,
        role: &'static wnodes_bus::Role,
        host: &str,
        tuning: &wnodes_bus::ConsumerTuning,
    ) -> anyhow::Result<wnodes_bus::NatsConfig> {
        match &self.site {
            Some(site) => site.identity(&self.url(), role, host, tuning).await,
            None => Ok(self.open_config()),
        }
    }

    /// `role`'s connection settings on `host` without provisioning its durable (roles that
    /// have none: the job starter, the bridge).
    pub fn creds(
        &self,
        role: &'static wnodes_bus::Role,
        host: &str,
    ) -> anyhow::Result<wnodes_bus::NatsConfig> {
        match &self.site {
            Some(site) => site.creds(&self.url(), role, host),
            None => Ok(self.open_config()),
        }
    }

    /// Makes (or updates) a durable of the events stream that no role of the site owns (the
    /// system tests' `bus-node`, benchmarks), as the admin.
    pub async fn provision_durable(
        &self,
        durable: &str,
        filters: Vec<String>,
        tuning: &wnodes_bus::ConsumerTuning,
    ) -> anyhow::Result<()> {
        let client = wnodes_bus::connect::connect(&self.admin(), "testkit-admin", None, None)
            .await
            .context("connecting as admin")?;
        let expected = wnodes_bus::layout::durable_consumer(durable, filters, tuning, 0);
        wnodes_site::streams::provision_durable(
            &async_nats::jetstream::new(client),
            expected,
            wnodes_site::Mode::Apply,
        )
        .await
        .with_context(|| format!("provisioning durable {durable}"))?;
        Ok(())
    }

    /// The test site, when authorization is on.
    pub fn site(&self) -> Option<&crate::site::TestSite> {
        self.site.as_ref()
    }

    fn open_config(&self) -> wnodes_bus::NatsConfig {
        wnodes_bus::NatsConfig {
            url: self.url(),
            ..Default::default()
        }
    }

    /// Same as [`NatsServer::start`], with extra nats-server config text (`tls {...}`,
    /// `authorization {...}`, `operator`/`resolver` ...) written to a config file passed with `-c`.
    ///
    /// The command-line flags (`-a`, `-p`, `-js`, `-sd`) override the config file, so the
    /// JetStream store is always the temp dir.
    pub async fn start_with_config(extra_conf: &str) -> anyhow::Result<Self> {
        Self::start_inner(Some(extra_conf)).await
    }

    async fn start_inner(extra_conf: Option<&str>) -> anyhow::Result<Self> {
        let bin = nats_server_bin().await?;
        let dir = tempfile::Builder::new()
            .prefix("wnodes-nats-")
            .tempdir()
            .context("creating the nats-server temp dir")?;
        let store_dir = dir.path().join("jetstream");
        std::fs::create_dir_all(&store_dir)
            .with_context(|| format!("creating {}", store_dir.display()))?;
        let conf_path = match extra_conf {
            Some(conf) => {
                let path = dir.path().join("nats.conf");
                std::fs::write(&path, conf)
                    .with_context(|| format!("writing {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let mut server = NatsServer {
            bin,
            log_path: dir.path().join("nats.log"),
            stderr_path: dir.path().join("stderr.log"),
            dir,
            store_dir,
            conf_path,
            port: 0,
            child: None,
            site: None,
        };
        let (child, port) = server.spawn_and_wait(None).await?;
        server.child = Some(child);
        server.port = port;
        tracing::debug!(port, "nats-server started");
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port the server chose at first start (kept across [`NatsServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`); survives [`NatsServer::kill`].
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server log (`-l`); appended to across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The pid of the running server process, `None` after [`NatsServer::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kill (SIGKILL) and reap the server; the store stays. A no-op when it is not running.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || kill_and_reap(child))
            .await
            .context("joining the nats-server reaper task")?
    }

    /// Start again on the same port with the same store and config, retrying the bind for a few
    /// seconds if the port is briefly busy; returns once the server accepts connections.
    /// Kills the running server first if there is one.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        let port = self.port;
        let deadline = tokio::time::Instant::now() + REBIND_TIMEOUT;
        loop {
            let log_offset = file_len(&self.log_path);
            let stderr_offset = file_len(&self.stderr_path);
            match self.spawn_and_wait(Some(port)).await {
                Ok((child, got)) => {
                    if got != port {
                        let _ = kill_and_reap(child);
                        bail!("restarted nats-server reports port {got}, expected {port}");
                    }
                    self.child = Some(child);
                    tracing::debug!(port, "nats-server restarted");
                    return Ok(());
                }
                Err(err) => {
                    let new_output = format!(
                        "{}{}",
                        read_from(&self.log_path, log_offset),
                        read_from(&self.stderr_path, stderr_offset)
                    );
                    let busy = new_output.contains("address already in use");
                    if !busy || tokio::time::Instant::now() >= deadline {
                        return Err(err.context(format!("restarting nats-server on port {port}")));
                    }
                    tracing::debug!(port, "port still busy; retrying nats-server restart");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn command(&self, port: Option<u16>) -> anyhow::Result<Command> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .with_context(|| format!("opening {}", self.stderr_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.map_or_else(|| "-1".to_owned(), |p| p.to_string()))
            .arg("-js")
            .arg("-sd")
            .arg(&self.store_dir)
            .arg("--ports_file_dir")
            .arg(self.dir.path())
            .arg("-l")
            .arg(&self.log_path);
        if let Some(conf) = &self.conf_path {
            cmd.arg("-c").arg(conf);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        Ok(cmd)
    }

    /// Spawn the server and wait until its own ports file names a port that accepts connections.
    /// On failure the child is killed and reaped, and the error carries the log tail.
    async fn spawn_and_wait(&self, port: Option<u16>) -> anyhow::Result<(Child, u16)> {
        let mut child = self
            .command(port)?
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        match self.wait_ready(&mut child).await {
            Ok(port) => Ok((child, port)),
            Err(err) => {
                let _ = kill_and_reap(child);
                Err(anyhow!(
                    "nats-server ({}) did not become ready: {err:#}\n--- log tail ({}) ---\n{}\n--- stderr tail ---\n{}",
                    self.bin.display(),
                    self.log_path.display(),
                    tail(&self.log_path, LOG_TAIL_LINES),
                    tail(&self.stderr_path, LOG_TAIL_LINES),
                ))
            }
        }
    }

    async fn wait_ready(&self, child: &mut Child) -> anyhow::Result<u16> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let ports_file = self
            .dir
            .path()
            .join(format!("nats-server_{}.ports", child.id()));
        let mut port = None;
        loop {
            if let Some(status) = child.try_wait().context("polling nats-server")? {
                bail!("nats-server exited during start-up with {status}");
            }
            if port.is_none() {
                port = read_ports_file(&ports_file);
            }
            if let Some(port) = port
                && probe(port).await.is_ok()
            {
                // Still ours? (The port came from our pid's ports file; make sure that pid did
                // not die in between and leave the port to someone else.)
                if let Some(status) = child.try_wait().context("polling nats-server")? {
                    bail!("nats-server exited during start-up with {status}");
                }
                return Ok(port);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {START_TIMEOUT:?} (ports file {}: {})",
                    ports_file.display(),
                    match port {
                        Some(p) => format!("port {p}, but no connection/INFO"),
                        None => "not written".to_owned(),
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = kill_and_reap(child);
        }
    }
}

fn kill_and_reap(mut child: Child) -> anyhow::Result<()> {
    // kill() fails only when the child was already reaped; wait() reaps it either way.
    let _ = child.kill();
    child.wait().context("reaping nats-server")?;
    Ok(())
}

/// `{"nats":["nats://127.0.0.1:43587"]}` → 43587. `None` while missing or half-written.
fn read_ports_file(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// Connect and read the server's `INFO` line; its `port` must be the one we expect.
async fn probe(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.contains(&b'\n') && buf.len() < 64 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(1), read).await {
        Ok(res) => res?,
        // A server configured with `tls { handshake_first: true }` sends nothing until the TLS
        // handshake; the port from our own pid's ports file accepting a connection is enough.
        Err(_) if buf.is_empty() => return Ok(()),
        Err(_) => bail!("incomplete INFO line from 127.0.0.1:{port}"),
    }
    let line = String::from_utf8_lossy(&buf);
    let json = line
        .strip_prefix("INFO ")
        .ok_or_else(|| anyhow!("127.0.0.1:{port} did not greet with INFO: {line:?}"))?;
    let info: serde_json::Value =
        serde_json::from_str(json.trim()).context("parsing the INFO line")?;
    match info.get("port").and_then(serde_json::Value::as_u64) {
        Some(p) if p == u64::from(port) => Ok(()),
        other => bail!("INFO from 127.0.0.1:{port} reports port {other:?}"),
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => "<none written>".to_owned(),
        Err(err) => format!("<{err}>"),
    }
}

static NATS_SERVER_BIN: OnceCell<PathBuf> = OnceCell::const_new();

/// The `nats-server` binary to run: `$NATS_SERVER_BIN`, then `<workspace>/.tools/bin/nats-server`,
/// then `nats-server` on `PATH`; its `--version` must be at least 2.10. Cached per process.
pub async fn nats_server_bin() -> anyhow::Result<PathBuf> {
    NATS_SERVER_BIN
        .get_or_try_init(|| async {
            let bin = find_nats_server()?;
            check_version(&bin).await?;
            Ok(bin)
        })
        .await
        .cloned()
}

fn find_nats_server() -> anyhow::Result<PathBuf> {
    const HINT: &str = "run `scripts/install-deps.sh nats` (installs nats-server 2.15.1 into \
                        <workspace>/.tools/bin) or set NATS_SERVER_BIN";
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!("NATS_SERVER_BIN={} does not exist; {HINT}", bin.display());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    let tools = workspace.join(".tools/bin/nats-server");
    if tools.is_file() {
        return Ok(tools);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "no nats-server found (looked at $NATS_SERVER_BIN, {}, PATH); {HINT}",
        tools.display()
    )
}

async fn check_version(bin: &Path) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(bin)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text)
        .ok_or_else(|| anyhow!("cannot parse `{} --version` output {text:?}", bin.display()))?;
    if version < MIN_VERSION {
        bail!(
            "{} is v{}.{}; need >= {}.{} — run `scripts/install-deps.sh nats` or set NATS_SERVER_BIN",
            bin.display(),
            version.0,
            version.1,
            MIN_VERSION.0,
            MIN_VERSION.1
        );
    }
    Ok(())
}

/// `nats-server: v2.15.1` → `(2, 15)`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.trim().rsplit(' ').next()?.trim_start_matches('v');
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9)));
        assert!(parse_version("nats-server: v2.9.10").unwrap() < MIN_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn parses_ports_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nats-server_1.ports");
        assert_eq!(read_ports_file(&p), None);
        std::fs::write(&p, r#"{"nats":["nats://127.0.0.1:43587"]"#).unwrap();
        assert_eq!(read_ports_file(&p), None, "half-written file");
        std::fs::write(&p, r#"{"nats":["nats://127.0.0.1:43587"]}"#).unwrap();
        assert_eq!(read_ports_file(&p), Some(43587));
    }
}
