//! Start-up reconciliation: the listeners of prepared rows and their NFS exports are the
//! gateway's [`HostResources`]; [`GatewayHandler::reconcile`] re-opens the listeners, re-adds
//! the exports of prepared rows, and withdraws every export in the gateway's id range that no
//! prepared row holds (a VM stopped while the gateway was down, a crash between adding an
//! export and recording it).

use wnodes_bus::KeyStore;
use wnodes_preparer::HostResources;

use crate::{
    nfs::{NfsError, Present},
    service::GatewayHandler,
    table::{self, Row, Storage},
};

/// Why start-up reconciliation failed (the table, or the NFS server's list or removal; a
/// listener that cannot be re-opened is logged, not fatal).
pub type ReconcileError = wnodes_preparer::ReconcileError<NfsError>;

impl GatewayHandler {
    /// Re-opens the listeners and re-adds the NFS exports of every prepared VM, and withdraws
    /// the exports nobody holds. Returns the VMs served afterwards.
    pub async fn reconcile(&self, store: &KeyStore) -> Result<Vec<String>, ReconcileError> {
        let done = wnodes_preparer::reconcile(&table::TABLE, store.pool(), self).await?;
        Ok(done.restored)
    }
}

fn nfs_key(id: u16) -> String {
    format!("nfs:{id}")
}

/// Listeners live in this process (nothing of theirs outlives it: only brought back); NFS
/// exports live in the NFS server (listed, withdrawn when nobody holds them, re-added).
impl HostResources<Storage> for GatewayHandler {
    type Error = NfsError;
    type Item = Present;

    async fn present(&self) -> Result<Vec<(String, Present)>, NfsError> {
        let Some(server) = &self.nfs else {
            return Ok(Vec::new());
        };
        Ok(server
            .list()
            .await?
            .into_iter()
            .map(|p| (nfs_key(p.id), p))
            .collect())
    }

    fn held(&self, row: &Row) -> Vec<String> {
        row.detail
            .nfs
            .as_ref()
            .map(|n| vec![nfs_key(n.id)])
            .unwrap_or_default()
    }

    async fn remove(&self, item: &Present) -> Result<(), NfsError> {
        match &self.nfs {
            Some(server) => server.remove(item.id, &item.path).await,
            None => Ok(()),
        }
    }

    async fn restore(&self, row: &Row) -> Result<bool, NfsError> {
        Ok(self.ensure_served(row).await)
    }
}
