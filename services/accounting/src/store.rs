//! Where the records live: a store URL (`sqlite://PATH`, a bare path, or `postgres://…`), the
//! embedded migrations of each database (`migrations/sqlite`, `migrations/postgres`: the
//! tables `accounting_jobs`, `usage_records`, and the APEL exporter's `apel_exported` and
//! `apel_pending`), and opening the store the consumer's idempotency keys share, so that
//! every effect commits with its key.

use std::{fmt, path::PathBuf, str::FromStr};

use sqlx::migrate::Migrator;
use wnodes_bus::{KeyStore, PgKeyStore, Store, db::Pool};

use crate::AccountingError;

static SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");

/// Connections the service keeps to PostgreSQL (each in-flight handler transaction holds one).
pub const POSTGRES_CONNECTIONS: u32 = 16;

/// A store, as configured (`[accounting] database`) or given (`--store`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum StoreUrl {
    /// A SQLite file: `sqlite:///var/lib/wnodes/accounting.db`, `sqlite:rel.db` or a bare path.
    Sqlite(PathBuf),
    /// `postgres://user:password@host:port/database` (or `postgresql://`), with sqlx's
    /// parameters (`sslmode`, `sslrootcert`, …).
    Postgres(String),
}

/// Why a store URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("store {given:?} is neither a SQLite path (or sqlite:// URL) nor a postgres:// URL: {why}")]
pub struct StoreUrlError {
    pub given: String,
    pub why: &'static str,
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| StoreUrlError {
            given: s.to_owned(),
            why,
        };
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            sqlx::postgres::PgConnectOptions::from_str(s)
                .map_err(|_| bad("the PostgreSQL URL does not parse"))?;
            return Ok(Self::Postgres(s.to_owned()));
        }
        let path = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
            .unwrap_or(s);
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        if path.contains("://") || path.contains('?') {
            return Err(bad(
                "unknown scheme, or URL parameters (none are taken for SQLite)",
            ));
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }
}

impl TryFrom<String> for StoreUrl {
    type Error = StoreUrlError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<StoreUrl> for String {
    /// As configured (a PostgreSQL URL keeps its password: this is the config's own value).
    fn from(u: StoreUrl) -> Self {
        match u {
            StoreUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
            StoreUrl::Postgres(u) => u,
        }
    }
}

impl fmt::Display for StoreUrl {
    /// The URL without a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            Self::Postgres(u) => match sqlx::postgres::PgConnectOptions::from_str(u) {
                Ok(o) => f.write_str(&wnodes_bus::pg_store::redact(&o)),
                Err(_) => f.write_str("postgres://(unparsable)"),
            },
        }
    }
}

/// What a tool's pool may do with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only: SQLite opened read-only; PostgreSQL sessions with
    /// `default_transaction_read_only`.
    ReadOnly,
    /// Durable writes: SQLite WAL with `synchronous=FULL`; PostgreSQL `synchronous_commit = on`.
    Write,
}

/// A small pool on an existing store for a tool beside the consumer (`records`, `apel-export`,
/// the report API): one SQLite connection or two PostgreSQL ones, waiting up to 10 s for one.
pub async fn tool_pool(url: &StoreUrl, access: Access) -> Result<Pool, sqlx::Error> {
    use sqlx::{
        postgres::PgConnectOptions,
        sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    };
    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
    Ok(match url {
        StoreUrl::Sqlite(path) => {
            let opts = SqliteConnectOptions::from_str("sqlite:")?
                .filename(path)
                .create_if_missing(false);
            let opts = match access {
                Access::ReadOnly => opts.read_only(true),
                Access::Write => opts
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(std::time::Duration::from_secs(30)),
            };
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(WAIT)
                    .connect_with(opts)
                    .await?,
            )
        }
        StoreUrl::Postgres(u) => {
            let session = match access {
                Access::ReadOnly => "SET default_transaction_read_only = on",
                Access::Write => "SET synchronous_commit = on",
            };
            Pool::Postgres(
                wnodes_bus::pg_store::pool_options(2, session)
                    .acquire_timeout(WAIT)
                    .connect_with(PgConnectOptions::from_str(u)?)
                    .await?,
            )
        }
    })
}

/// Applies the migrations the database lacks (idempotent; run at every start; on PostgreSQL
/// under sqlx's advisory lock, so several processes may start at once).
pub async fn migrate(pool: &Pool) -> Result<(), AccountingError> {
    match pool {
        Pool::Sqlite(p) => SQLITE.run(p).await?,
        Pool::Postgres(p) => POSTGRES.run(p).await?,
    }
    Ok(())
}

/// Opens the store as the consumer's idempotency store and applies the migrations.
pub async fn open_store(url: &StoreUrl) -> Result<Store, AccountingError> {
    let store: Store = match url {
        StoreUrl::Sqlite(path) => KeyStore::open(path).await?.into(),
        StoreUrl::Postgres(u) => PgKeyStore::connect(u, POSTGRES_CONNECTIONS).await?.into(),
    };
    migrate(&store.pool()).await?;
    Ok(store)
}
