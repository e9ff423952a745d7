//! PostgreSQL for tests: a fresh database per test on the run's shared cluster
//! ([`database`]; `scripts/test.sh` starts the cluster once per run with
//! `scripts/pg-cluster.sh` and names it in [`URL_VAR`]), and a private [`Cluster`] for a test
//! that stops and restarts its server.
//!
//! Without [`URL_VAR`], [`database`] fails the test naming what is missing: a PostgreSQL test
//! never passes without a server.

#![allow(clippy::expect_used, clippy::panic)] // a missing server is the test's failure

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use sqlx::{Connection as _, Executor as _, PgConnection};

/// The environment variable naming the shared cluster (`postgres://wnodes@127.0.0.1:PORT/postgres`).
/// Not `WNODES_`-prefixed: services read every `WNODES_*` variable as configuration.
pub const URL_VAR: &str = "TESTKIT_POSTGRES_URL";

/// A database of its own on a cluster.
#[derive(Debug, Clone)]
pub struct Database {
    /// `postgres://wnodes@127.0.0.1:PORT/<name>`.
    pub url: String,
    pub name: String,
}

/// `scripts/pg-cluster.sh` in this workspace.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-cluster.sh")
}

/// A fresh, empty database on the run's shared cluster.
///
/// # Panics
/// When [`URL_VAR`] is not set, or the cluster does not answer.
pub async fn database() -> Database {
    let url = std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!(
            "this test needs PostgreSQL: {URL_VAR} is not set (scripts/test.sh starts a cluster \
             and sets it; by hand: `scripts/pg-cluster.sh start DIR` prints the URL)"
        )
    });
    create_database(&url).await
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Creates a uniquely named database on the server `admin_url` points at.
pub async fn create_database(admin_url: &str) -> Database {
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
    );
    let mut conn = PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster at {admin_url}: {e}"));
    // The name is ours (digits and underscores): nothing to escape.
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = conn.close().await;
    let base = admin_url
        .rsplit_once('/')
        .map(|(b, _)| b)
        .expect("a postgres:// URL has a path");
    Database {
        url: format!("{base}/{name}"),
        name,
    }
}

/// A private cluster (`scripts/pg-cluster.sh`), stopped and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    url: String,
}

impl Cluster {
    /// initdb and start (about a second).
    ///
    /// # Panics
    /// When the script fails (PostgreSQL not installed: `scripts/install-deps.sh postgres`).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wnodes-pg-")
            .tempdir()
            .expect("temp dir");
        let url = run(&["start"], dir.path());
        Self { dir, url }
    }

    /// `postgres://wnodes@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (fast shutdown: connections are cut, as in a crash of the clients'
    /// peer; committed transactions stay).
    pub fn stop(&self) {
        run(&["stop"], self.dir.path());
    }

    /// Starts it again on the same port.
    pub fn resume(&self) {
        run(&["resume"], self.dir.path());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

fn run(args: &[&str], dir: &Path) -> String {
    let out = Command::new(script())
        .args(args)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
    assert!(
        out.status.success(),
        "pg-cluster.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs each named `async fn(pg: Option<String>)` twice, as the tests `<name>::sqlite` (`None`:
/// the test makes its SQLite store) and `<name>::postgres` (`Some(url)` of a fresh database on
/// the run's cluster, [`database`]).
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::$name(None).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                let db = $crate::postgres::database().await;
                super::$name(Some(db.url)).await;
            }
        }
    )*};
}
