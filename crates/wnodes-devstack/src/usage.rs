//! Usage records, read with `wnodes-accounting records --json`.

use anyhow::Context;
use serde::Deserialize;

use crate::Stack;

/// A usage record (the fields of `wnodes-accounting records --json` this crate uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UsageRecord {
    pub run_key: String,
    pub job_id: String,
    pub vm_id: String,
    pub vo: String,
    pub user_name: String,
    pub uid: Option<i64>,
    pub gid: Option<i64>,
    /// count
    pub cores: i64,
    /// seconds, user + system
    pub cpu_seconds: f64,
    /// bytes
    pub peak_memory_bytes: i64,
    /// seconds, VM start to stop
    pub wall_seconds: f64,
    pub exit_code: i64,
    pub lrms_exit_code: Option<i64>,
    pub stop_reason: String,
    /// Unix ms
    pub started_ms: Option<i64>,
    /// Unix ms
    pub stopped_ms: Option<i64>,
    /// Unix ms
    pub recorded_ms: i64,
}

impl Stack {
    /// Every usage record in the accounting database.
    pub async fn usage_records(&self) -> anyhow::Result<Vec<UsageRecord>> {
        let out = tokio::process::Command::new(self.bin("accounting"))
            .env("WNODES_CONFIG", &self.config_path)
            .env("WNODES_STATE_DIR", self.state_dir("accounting"))
            .args(["records", "--json"])
            .output()
            .await
            .context("running wnodes-accounting records --json")?;
        anyhow::ensure!(
            out.status.success(),
            "wnodes-accounting records failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing record {l}")))
            .collect()
    }

    /// The usage records of `run` (a run key, or a job id meaning its attempt 1); exactly one
    /// after a run whose VM started.
    pub async fn usage_record(&self, run: &str) -> anyhow::Result<Vec<UsageRecord>> {
        let key = self.run_key_of(run);
        Ok(self
            .usage_records()
            .await?
            .into_iter()
            .filter(|r| r.run_key == key)
            .collect())
    }
}
