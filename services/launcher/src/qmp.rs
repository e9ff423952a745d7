//! A minimal QMP client: greeting, `qmp_capabilities`, then one command at a time (events
//! skipped) for `system_powerdown` and `quit`, or a stream of events ([`Qmp::next_event`]) on
//! the VM's second monitor, where the watcher learns of the guest's power-off (`SHUTDOWN`).
//! qemu's exit itself is confirmed through its pid (which also works for a VM whose QMP
//! connection was lost with a launcher restart).
//!
//! Why not the `qapi` crate: its `qapi-qmp` generates Rust types at build time for the whole
//! QMP schema of the QEMU release it vendors (hundreds of commands and types, compiled on
//! every clean build of these 2-core machines), while the launcher sends three commands
//! (`qmp_capabilities`, `system_powerdown`, `quit`) and reads one event (`SHUTDOWN`), all
//! stable since QEMU 1.x. A schema pinned to another release than the host's qemu would also
//! be a second source of truth. This client is exercised against the real qemu in
//! `tests/vm.rs` (stop through QMP, the guest's power-off seen as `SHUTDOWN`).

use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// A QMP problem.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {path}: I/O failed")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {path}: no answer within {QMP_TIMEOUT:?}")]
    Timeout { path: String },
    #[error("QMP {path}: connection closed")]
    Closed { path: String },
    #[error("QMP {path}: bad message {line:?}")]
    Protocol { path: String, line: String },
    #[error("QMP {path}: command {command} failed: {error}")]
    Command {
        path: String,
        command: String,
        error: String,
    },
}

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    path: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(socket: &Path) -> Result<Self, QmpError> {
        let path = socket.display().to_string();
        let stream = tokio::time::timeout(QMP_TIMEOUT, UnixStream::connect(socket))
            .await
            .map_err(|_| QmpError::Timeout { path: path.clone() })?
            .map_err(|source| QmpError::Io {
                path: path.clone(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            path,
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                path: qmp.path.clone(),
                line: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let path = self.path.clone();
        tokio::time::timeout(QMP_TIMEOUT, self.read_message_untimed())
            .await
            .map_err(|_| QmpError::Timeout { path })?
    }

    /// The next asynchronous event (`{"event": "SHUTDOWN", "data": {...}, ...}`); waits as long
    /// as it takes. Answers to commands are not expected on an event-only connection.
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        loop {
            let m = self.read_message_untimed().await?;
            if m.get("event").is_some() {
                return Ok(m);
            }
        }
    }

    async fn read_message_untimed(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(line.trim()).map_err(|_| QmpError::Protocol {
            path: self.path.clone(),
            line,
        })
    }

    /// Runs a command without arguments and returns its `return` value.
    pub async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        self.execute_with(command, None).await
    }

    /// Runs a command with `arguments` (an object) and returns its `return` value.
    pub async fn execute_with(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = match arguments {
            Some(a) => json!({ "execute": command, "arguments": a }),
            None => json!({ "execute": command }),
        }
        .to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let m = self.read_message().await?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: command.to_owned(),
                    error: e.to_string(),
                });
            }
            // An asynchronous event ("event": ...): skip it.
        }
    }
}

/// Asks the guest to power off (ACPI), then quits qemu if it is still there after `grace`.
/// `alive` tells whether qemu still runs.
pub async fn stop_vm(
    socket: &Path,
    grace: Duration,
    alive: impl Fn() -> bool,
) -> Result<(), QmpError> {
    let mut qmp = Qmp::connect(socket).await?;
    if let Err(e) = qmp.execute("system_powerdown").await {
        tracing::debug!(error = %wnodes_bus::ErrorChain(&e), "system_powerdown failed; quitting.");
    }
    let deadline = tokio::time::Instant::now() + grace;
    while alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if alive() {
        match qmp.execute("quit").await {
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
