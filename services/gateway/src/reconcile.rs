//! Start-up reconciliation: the listeners of prepared rows are the gateway's
//! [`HostResources`]; [`GatewayHandler::reconcile`] re-opens them.

use std::convert::Infallible;

use wnodes_bus::KeyStore;
use wnodes_preparer::HostResources;

use crate::{
    service::GatewayHandler,
    table::{self, Row, Storage},
};

/// Why start-up reconciliation failed (the table only: a listener that cannot be re-opened is
/// logged, not fatal).
pub type ReconcileError = wnodes_preparer::ReconcileError<Infallible>;

impl GatewayHandler {
    /// Re-opens the listeners of every prepared VM (they live in this process). Returns the VMs
    /// whose listener runs afterwards.
    pub async fn reconcile(&self, store: &KeyStore) -> Result<Vec<String>, ReconcileError> {
        let done = wnodes_preparer::reconcile(&table::TABLE, store.pool(), self).await?;
        Ok(done.restored)
    }
}

/// The listeners, for [`wnodes_preparer::reconcile()`]. They live in this process, so nothing of
/// theirs outlives it on the host: there is nothing to find or remove, only listeners to bring
/// back.
impl HostResources<Storage> for GatewayHandler {
    type Error = Infallible;
    type Item = String;

    async fn present(&self) -> Result<Vec<(String, String)>, Infallible> {
        Ok(Vec::new())
    }

    fn held(&self, row: &Row) -> Vec<String> {
        vec![row.vm_id.clone()]
    }

    async fn remove(&self, _vm_id: &String) -> Result<(), Infallible> {
        Ok(())
    }

    async fn restore(&self, row: &Row) -> Result<bool, Infallible> {
        self.ensure_listener(row).await;
        Ok(self.listeners.addr_of(&row.vm_id).is_some())
    }
}
