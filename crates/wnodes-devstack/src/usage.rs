//! Usage records, read with `wnodes-accounting records --json`.

use anyhow::Context;
pub use wnodes_accounting_types::UsageRecord;

use crate::Stack;

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
