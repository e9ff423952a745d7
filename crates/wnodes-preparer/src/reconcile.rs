//! Start-up reconciliation, the same for every preparer: the host is made to match the
//! prepared rows. [`HostResources`] is what a service says about its side; [`reconcile()`]
//! walks the rows and the host with it:
//!
//! 1. every prepared row: [`HostResources::restore`] brings back what lives in the process (the
//!    gateway's listeners; a no-op where the host keeps the resource itself);
//! 2. everything the host holds that no prepared row accounts for ([`HostResources::present`],
//!    [`HostResources::held`]) is removed ([`HostResources::remove`]) and logged: a released row
//!    or no row at all means a leak (a crash between making it and recording it, or a release
//!    that did not finish).

use std::{collections::HashSet, fmt, future::Future};

use serde::{Serialize, de::DeserializeOwned};
use sqlx::SqlitePool;

use crate::{
    row::Row,
    table::{Table, TableError},
};

/// A preparer's side of the host, for [`reconcile()`].
pub trait HostResources<D>: Sync {
    /// Why looking at or changing the host failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// One thing found on the host (a file, a tap, a filter chain).
    type Item: fmt::Debug + Send + Sync;

    /// What this service made that the host holds now, each with the key a prepared row
    /// holds it under ([`HostResources::held`]).
    fn present(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, Self::Item)>, Self::Error>> + Send;

    /// The keys of what a prepared row holds on the host (none: nothing on the host).
    fn held(&self, row: &Row<D>) -> Vec<String>;

    /// Removes one thing nobody holds.
    fn remove(&self, item: &Self::Item) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Brings back what a prepared row holds when it lives in this process; true when it runs
    /// afterwards. Default: nothing to bring back.
    fn restore(&self, row: &Row<D>) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        let _ = row;
        async { Ok(false) }
    }
}

/// What [`reconcile()`] did.
#[derive(Debug)]
pub struct Reconciled<I> {
    /// What was removed, in the order [`HostResources::present`] listed it.
    pub removed: Vec<I>,
    /// The VMs whose resource [`HostResources::restore`] brought back.
    pub restored: Vec<String>,
}

impl<I> Default for Reconciled<I> {
    fn default() -> Self {
        Self {
            removed: Vec::new(),
            restored: Vec::new(),
        }
    }
}

/// Why reconciling failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError<E> {
    #[error("reconcile: reading the resource table")]
    Table(#[from] TableError),
    #[error("reconcile: inspecting or cleaning the host")]
    Host(#[source] E),
}

/// Makes the host match the prepared rows of `table` (see the [module docs](self)). Run it
/// before the consumer starts.
pub async fn reconcile<D, H>(
    table: &Table<D>,
    pool: &SqlitePool,
    host: &H,
) -> Result<Reconciled<H::Item>, ReconcileError<H::Error>>
where
    D: Serialize + DeserializeOwned + Sync,
    H: HostResources<D>,
{
    let rows = table.prepared(pool).await?;
    let mut done = Reconciled::default();
    let mut held = HashSet::new();
    for row in &rows {
        held.extend(host.held(row));
        if host.restore(row).await.map_err(ReconcileError::Host)? {
            done.restored.push(row.vm_id.clone());
        }
    }
    for (key, item) in host.present().await.map_err(ReconcileError::Host)? {
        if held.contains(&key) {
            continue;
        }
        host.remove(&item).await.map_err(ReconcileError::Host)?;
        tracing::info!(kind = %table.kind(), key, ?item, "Reconcile: removed what no prepared row holds.");
        done.removed.push(item);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde::Deserialize;

    use super::*;
    use crate::row::{Kind, Released};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct File {
        name: String,
    }

    const FILES: Table<File> = Table::new(Kind::Scratch);

    /// Real files in a directory: `<name>.img` are ours, anything else is left alone.
    /// `restore` writes a prepared row's file back when it is missing.
    struct Dir(PathBuf);

    impl HostResources<File> for Dir {
        type Error = std::io::Error;
        type Item = PathBuf;

        async fn present(&self) -> Result<Vec<(String, PathBuf)>, std::io::Error> {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(&self.0)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "img") {
                    let stem = path.file_stem().unwrap_or_default();
                    found.push((stem.to_string_lossy().into_owned(), path));
                }
            }
            found.sort();
            Ok(found)
        }

        fn held(&self, row: &Row<File>) -> Vec<String> {
            vec![row.detail.name.clone()]
        }

        async fn remove(&self, item: &PathBuf) -> Result<(), std::io::Error> {
            std::fs::remove_file(item)
        }

        async fn restore(&self, row: &Row<File>) -> Result<bool, std::io::Error> {
            let path = self.0.join(format!("{}.img", row.detail.name));
            if path.exists() {
                return Ok(false);
            }
            std::fs::write(path, b"restored")?;
            Ok(true)
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn removes_what_no_prepared_row_holds_and_restores_what_rows_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let files = tmp.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let db = tmp.path().join("keys.db");
        {
            let store = wnodes_bus::KeyStore::open(&db).await.unwrap();
            FILES.init(store.pool()).await.unwrap();
            let mut conn = store.pool().acquire().await.unwrap();
            for (vm, name) in [("vm-keep", "a"), ("vm-gone", "b"), ("vm-rel", "c")] {
                let f = File { name: name.into() };
                assert!(FILES.prepare(&mut conn, vm, "k", &f).await.unwrap());
            }
            let c = File { name: "c".into() };
            assert!(matches!(
                FILES.release(&mut conn, "vm-rel", "k", &c).await.unwrap(),
                Released::Now(_)
            ));
        }
        for f in ["a.img", "c.img", "leak.img", "notes.txt"] {
            std::fs::write(files.join(f), b"x").unwrap();
        }
        // A restart: the store is opened again from its file.
        let store = wnodes_bus::KeyStore::open(&db).await.unwrap();
        let host = Dir(files.clone());
        let done = reconcile(&FILES, store.read_pool(), &host).await.unwrap();
        assert_eq!(
            done.removed,
            vec![files.join("c.img"), files.join("leak.img")]
        );
        assert_eq!(done.restored, vec!["vm-gone".to_owned()]);
        assert_eq!(names(&files), ["a.img", "b.img", "notes.txt"]);
        assert_eq!(std::fs::read(files.join("a.img")).unwrap(), b"x");
        // Nothing left to do the second time.
        let again = reconcile(&FILES, store.read_pool(), &host).await.unwrap();
        assert!(
            again.removed.is_empty() && again.restored.is_empty(),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_host_error_stops_reconcile_and_is_its_source() {
        let tmp = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&tmp.path().join("keys.db"))
            .await
            .unwrap();
        FILES.init(store.pool()).await.unwrap();
        let host = Dir(tmp.path().join("missing"));
        let err = reconcile(&FILES, store.read_pool(), &host)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ReconcileError::Host(e) if e.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
    }
}
