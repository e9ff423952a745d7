//! Shared pieces of the system tests: spawning `bus-node` processes on the real service
//! runtime, reading their effects, and inspecting consumers on the server.
//!
//! Tests live in `tests/`: `bus.rs` (trace across processes, idempotency, dead letters, crash
//! and restart, shutdown), `auth.rs` (TLS and credentials), `config.rs` (fail-fast start-up).

pub mod jobs;

use parking_lot::Mutex;
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use nix::{sys::signal, unistd::Pid};

/// Host name every test node uses.
pub const HOST: &str = "hv1.test.example";
/// Site name every test node uses.
pub const SITE: &str = "TEST-SITE";

/// A `bus-node` child process.
#[derive(Debug)]
pub struct Node {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_path: PathBuf,
}

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub bin: PathBuf,
    pub nats_url: String,
    pub state_dir: PathBuf,
    pub role: String,
    pub env: Vec<(String, String)>,
}

impl NodeOpts {
    pub fn new(bin: &str, nats_url: &str, state_dir: &Path, role: &str) -> Self {
        Self {
            bin: PathBuf::from(bin),
            nats_url: nats_url.to_owned(),
            state_dir: state_dir.to_owned(),
            role: role.to_owned(),
            env: Vec::new(),
        }
    }

    /// Adds `WNODES_<key>=<value>`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((format!("WNODES_{key}"), value.to_owned()));
        self
    }

    /// Adds a raw environment variable.
    pub fn raw_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

impl Node {
    /// Starts the node; does not wait.
    pub fn spawn(opts: &NodeOpts) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.state_dir)?;
        let stderr_path = opts
            .state_dir
            .join(format!("stderr-{}.log", std::process::id()));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)?;
        let mut cmd = Command::new(&opts.bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("WNODES_NATS__URL", &opts.nats_url)
            .env("WNODES_HOST", HOST)
            .env("WNODES_SITE", SITE)
            .env("WNODES_STATE_DIR", &opts.state_dir)
            .env("WNODES_HTTP_ADDR", "127.0.0.1:0")
            .env("WNODES_NODE__ROLE", &opts.role)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", opts.bin.display()))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().push(line);
                }
            });
        }
        Ok(Self {
            child,
            stdout,
            stderr_path,
        })
    }

    /// Starts the node and waits until it prints `ready`.
    pub async fn start(opts: &NodeOpts) -> anyhow::Result<Self> {
        let mut node = Self::spawn(opts)?;
        node.wait_line("ready", Duration::from_secs(20)).await?;
        Ok(node)
    }

    /// Waits for a stdout line starting with `prefix`; returns it.
    pub async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .stdout
                .lock()
                .iter()
                .find(|l| l.starts_with(prefix))
                .cloned()
            {
                return Ok(l);
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "node exited ({status}) before printing {prefix:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "no {prefix:?} line within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the node wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let _ = signal::kill(
            Pid::from_raw(self.child.id() as i32),
            signal::Signal::SIGKILL,
        );
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        signal::kill(
            Pid::from_raw(self.child.id() as i32),
            signal::Signal::SIGTERM,
        )?;
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("process did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.kill();
        }
    }
}

/// Rows in a sink node's `effects` table (0 if the table does not exist yet).
pub async fn effect_rows(state_dir: &Path) -> anyhow::Result<(i64, i64)> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let db = state_dir.join("keys.db");
    if !db.exists() {
        return Ok((0, 0));
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await?;
    let res: Result<(i64, i64), _> =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT key) FROM effects")
            .fetch_one(&mut conn)
            .await;
    conn.close().await?;
    Ok(res.unwrap_or((0, 0)))
}

/// `(num_ack_pending, num_redelivered, num_pending, deliveries)` (deliveries = last consumer sequence: every delivery, redeliveries included) of a durable consumer.
pub async fn consumer_state(
    js: &async_nats::jetstream::Context,
    durable: &str,
) -> anyhow::Result<(usize, usize, u64, u64)> {
    let stream = js.get_stream(wnodes_bus::subject::EVENTS_STREAM).await?;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(durable)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = consumer.info().await?;
    Ok((
        info.num_ack_pending,
        info.num_redelivered,
        info.num_pending,
        info.delivered.consumer_sequence,
    ))
}
