//! The one-time migration from a service's own table of an earlier version into the resource
//! table ([`Table::migrate`]), run at start by each service's `init`.

use serde::{Serialize, de::DeserializeOwned};
use sqlx::{SqlitePool, sqlite::SqliteRow};

use crate::{
    row::Row,
    table::{Table, TableError, insert_row},
};

impl<D: Serialize + DeserializeOwned> Table<D> {
    /// One-time migration from a service's table of an earlier version: when `old` exists,
    /// reads it with `select`, writes each row `map` returns (a row that has a new row already
    /// is skipped) and drops `old`, in one transaction. Returns how many rows it wrote; 0 when
    /// `old` does not exist. `old` must be a plain SQL name (`[a-z_]`). Rows are written as this
    /// table's kind, keeping their run key, state, detail and timestamps.
    pub async fn migrate<R>(
        &self,
        pool: &SqlitePool,
        old: &'static str,
        select: &'static str,
        map: impl Fn(R) -> Option<Row<D>>,
    ) -> Result<usize, TableError>
    where
        R: for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin,
    {
        assert!(
            !old.is_empty() && old.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "old table name {old:?} is not a plain SQL name"
        );
        let op = "migrate the old table";
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.table_err(op))?;
        let exists: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(old)
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.table_err(op))?;
        if exists.is_none() {
            return Ok(0);
        }
        let old_rows: Vec<R> = sqlx::query_as(select)
            .fetch_all(&mut *tx)
            .await
            .map_err(self.table_err(op))?;
        let mut written = 0;
        for old_row in old_rows.into_iter().filter_map(&map) {
            let Row {
                kind,
                vm_id,
                run_key,
                state,
                detail,
                created_at,
                updated_at,
            } = old_row;
            let row = Row {
                kind,
                vm_id,
                run_key,
                state,
                detail: &detail,
                created_at,
                updated_at,
            };
            let sql = insert_row!("ON CONFLICT (kind, vm_id) DO NOTHING");
            let n = self.insert(&mut tx, sql, "migrate", &row).await?;
            written += usize::try_from(n).unwrap_or_default();
        }
        // `old` was checked to be a plain name above.
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {old}")))
            .execute(&mut *tx)
            .await
            .map_err(self.table_err(op))?;
        tx.commit().await.map_err(self.table_err(op))?;
        tracing::info!(kind = %self.kind(), old, written, "Resource table: migrated the old table.");
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        row::{Kind, Row, State},
        table::tests::{VOLS, open, vol},
    };

    #[tokio::test]
    async fn migrate_copies_the_old_table_once_and_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let pool = store.pool();
        sqlx::query("CREATE TABLE old_vols (vm_id TEXT, st TEXT, size INTEGER, at INTEGER)")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO old_vols VALUES ('vm-a', 'prepared', 5, 100), ('vm-b', 'released', 0, 200), ('vm-c', 'bogus', 0, 0)",
        )
        .execute(pool)
        .await
        .unwrap();
        let select = "SELECT vm_id, st, size, at FROM old_vols";
        let map = |(vm_id, st, size, at): (String, String, i64, i64)| {
            Some(Row {
                kind: Kind::Scratch,
                vm_id,
                run_key: String::new(),
                state: match st.as_str() {
                    "prepared" => State::Prepared,
                    "released" => State::Released,
                    _ => return None,
                },
                detail: vol(u64::try_from(size).unwrap()),
                created_at: at,
                updated_at: at,
            })
        };
        assert_eq!(
            VOLS.migrate(pool, "old_vols", select, map).await.unwrap(),
            2
        );
        let a = VOLS.get(pool, "vm-a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.detail.size, a.created_at),
            (State::Prepared, 5, 100)
        );
        assert!(VOLS.get(pool, "vm-b").await.unwrap().unwrap().is_released());
        assert!(VOLS.get(pool, "vm-c").await.unwrap().is_none());
        // The old table is gone: a second start migrates nothing.
        assert_eq!(
            VOLS.migrate(pool, "old_vols", select, map).await.unwrap(),
            0
        );
    }
}
