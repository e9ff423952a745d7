//! The `[usage]` config section.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[usage]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Label the counters by local user too (one series per user: mind the cardinality).
    /// Env `WNODES_USAGE__PER_USER`.
    pub per_user: bool,
    /// How often the counters are brought up to the committed totals (also after each event);
    /// default 5 s.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            per_user: false,
            refresh: Duration::from_secs(5),
        }
    }
}
