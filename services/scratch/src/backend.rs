//! [`Volumes`]: the backend a host is configured with (`[scratch] backend`), as the handler and
//! the reconcile see it.

use std::path::PathBuf;

use wnodes_preparer::{HostResources, Row};
use wnodes_proto::v1::HostUser;

use crate::{
    lvm::{Lv, LvmBackend},
    state::Volume,
    volume::{FileBackend, Space, VolumeError},
};

/// The host's scratch volumes: sparse files or logical volumes.
#[derive(Debug, Clone)]
pub enum Volumes {
    File(FileBackend),
    Lvm(LvmBackend),
}

impl Volumes {
    /// The name in configuration and in `ScratchReady.backend`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Lvm(_) => "lvm",
        }
    }

    /// Where the volumes are, for logs and messages.
    pub fn location(&self) -> String {
        match self {
            Self::File(f) => f.dir().display().to_string(),
            Self::Lvm(l) => format!("volume group {}", l.config().vg),
        }
    }

    /// The size of the VM's volume, `None` when there is none.
    pub async fn size_of(&self, vm_id: &str) -> Result<Option<u64>, VolumeError> {
        match self {
            Self::File(f) => f.size_of(vm_id).await,
            Self::Lvm(l) => l.size_of(vm_id).await,
        }
    }

    /// Whether a volume of `on_disk` bytes is what a request of `size` bytes made: the same
    /// size for a file, `size` rounded up to whole extents for an LV.
    pub async fn holds(&self, on_disk: u64, size: u64) -> Result<bool, VolumeError> {
        match self {
            Self::File(_) => Ok(on_disk == size),
            Self::Lvm(l) => {
                let (_, extent) = l.space().await?;
                Ok(on_disk == crate::lvm::round_up(size, extent))
            }
        }
    }

    /// What a new volume may take.
    pub async fn space(&self) -> Result<Space, VolumeError> {
        match self {
            Self::File(f) => f.space().await,
            Self::Lvm(l) => l.space().await.map(|(s, _)| s),
        }
    }

    /// Why `size` bytes cannot be backed, given `space`.
    pub fn refusal(&self, size: u64, space: Space) -> String {
        match self {
            Self::File(_) => format!(
                "requested scratch of {size} bytes cannot be backed: the volume directory's file system has {} bytes available, of which {} are promised to the volumes already there",
                space.available, space.promised
            ),
            Self::Lvm(l) => format!(
                "requested scratch of {size} bytes cannot be backed: volume group {} has {} bytes free",
                l.config().vg,
                space.available
            ),
        }
    }

    /// Creates the VM's volume; returns the path (file) or device (LV) the VM gets.
    pub async fn create(
        &self,
        vm_id: &str,
        run_key: &str,
        size: u64,
        owner: Option<&HostUser>,
    ) -> Result<PathBuf, VolumeError> {
        match self {
            Self::File(f) => f.create(vm_id, size).await,
            Self::Lvm(l) => l.create(vm_id, run_key, size, owner).await,
        }
    }

    /// Removes the VM's volume; returns whether one existed.
    pub async fn remove(&self, vm_id: &str) -> Result<bool, VolumeError> {
        match self {
            Self::File(f) => f.remove(vm_id).await,
            Self::Lvm(l) => l.remove(vm_id).await,
        }
    }

    /// What names the VM's volume in a release's detail.
    pub fn name_of(&self, vm_id: &str) -> String {
        match self {
            Self::File(f) => f.path_of(vm_id).display().to_string(),
            Self::Lvm(l) => format!("logical volume {}", l.lv_path(vm_id)),
        }
    }
}

/// One volume found on the host.
#[derive(Debug)]
pub enum Found {
    File(String),
    Lv(Lv),
}

/// The volumes, for [`wnodes_preparer::reconcile()`]: a prepared row holds its VM's file or
/// LV. An LV whose tag says released, or that names no VM, is never held.
impl HostResources<Volume> for Volumes {
    type Error = VolumeError;
    type Item = Found;

    async fn present(&self) -> Result<Vec<(String, Found)>, VolumeError> {
        Ok(match self {
            Self::File(f) => f
                .list()
                .await?
                .into_iter()
                .map(|id| (id.clone(), Found::File(id)))
                .collect(),
            Self::Lvm(l) => l
                .list()
                .await?
                .into_iter()
                .map(|lv| {
                    let key = match lv.vm_id() {
                        Some(vm) if !lv.is_released() && vm == lv.name => vm.to_owned(),
                        _ => format!("released or unnamed: {}", lv.name),
                    };
                    (key, Found::Lv(lv))
                })
                .collect(),
        })
    }

    fn held(&self, row: &Row<Volume>) -> Vec<String> {
        vec![row.vm_id.clone()]
    }

    async fn remove(&self, item: &Found) -> Result<(), VolumeError> {
        match (self, item) {
            (Self::File(f), Found::File(id)) => f.remove(id).await.map(drop),
            (Self::Lvm(l), Found::Lv(lv)) => l.remove_lv(lv).await,
            _ => Ok(()),
        }
    }
}
