//! One SQL text, two databases: the types a handler or a tool uses to run the same statement on
//! SQLite or on PostgreSQL, whichever the store is.
//!
//! Write statements in the dialect both share (`$1, $2, …` placeholders, which SQLite also
//! takes; `INSERT … ON CONFLICT … DO NOTHING | DO UPDATE SET … = excluded.…`; integers bound
//! as `i64`, reals as `f64`), then run them with [`on_db!`]:
//!
//! ```ignore
//! let mut db = ctx.db().await?;
//! let n = wnodes_bus::on_db!(&mut db, |c| {
//!     sqlx::query("UPDATE t SET x = $1 WHERE k = $2").bind(x).bind(k).execute(c).await
//!         .map(|r| r.rows_affected())
//! })?;
//! ```
//!
//! The macro expands the body once per database, so each arm is type-checked against its own
//! driver (a row type must decode from both: derive `sqlx::FromRow` with `i64`, `f64`,
//! `String`, `Option<…>` fields; PostgreSQL columns `BIGINT` and `DOUBLE PRECISION`).

use sqlx::{PgConnection, PgPool, Postgres, Sqlite, SqliteConnection, SqlitePool, Transaction};

/// A connection inside a transaction (a handler's, [`crate::HandlerCtx::db`], or a [`Tx`]'s).
#[derive(Debug)]
pub enum Db<'a> {
    Sqlite(&'a mut SqliteConnection),
    Postgres(&'a mut PgConnection),
}

/// A connection pool on either database.
#[derive(Debug, Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A transaction on either database; dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Pool {
    /// Begins a transaction (`BEGIN IMMEDIATE` on SQLite: it never fails half-way on a lock
    /// upgrade).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Self::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
        }
    }
}

impl Tx {
    /// The transaction's connection.
    pub fn db(&mut self) -> Db<'_> {
        match self {
            Self::Sqlite(t) => Db::Sqlite(&mut *t),
            Self::Postgres(t) => Db::Postgres(&mut *t),
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(t) => t.commit().await,
            Self::Postgres(t) => t.commit().await,
        }
    }
}

/// Runs `$body` with `$c` bound to the executor of a [`Db`] (`&mut SqliteConnection` or
/// `&mut PgConnection`): one arm per database, the same tokens in each, so the body's value
/// must have one type on both (`.map(|r| r.rows_affected())` after `execute`). `$db` is a
/// `&mut Db`: borrowed, so a second statement can follow.
#[macro_export]
macro_rules! on_db {
    ($db:expr, |$c:ident| $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($c) => {
                let $c = &mut **$c;
                $body
            }
            $crate::db::Db::Postgres($c) => {
                let $c = &mut **$c;
                $body
            }
        }
    };
}

/// [`on_db!`] for a `&`[`Pool`]: `$c` is `&SqlitePool` or `&PgPool`.
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, |$c:ident| $body:expr) => {
        match $pool {
            $crate::db::Pool::Sqlite($c) => $body,
            $crate::db::Pool::Postgres($c) => $body,
        }
    };
}
