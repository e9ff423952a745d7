//! A service binary as a child process: its config file ([`ServiceConfig`]), its environment,
//! start, wait for a line, terminate, and its stderr kept in a file for the failure report.
//!
//! ```ignore
//! let conf = ServiceConfig::new(HOST, &nats.url(), &dir.join("state"))
//!     .set("gateway", "port_range", "32000-32999");
//! let mut gw = ServiceProcess::builder(env!("CARGO_BIN_EXE_wnodes-gateway"), dir)
//!     .config(&conf)
//!     .spawn()?;
//! assert!(gw.terminate(Duration::from_secs(15)).await?.success(), "{}", gw.stderr());
//! ```

use parking_lot::Mutex;
use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use nix::{sys::signal, unistd::Pid};

/// A TOML value of a [`ServiceConfig`].
#[derive(Debug, Clone, PartialEq)]
pub enum TomlValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// An array of values.
    Array(Vec<TomlValue>),
}

impl From<&str> for TomlValue {
    fn from(s: &str) -> Self {
        Self::Str(s.into())
    }
}

impl From<String> for TomlValue {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<&Path> for TomlValue {
    fn from(p: &Path) -> Self {
        Self::Str(p.display().to_string())
    }
}

impl From<&PathBuf> for TomlValue {
    fn from(p: &PathBuf) -> Self {
        Self::Str(p.display().to_string())
    }
}

impl From<i64> for TomlValue {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

impl<T: Into<TomlValue>> From<Vec<T>> for TomlValue {
    fn from(v: Vec<T>) -> Self {
        Self::Array(v.into_iter().map(Into::into).collect())
    }
}

impl From<bool> for TomlValue {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

impl std::fmt::Display for TomlValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Str(s) => {
                f.write_char('"')?;
                for c in s.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        c if c.is_control() => write!(f, "\\u{:04X}", u32::from(c))?,
                        c => f.write_char(c)?,
                    }
                }
                f.write_char('"')
            }
            Self::Int(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Array(v) => {
                f.write_char('[')?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_char(']')
            }
        }
    }
}

/// When set (`-all,+net_admin`), every service binary a test starts runs under that capability
/// bounding set, through `setpriv` (scripts/check-systemd.sh: the units' sets).
pub const BOUNDING_SET_ENV: &str = "TESTKIT_BOUNDING_SET";

/// A service's config file: the runtime's top-level keys (`site`, `host`, `state_dir`,
/// `http_addr` on port 0, `[nats] url`) and any table the test sets.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Table path (`""` for the top level, `"image.catalog.sl6"`) → keys in insertion order.
    tables: BTreeMap<String, Vec<(String, TomlValue)>>,
    /// `[[path]]` arrays of tables, in order.
    arrays: Vec<(String, Vec<(String, TomlValue)>)>,
}

impl ServiceConfig {
    /// Site `T1` ([`crate::events::SITE`]), `host`, the NATS server at `nats_url`, state in
    /// `state_dir`, HTTP on a port the kernel picks.
    pub fn new(host: &str, nats: &wnodes_bus::NatsConfig, state_dir: &Path) -> Self {
        let conf = Self {
            tables: BTreeMap::new(),
            arrays: Vec::new(),
        };
        let conf = conf
            .set("", "site", crate::events::SITE)
            .set("", "host", host)
            .set("", "state_dir", state_dir)
            .set("", "http_addr", "127.0.0.1:0")
            .set("nats", "url", nats.url.as_str());
        match &nats.creds_file {
            Some(creds) => conf.set("nats", "creds_file", creds.as_path()),
            None => conf,
        }
    }

    /// Sets `key` in `[table]` (`""`: the top level), replacing what was there.
    #[must_use]
    pub fn set(mut self, table: &str, key: &str, value: impl Into<TomlValue>) -> Self {
        let keys = self.tables.entry(table.into()).or_default();
        let value = value.into();
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => keys.push((key.into(), value)),
        }
        self
    }

    /// Appends one `[[table]]` entry with `keys`.
    #[must_use]
    pub fn push(mut self, table: &str, keys: &[(&str, TomlValue)]) -> Self {
        self.arrays.push((
            table.into(),
            keys.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ));
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let keys = |out: &mut String, keys: &[(String, TomlValue)]| {
            for (k, v) in keys {
                let _ = writeln!(out, "{k} = {v}");
            }
        };
        if let Some(top) = self.tables.get("") {
            keys(&mut out, top);
        }
        for (table, ks) in self.tables.iter().filter(|(t, _)| !t.is_empty()) {
            let _ = writeln!(out, "\n[{table}]");
            keys(&mut out, ks);
        }
        for (table, ks) in &self.arrays {
            let _ = writeln!(out, "\n[[{table}]]");
            keys(&mut out, ks);
        }
        out
    }

    /// Writes the file.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_toml())
    }
}

/// How to start a [`ServiceProcess`].
#[derive(Debug, Clone)]
pub struct ProcessBuilder {
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_clear: bool,
    stderr: Option<PathBuf>,
    /// The config file's text, written to `<dir>/wnodes.toml` at spawn.
    config: Option<String>,
}

impl ProcessBuilder {
    /// Passes `--config <dir>/wnodes.toml`, written from `config` at spawn.
    #[must_use]
    pub fn config(mut self, config: &ServiceConfig) -> Self {
        let path = self.dir.join("wnodes.toml");
        self.args.push("--config".into());
        self.args.push(path.into_os_string());
        self.config = Some(config.to_toml());
        self
    }

    /// Adds a command-line argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets a raw environment variable.
    #[must_use]
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets `WNODES_<key>` (a runtime config override: `NATS__URL`, `IMAGE__CACHE_DIR`, ...).
    #[must_use]
    pub fn wnodes_env(self, key: &str, value: impl Into<OsString>) -> Self {
        self.env(&format!("WNODES_{key}"), value)
    }

    /// Starts from an empty environment (`PATH` kept) instead of the test's own.
    #[must_use]
    pub fn env_clear(mut self) -> Self {
        self.env_clear = true;
        self
    }

    /// The runtime's settings as environment variables, the way a service without a config
    /// file takes them: `WNODES_NATS__URL`, `WNODES_SITE`, `WNODES_HOST`, `WNODES_STATE_DIR`,
    /// and `WNODES_HTTP_ADDR` on a port the kernel picks.
    #[must_use]
    pub fn runtime_env(
        self,
        nats: &wnodes_bus::NatsConfig,
        site: &str,
        host: &str,
        state_dir: &Path,
    ) -> Self {
        let this = match &nats.creds_file {
            Some(creds) => self.wnodes_env("NATS__CREDS_FILE", creds.as_os_str()),
            None => self,
        };
        this.wnodes_env("NATS__URL", nats.url.as_str())
            .wnodes_env("SITE", site)
            .wnodes_env("HOST", host)
            .wnodes_env("STATE_DIR", state_dir)
            .wnodes_env("HTTP_ADDR", "127.0.0.1:0")
    }

    /// Appends stderr to `path` instead of `<dir>/<binary>.stderr` (a restarted process
    /// that should share one log).
    #[must_use]
    pub fn stderr_to(mut self, path: &Path) -> Self {
        self.stderr = Some(path.into());
        self
    }

    /// The command, with its config file written.
    fn command(&self) -> anyhow::Result<Command> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if let Some(text) = &self.config {
            let path = self.dir.join("wnodes.toml");
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        // scripts/check-systemd.sh runs a service's binary tests under its unit's capability
        // bounding set: `setpriv --bounding-set <set> -- <binary>` (setpriv execs it: same pid).
        let mut cmd = match std::env::var(BOUNDING_SET_ENV) {
            Ok(set) if !set.is_empty() => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--bounding-set={set}"))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
            _ => Command::new(&self.bin),
        };
        if self.env_clear {
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        }
        // A config file from the environment would shadow the one the test means.
        cmd.env_remove("WNODES_CONFIG").env_remove(BOUNDING_SET_ENV);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.args(&self.args).stdin(Stdio::null());
        Ok(cmd)
    }

    fn name(&self) -> String {
        self.bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Runs the process to its end (a one-shot command: `records --json`, `replay`, ...);
    /// returns its exit status and output.
    ///
    /// # Errors
    /// When the config file or the process cannot be made.
    pub async fn output(&self) -> anyhow::Result<std::process::Output> {
        let cmd = self.command()?;
        tokio::process::Command::from(cmd)
            .output()
            .await
            .with_context(|| format!("running {}", self.bin.display()))
    }

    /// Runs a one-shot command that prints one JSON object per line (`records --json`) to its
    /// end; the objects.
    ///
    /// # Errors
    /// When it cannot run, exits unsuccessfully (with its stderr), or prints a line that is
    /// not JSON.
    pub async fn json_lines(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.output().await?;
        anyhow::ensure!(
            out.status.success(),
            "{} exited with {}: {}",
            self.bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
            .collect()
    }

    /// Starts the process; does not wait for anything. Its stdout is read line by line
    /// ([`ServiceProcess::wait_line`]); its stderr is appended to a file
    /// ([`ServiceProcess::stderr`], [`ServiceProcess::wait_stderr`]).
    ///
    /// # Errors
    /// When the directory, the config file or the process cannot be made.
    pub fn spawn(&self) -> anyhow::Result<ServiceProcess> {
        let mut cmd = self.command()?;
        let name = self.name();
        let stderr_path = self
            .stderr
            .clone()
            .unwrap_or_else(|| self.dir.join(format!("{name}.stderr")));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .with_context(|| format!("opening {}", stderr_path.display()))?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(stderr));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().push(line);
                }
            });
        }
        Ok(ServiceProcess {
            name,
            child,
            stdout,
            stderr_path,
        })
    }

    /// Starts the process and waits until it prints a line starting with `ready` (what
    /// `bus-node` prints once it consumes).
    ///
    /// # Errors
    /// When it cannot start, exits first, or says nothing within 20 s.
    pub async fn start(&self) -> anyhow::Result<ServiceProcess> {
        let mut p = self.spawn()?;
        p.wait_line("ready", Duration::from_secs(20)).await?;
        Ok(p)
    }
}

/// A running service binary; SIGKILLed on drop if it still runs.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_path: PathBuf,
}

impl ServiceProcess {
    /// How to start `bin`; its config file and stderr go to `dir`.
    pub fn builder(bin: impl Into<PathBuf>, dir: &Path) -> ProcessBuilder {
        ProcessBuilder {
            bin: bin.into(),
            dir: dir.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            stderr: None,
            config: None,
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns it.
    ///
    /// # Errors
    /// When the process exits first or no such line comes within `timeout` (with its stderr).
    pub async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        self.poll(&format!("a line {prefix:?}"), timeout, |p| {
            p.stdout
                .lock()
                .iter()
                .find(|l| l.starts_with(prefix))
                .cloned()
        })
        .await
    }

    /// Waits (up to `timeout`) for the first stderr line that `f` maps to `Some`.
    ///
    /// # Errors
    /// When the process exits or `timeout` passes first (with its stderr).
    pub async fn wait_stderr<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        self.poll(what, timeout, |p| p.stderr().lines().find_map(&f))
            .await
    }

    /// Looks every 20 ms until `found` gives something; fails, with the stderr, when the process
    /// exits first or `timeout` passes.
    async fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        found: impl Fn(&Self) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Whether it had exited before looking: what it wrote last is then in.
            let exited = self.child.try_wait()?;
            if let Some(v) = found(self) {
                return Ok(v);
            }
            if let Some(status) = exited {
                anyhow::bail!(
                    "{} exited ({status}) before {what}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "no {what} from {} within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process (and any earlier one sharing its file) wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Its stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().clone()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL and reap.
    ///
    /// # Errors
    /// When it cannot be reaped.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let _ = signal::kill(self.nix_pid()?, signal::Signal::SIGKILL);
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    ///
    /// # Errors
    /// When the signal cannot be sent or the process outlives `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        signal::kill(self.nix_pid()?, signal::Signal::SIGTERM)?;
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit by itself.
    ///
    /// # Errors
    /// When it outlives `timeout` (with its stderr).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn nix_pid(&self) -> anyhow::Result<Pid> {
        Ok(Pid::from_raw(i32::try_from(self.child.id())?))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.kill();
        }
    }
}

/// Host name of every `bus-node` ([`bus_node`]).
pub const BUS_NODE_HOST: &str = "hv1.test.example";
/// Site of every `bus-node` ([`bus_node`]).
pub const BUS_NODE_SITE: &str = "TEST-SITE";

/// How to start `bus-node` (the system tests' node on the real service runtime, at `bin`) in
/// `role`, connecting with `nats` (the test provisions its durable), with its state and stderr in `state_dir`: an empty
/// environment but `PATH`, `RUST_LOG=info` and the [`ProcessBuilder::runtime_env`] of
/// [`BUS_NODE_HOST`] at [`BUS_NODE_SITE`]. Set the node's and the consumer's settings with
/// [`ProcessBuilder::wnodes_env`] (`NODE__DURABLE`, ...).
pub fn bus_node(
    bin: &str,
    nats: &wnodes_bus::NatsConfig,
    state_dir: &Path,
    role: &str,
) -> ProcessBuilder {
    ServiceProcess::builder(bin, state_dir)
        .env_clear()
        .runtime_env(nats, BUS_NODE_SITE, BUS_NODE_HOST, state_dir)
        .env("RUST_LOG", "info")
        .wnodes_env("NODE__ROLE", role)
}
