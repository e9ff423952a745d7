//! The `[accounting]` config section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[accounting]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SQLite database holding the usage records and the consumer's idempotency keys; default
    /// `<state_dir>/accounting.db`. Env `WNODES_ACCOUNTING__DATABASE`. (A PostgreSQL backend
    /// for sites is planned; it needs the idempotency store on PostgreSQL too, so that a record
    /// still commits with its key.)
    pub database: Option<PathBuf>,
    /// `[accounting.apel]`: what APEL messages need that a usage record does not say (the
    /// `apel-export` subcommand).
    pub apel: wnodes_apel::ApelConfig,
}

impl Config {
    /// The database path, given the service's state directory.
    pub fn database_path(&self, state_dir: &std::path::Path) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| state_dir.join("accounting.db"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_defaults_to_the_state_dir_and_can_be_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wnodes.toml");
        std::fs::write(&path, "site = \"T1\"\nhost = \"c.example.org\"\n").unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        assert_eq!(
            c.service.database_path(std::path::Path::new("/var/lib/x")),
            std::path::Path::new("/var/lib/x/accounting.db")
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabase = \"/srv/acct.db\"\n",
        )
        .unwrap();
        let c = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap();
        assert_eq!(
            c.service.database_path(std::path::Path::new("/var/lib/x")),
            std::path::Path::new("/srv/acct.db")
        );
        std::fs::write(
            &path,
            "site = \"T1\"\nhost = \"c.example.org\"\n[accounting]\ndatabse = \"/srv/acct.db\"\n",
        )
        .unwrap();
        let e = wnodes_runtime::config::load::<Config>("accounting", Some(&path)).unwrap_err();
        assert!(e.to_string().contains("databse"), "{e}");
    }
}
