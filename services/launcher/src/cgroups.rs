//! Cgroup housekeeping on start: the per-VM groups (`wnodes/vm-*`) of finished or unknown VMs
//! are removed; those of live VMs are left to their watchers.

use wnodes_bus::ErrorChain;

use crate::{
    state::{LauncherError, LauncherState},
    usage,
    vm_dir::VmDir,
    vm_table::VmState,
};

impl LauncherState {
    /// On start: removes the per-VM cgroups (`wnodes/vm-*`) of VMs that are finished
    /// (`stopped`, `failed`) or unknown (no state directory). Groups of VMs still preparing,
    /// launching or running are kept (their watcher reads and removes them), and so are those
    /// of a VM directory without a row (left alone, like the directory). Only empty groups can
    /// be removed: a group still holding a process stays and is logged.
    pub async fn reconcile_cgroups(&self) -> Result<(), LauncherError> {
        let Some(host) = &self.cgroups else {
            return Ok(());
        };
        for (vm_id, dirs) in usage::list_groups(host) {
            let vm = VmDir::new(&self.vms_dir, &vm_id)?;
            let known = vm.dir().exists();
            let state = if known {
                self.load(&vm_id).await?.map(|r| r.state)
            } else {
                None
            };
            if !cgroup_is_stale(known, state) {
                continue;
            }
            for dir in dirs {
                match usage::remove_group_dir(&dir) {
                    Ok(()) => {
                        tracing::info!(vm_id, group = %dir.display(), "Removed a leftover cgroup.")
                    }
                    Err(e) => {
                        tracing::warn!(vm_id, error = %ErrorChain(&e), "Cannot remove a leftover cgroup.")
                    }
                }
            }
        }
        Ok(())
    }
}

/// True when a VM's leftover cgroup can go: the VM has no state directory here (unknown), or
/// its row says it is finished. A directory without a row is left alone.
fn cgroup_is_stale(has_state_dir: bool, state: Option<VmState>) -> bool {
    match (has_state_dir, state) {
        (false, _) => true,
        (true, Some(s)) => matches!(s, VmState::Stopped | VmState::Failed),
        (true, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroups_of_finished_or_unknown_vms_are_stale() {
        assert!(cgroup_is_stale(false, None));
        assert!(cgroup_is_stale(true, Some(VmState::Stopped)));
        assert!(cgroup_is_stale(true, Some(VmState::Failed)));
        for live in [VmState::Preparing, VmState::Launching, VmState::Running] {
            assert!(!cgroup_is_stale(true, Some(live)), "{live:?}");
        }
        assert!(
            !cgroup_is_stale(true, None),
            "a directory without a row is left alone"
        );
    }
}
