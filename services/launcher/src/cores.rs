//! vCPU pinning: which host cores a VM's vCPUs get ([`allocate`], with VO grouping) and
//! setting them on qemu's vCPU threads from outside qemu ([`pin_vcpus`]).
//!
//! qemu runs under `-sandbox ...,resourcecontrol=deny` (it may not change its own threads'
//! affinity) and has no option that pins vCPUs, so the launcher, as root, asks QMP
//! `query-cpus-fast` for each vCPU's thread id and sets that thread's affinity with
//! `sched_setaffinity(2)`.
//!
//! The allocation is a pure function of the host's core set and the cores of the live VMs,
//! which the VM table holds (`launcher_vms.host_cores`, written before qemu starts): a
//! restarted launcher rebuilds it from there, and a VM that has stopped or failed no longer
//! counts. Cores are shared when VMs want more vCPUs than there are cores; the allocator
//! spreads first, so a VM gets a core no other VM uses while there is one.

use std::{collections::BTreeMap, path::Path};

use crate::qmp::{Qmp, QmpError};

/// The pinned cores of one live VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreUse {
    pub vo: String,
    /// vCPU i → `cores[i]`.
    pub cores: Vec<u32>,
}

/// The cores for a new VM of `vo` with `vcpus` vCPUs (vCPU i → element i), from `host` (the
/// configured cores, sorted), given the cores `live` VMs hold.
///
/// Per core, the allocator counts the vCPUs placed there. Without grouping it takes the
/// least loaded cores, lowest first. With `vo_grouping` it takes, in order of preference:
/// cores with the fewest vCPUs of *other* VOs, then the least loaded, then the nearest (in
/// `host`'s order) to a core the VO already uses (this VM's own picks included), then the
/// lowest. So a VO's VMs spread over free cores next to each other, and when cores must be
/// shared they share with their own VO first. A VM never gets one core twice unless it has
/// more vCPUs than `host` has cores (then vCPU i gets the (i mod n)-th pick).
pub fn allocate(
    host: &[u32],
    live: &[CoreUse],
    vo: &str,
    vcpus: usize,
    grouping: bool,
) -> Vec<u32> {
    if host.is_empty() || vcpus == 0 {
        return Vec::new();
    }
    // Per host position: (vCPUs of other VOs, all vCPUs, vCPUs of this VO).
    let index: BTreeMap<u32, usize> = host.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let mut load = vec![(0usize, 0usize, 0usize); host.len()];
    for u in live {
        for c in &u.cores {
            if let Some(&i) = index.get(c) {
                load[i].1 += 1;
                if u.vo == vo {
                    load[i].2 += 1;
                } else {
                    load[i].0 += 1;
                }
            }
        }
    }
    let mut picked: Vec<usize> = Vec::new();
    while picked.len() < vcpus.min(host.len()) {
        let own: Vec<usize> = (0..host.len())
            .filter(|i| load[*i].2 > 0 || picked.contains(i))
            .collect();
        let distance = |i: usize| own.iter().map(|o| o.abs_diff(i)).min().unwrap_or(0);
        let best = (0..host.len())
            .filter(|i| !picked.contains(i))
            .min_by_key(|&i| {
                if grouping {
                    (load[i].0, load[i].1, distance(i), i)
                } else {
                    (0, load[i].1, 0, i)
                }
            });
        match best {
            Some(i) => picked.push(i),
            None => break,
        }
    }
    (0..vcpus)
        .filter_map(|v| picked.get(v % picked.len().max(1)).map(|i| host[*i]))
        .collect()
}

/// A pinning problem.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QMP query-cpus-fast answered {0}, without a thread id per vCPU")]
    NoThreads(String),
    #[error("cannot pin vCPU thread {tid} to host core(s) {cores:?}")]
    Affinity {
        tid: i32,
        cores: Vec<u32>,
        #[source]
        source: nix::Error,
    },
}

/// One vCPU as `query-cpus-fast` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuThread {
    pub cpu_index: u32,
    pub thread_id: i32,
}

/// The vCPU threads in a `query-cpus-fast` answer, by `cpu-index`.
pub fn parse_vcpu_threads(answer: &serde_json::Value) -> Result<Vec<VcpuThread>, PinError> {
    let bad = || PinError::NoThreads(answer.to_string());
    let list = answer.as_array().ok_or_else(bad)?;
    let mut threads = Vec::new();
    for cpu in list {
        let field = |name: &str| {
            cpu.get(name)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(bad)
        };
        threads.push(VcpuThread {
            cpu_index: u32::try_from(field("cpu-index")?).map_err(|_| bad())?,
            thread_id: i32::try_from(field("thread-id")?).map_err(|_| bad())?,
        });
    }
    if threads.is_empty() {
        return Err(bad());
    }
    threads.sort_by_key(|t| t.cpu_index);
    Ok(threads)
}

/// Which cores each vCPU thread gets: vCPU i's thread gets `cores[i]` (cycling when there are
/// more vCPUs than cores); a thread that runs several vCPUs (single-threaded TCG) gets all of
/// theirs.
pub fn thread_cores(threads: &[VcpuThread], cores: &[u32]) -> BTreeMap<i32, Vec<u32>> {
    let mut out: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
    if cores.is_empty() {
        return out;
    }
    for (i, t) in threads.iter().enumerate() {
        let core = cores[i % cores.len()];
        let set = out.entry(t.thread_id).or_default();
        if !set.contains(&core) {
            set.push(core);
        }
    }
    out
}

/// Pins the vCPU threads of the qemu behind `qmp_socket` to `cores` (vCPU i → `cores[i]`).
/// Returns each thread and its cores. Idempotent: a restarted launcher pins an adopted qemu
/// again.
pub async fn pin_vcpus(
    qmp_socket: &Path,
    cores: &[u32],
) -> Result<BTreeMap<i32, Vec<u32>>, PinError> {
    let mut qmp = Qmp::connect(qmp_socket).await?;
    let answer = qmp.execute("query-cpus-fast").await?;
    drop(qmp);
    let threads = parse_vcpu_threads(&answer)?;
    let plan = thread_cores(&threads, cores);
    for (tid, cores) in &plan {
        let mut set = nix::sched::CpuSet::new();
        for c in cores {
            set.set(*c as usize).map_err(|source| PinError::Affinity {
                tid: *tid,
                cores: cores.clone(),
                source,
            })?;
        }
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(*tid), &set).map_err(
            |source| PinError::Affinity {
                tid: *tid,
                cores: cores.clone(),
                source,
            },
        )?;
    }
    Ok(plan)
}

/// The CPUs this process may run on (the default host core set).
pub fn own_cpus() -> Vec<u32> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .filter_map(|c| u32::try_from(c).ok())
        .collect()
}

/// `"0,1"` as stored in `launcher_vms.host_cores`.
pub fn to_column(cores: &[u32]) -> String {
    cores
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The column back; `None` for text that is not a comma-separated list of numbers.
pub fn from_column(text: &str) -> Option<Vec<u32>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',').map(|c| c.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(vo: &str, cores: &[u32]) -> CoreUse {
        CoreUse {
            vo: vo.into(),
            cores: cores.to_vec(),
        }
    }

    #[test]
    fn without_grouping_the_least_loaded_lowest_cores_are_taken() {
        let host = [0, 1, 2, 3];
        assert_eq!(allocate(&host, &[], "atlas", 2, false), vec![0, 1]);
        let live = [vm("atlas", &[0, 1]), vm("cms", &[2])];
        assert_eq!(allocate(&host, &live, "cms", 1, false), vec![3]);
        // Full: the least loaded again, spreading.
        let live = [vm("atlas", &[0, 1]), vm("cms", &[2, 3])];
        assert_eq!(allocate(&host, &live, "atlas", 2, false), vec![0, 1]);
        assert_eq!(allocate(&host, &live, "cms", 1, false), vec![0]);
        assert!(allocate(&[], &live, "cms", 1, false).is_empty());
    }

    #[test]
    fn a_vos_vms_share_cores_with_their_own_vo_first() {
        let host = [0, 1, 2, 3];
        // atlas holds 0 and 1, cms 2 and 3: every core is taken.
        let live = [vm("atlas", &[0, 1]), vm("cms", &[2, 3])];
        assert_eq!(allocate(&host, &live, "cms", 2, true), vec![2, 3]);
        assert_eq!(allocate(&host, &live, "atlas", 1, true), vec![0]);
        // Without grouping the same cms VM would sit on atlas's cores.
        assert_eq!(allocate(&host, &live, "cms", 2, false), vec![0, 1]);
        // A VO on no core yet takes the least loaded.
        assert_eq!(allocate(&host, &live, "lhcb", 1, true), vec![0]);
    }

    #[test]
    fn free_cores_next_to_the_vos_own_are_preferred() {
        let host = [0, 1, 2, 3, 4, 5, 6, 7];
        let live = [vm("atlas", &[0]), vm("cms", &[6])];
        assert_eq!(allocate(&host, &live, "cms", 2, true), vec![5, 4]);
        assert_eq!(allocate(&host, &live, "atlas", 3, true), vec![1, 2, 3]);
        // Without grouping: lowest free.
        assert_eq!(allocate(&host, &live, "cms", 2, false), vec![1, 2]);
    }

    #[test]
    fn a_released_vm_frees_its_cores_and_a_rebuild_sees_the_same() {
        let host = [4, 5];
        let a = vm("atlas", &allocate(&host, &[], "atlas", 1, true));
        assert_eq!(a.cores, vec![4]);
        let b = vm(
            "cms",
            &allocate(&host, std::slice::from_ref(&a), "cms", 1, true),
        );
        assert_eq!(b.cores, vec![5]);
        // Both taken: a second atlas VM joins atlas's core.
        let c = allocate(&host, &[a.clone(), b.clone()], "atlas", 1, true);
        assert_eq!(c, vec![4]);
        // atlas's VM stopped (it is no longer in the live list): its core is free again.
        assert_eq!(
            allocate(&host, std::slice::from_ref(&b), "cms", 1, true),
            vec![4]
        );
        // The stored column is what a restarted launcher rebuilds from.
        let stored = to_column(&b.cores);
        let rebuilt = vm("cms", &from_column(&stored).unwrap());
        assert_eq!(rebuilt, b);
        assert_eq!(allocate(&host, &[rebuilt], "atlas", 1, true), vec![4]);
        // Cores outside the set (the config changed) are ignored.
        assert_eq!(
            allocate(&host, &[vm("cms", &[9])], "atlas", 1, true),
            vec![4]
        );
    }

    #[test]
    fn more_vcpus_than_cores_cycle() {
        assert_eq!(allocate(&[0, 1], &[], "atlas", 3, true), vec![0, 1, 0]);
    }

    #[test]
    fn columns_round_trip() {
        assert_eq!(from_column(&to_column(&[3, 1, 2])), Some(vec![3, 1, 2]));
        assert_eq!(from_column(""), Some(vec![]));
        assert_eq!(from_column("1,x"), None);
    }

    #[test]
    fn vcpu_threads_from_query_cpus_fast() {
        let answer = serde_json::json!([
            {"thread-id": 12840, "props": {"core-id": 1}, "qom-path": "/machine/unattached/device[2]", "cpu-index": 1, "target": "x86_64"},
            {"thread-id": 12839, "props": {"core-id": 0}, "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}
        ]);
        let threads = parse_vcpu_threads(&answer).unwrap();
        assert_eq!(
            threads,
            vec![
                VcpuThread {
                    cpu_index: 0,
                    thread_id: 12839
                },
                VcpuThread {
                    cpu_index: 1,
                    thread_id: 12840
                }
            ]
        );
        let plan = thread_cores(&threads, &[5, 3]);
        assert_eq!(plan[&12839], vec![5]);
        assert_eq!(plan[&12840], vec![3]);
        // Single-threaded TCG: one thread runs both vCPUs and gets both cores.
        let shared = [
            VcpuThread {
                cpu_index: 0,
                thread_id: 7,
            },
            VcpuThread {
                cpu_index: 1,
                thread_id: 7,
            },
        ];
        assert_eq!(thread_cores(&shared, &[5, 3])[&7], vec![5, 3]);
        assert!(parse_vcpu_threads(&serde_json::json!([])).is_err());
        assert!(parse_vcpu_threads(&serde_json::json!([{"cpu-index": 0}])).is_err());
        assert!(parse_vcpu_threads(&serde_json::json!({"return": []})).is_err());
    }
}
