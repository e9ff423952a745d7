//! The per-VM state directory `<vms_dir>/<vm_id>/`: everything a restarted launcher needs to
//! reattach to (or finish) a VM, kept outside the launcher process.
//!
//! ```text
//! job.json       the job: run, host, VO, owner, VmSpec (protobuf, hex) and trace context
//! job.sh         the payload qemu hands the guest through fw_cfg
//! running.json   written after qemu started: pid, accelerator, start time, usage source
//!                (`{"kind":"cgroup_v1","cpuacct":…,"memory":…}`, `cgroup` (v2) or `proc`)
//! qemu.pid       qemu's own pid file        qmp.sock    QMP socket
//! console.log    ttyS0                      output.log  ttyS1 (payload stdout+stderr)
//! status.log     ttyS2 (`WNODES exit=<n>`)  usage.json  /proc samples (when no cgroup)
//! ```

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::SystemTime,
};

use prost::Message;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use wnodes_proto::v1::{JobRunRef, VmSpec};

use crate::policy::is_valid_vm_id;

/// At most this much of the payload output goes into `VmStopped.output_tail`.
pub const OUTPUT_TAIL_BYTES: u64 = 4096;

/// A state-directory problem.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid VM id {0:?} (expected vm- and 12 lowercase hex digits)")]
    InvalidVmId(String),
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: bad protobuf")]
    Proto {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: bad hex")]
    Hex {
        path: PathBuf,
        #[source]
        source: hex::FromHexError,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// The run, as persisted (the protobuf type has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub site: String,
    pub lrms: i32,
    pub job_id: String,
    pub run_attempt: u32,
}

impl From<&JobRunRef> for RunRecord {
    fn from(r: &JobRunRef) -> Self {
        Self {
            site: r.site.clone(),
            lrms: r.lrms,
            job_id: r.job_id.clone(),
            run_attempt: r.run_attempt,
        }
    }
}

impl From<&RunRecord> for JobRunRef {
    fn from(r: &RunRecord) -> Self {
        Self {
            site: r.site.clone(),
            lrms: r.lrms,
            job_id: r.job_id.clone(),
            run_attempt: r.run_attempt,
        }
    }
}

/// `job.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub vm_id: String,
    pub run_key: String,
    pub run: RunRecord,
    pub host: String,
    pub vo: String,
    pub owner_user: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The `VmSpec` (payload included) as hex-encoded protobuf.
    pub spec_protobuf_hex: String,
    /// W3C trace context (`traceparent`, `tracestate`) of the span that accepted the job.
    pub trace_context: BTreeMap<String, String>,
    pub created_at_ms: u64,
}

impl JobRecord {
    /// Builds the record of a job accepted with `spec`.
    pub fn new(
        run: &JobRunRef,
        host: &str,
        spec: &VmSpec,
        trace_context: BTreeMap<String, String>,
    ) -> Self {
        let owner = spec.owner.clone().unwrap_or_default();
        Self {
            vm_id: spec.vm_id.clone(),
            run_key: wnodes_bus::event::run_key(run),
            run: run.into(),
            host: host.to_owned(),
            vo: spec.vo.clone(),
            owner_user: owner.user,
            owner_uid: owner.uid,
            owner_gid: owner.gid,
            spec_protobuf_hex: hex::encode(spec.encode_to_vec()),
            trace_context,
            created_at_ms: wnodes_proto::time::unix_ms(SystemTime::now()),
        }
    }

    /// The persisted `VmSpec`.
    pub fn spec(&self, path: &Path) -> Result<VmSpec, StateError> {
        let bytes = hex::decode(&self.spec_protobuf_hex).map_err(|source| StateError::Hex {
            path: path.to_path_buf(),
            source,
        })?;
        VmSpec::decode(bytes.as_slice()).map_err(|source| StateError::Proto {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Where the VM's usage is measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UsageSource {
    /// A cgroup v2 directory holding qemu (`cpu.stat`, `memory.peak`).
    Cgroup { path: PathBuf },
    /// cgroup v1 groups holding qemu: `cpuacct` (`cpuacct.usage`) and `memory`
    /// (`memory.max_usage_in_bytes`), and `cpu` (`cpu.cfs_quota_us`: the VM's cores) when the
    /// host has that hierarchy.
    CgroupV1 {
        cpuacct: PathBuf,
        memory: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<PathBuf>,
    },
    /// `/proc/<pid>` samples persisted in `usage.json`.
    Proc,
}

/// `running.json`, written once qemu runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRecord {
    pub pid: u32,
    pub accel: String,
    pub started_at_ms: u64,
    pub cores: u32,
    /// 0 = no limit.
    pub walltime_secs: u64,
    pub usage: UsageSource,
    /// CPU time qemu had already used when the VM started running (its start-up, counted by a
    /// cgroup it was started in), in nanoseconds: subtracted at the end, so that CPU
    /// time and wall time cover the same interval (`vm.running` → `vm.stopped`).
    #[serde(default)]
    pub cpu_at_start_ns: u64,
}

/// Paths of one VM's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    vm_id: String,
    dir: PathBuf,
}

impl VmDir {
    /// `<vms_dir>/<vm_id>`; the id is validated (it becomes a path component).
    pub fn new(vms_dir: &Path, vm_id: &str) -> Result<Self, StateError> {
        if !is_valid_vm_id(vm_id) {
            return Err(StateError::InvalidVmId(vm_id.to_owned()));
        }
        Ok(Self {
            vm_id: vm_id.to_owned(),
            dir: vms_dir.join(vm_id),
        })
    }

    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn job_json(&self) -> PathBuf {
        self.dir.join("job.json")
    }
    pub fn running_json(&self) -> PathBuf {
        self.dir.join("running.json")
    }
    pub fn usage_json(&self) -> PathBuf {
        self.dir.join("usage.json")
    }
    pub fn payload(&self) -> PathBuf {
        self.dir.join("job.sh")
    }
    /// What qemu itself writes (owned by the VM's user when qemu runs as one, see
    /// [`crate::confine`]): pid file, QMP sockets, serial files, its stderr and the
    /// `-snapshot` overlay. The launcher's own records stay one level up, out of qemu's reach.
    pub fn qemu_dir(&self) -> PathBuf {
        self.dir.join("qemu")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.qemu_dir().join("qemu.pid")
    }
    /// qemu's stdout and stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.qemu_dir().join("qemu.log")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.qemu_dir().join("qmp.sock")
    }
    /// A second QMP monitor, only for watching events (the first serves commands: a QMP
    /// socket takes one client at a time).
    pub fn qmp_events_socket(&self) -> PathBuf {
        self.qemu_dir().join("qmp-events.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.qemu_dir().join("console.log")
    }
    pub fn output_log(&self) -> PathBuf {
        self.qemu_dir().join("output.log")
    }
    pub fn status_log(&self) -> PathBuf {
        self.qemu_dir().join("status.log")
    }

    /// Creates the directory and its `qemu/` (mode 0700: payloads and output are private).
    /// The VM directories' parent, when it is made here, gets mode 0711: each VM's qemu (its
    /// own uid) must pass through it to its own directory, and may not list the others.
    pub fn create(&self) -> Result<(), StateError> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = self.dir.parent()
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(parent)
                .map_err(io_err("create directory", parent))?;
        }
        let qemu = self.qemu_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&qemu)
            .map_err(io_err("create directory", &qemu))
    }

    pub fn write_job(&self, job: &JobRecord) -> Result<(), StateError> {
        write_json(&self.job_json(), job)
    }
    pub fn read_job(&self) -> Result<JobRecord, StateError> {
        read_json(&self.job_json())
    }
    pub fn write_running(&self, r: &RunningRecord) -> Result<(), StateError> {
        write_json(&self.running_json(), r)
    }
    /// `None` when qemu was never started for this VM.
    pub fn read_running(&self) -> Result<Option<RunningRecord>, StateError> {
        if !self.running_json().exists() {
            return Ok(None);
        }
        read_json(&self.running_json()).map(Some)
    }

    /// The pid in qemu's pid file, if any.
    pub fn read_pid_file(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// True when `pid` is a live (not zombie) qemu of this VM: its command line names this
    /// VM's directory, so a recycled pid is never mistaken for it.
    pub fn qemu_alive(&self, pid: u32) -> bool {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
            return false;
        };
        let needle = self.dir.as_os_str().as_encoded_bytes();
        if needle.is_empty() || !cmdline.windows(needle.len()).any(|w| w == needle) {
            return false;
        }
        // A zombie has an empty cmdline already; check the state too.
        match std::fs::read_to_string(proc_dir.join("stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// What the guest reported on `status.log`.
    pub fn guest_status(&self) -> GuestStatus {
        let text = std::fs::read(self.status_log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        GuestStatus::parse(&text)
    }

    /// The last [`OUTPUT_TAIL_BYTES`] of the payload output (lossy UTF-8).
    pub fn output_tail(&self) -> Result<String, StateError> {
        let path = self.output_log();
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let len = f.metadata().map_err(io_err("stat", &path))?.len();
        let start = len.saturating_sub(OUTPUT_TAIL_BYTES);
        f.seek(SeekFrom::Start(start))
            .map_err(io_err("seek", &path))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io_err("read", &path))?;
        let mut s = String::from_utf8_lossy(&buf).into_owned();
        // Cut a partial UTF-8 sequence at the start of the window.
        if start > 0 {
            while s.starts_with('\u{fffd}') {
                s.remove(0);
            }
        }
        Ok(s)
    }

    /// The last time qemu wrote a serial file: the best estimate of when it stopped when
    /// nobody watched it exit.
    pub fn last_serial_write(&self) -> Option<SystemTime> {
        [self.console_log(), self.output_log(), self.status_log()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .max()
    }
}

/// Parsed `status.log`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStatus {
    /// The last `WNODES exit=<n>`; `None` when the guest never reported (crash, kill).
    pub exit_code: Option<i32>,
    /// `WNODES error=<message>`: a setup failure in the guest.
    pub error: Option<String>,
    /// The `phase=` lines seen.
    pub phases: Vec<String>,
}

impl GuestStatus {
    pub fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            let Some(rest) = line.trim_end_matches('\r').strip_prefix("WNODES ") else {
                continue;
            };
            if let Some(code) = rest.strip_prefix("exit=") {
                s.exit_code = code.trim().parse().ok();
            } else if let Some(msg) = rest.strip_prefix("error=") {
                s.error = Some(msg.to_owned());
            } else if let Some(p) = rest.strip_prefix("phase=") {
                s.phases.push(p.trim().to_owned());
            }
        }
        s
    }
}

/// The VM directories under `vms_dir` (names that are not VM ids are skipped).
pub fn list(vms_dir: &Path) -> Result<Vec<VmDir>, StateError> {
    let entries = match std::fs::read_dir(vms_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", vms_dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", vms_dir))?;
        if let Some(name) = entry.file_name().to_str()
            && let Ok(vm) = VmDir::new(vms_dir, name)
        {
            out.push(vm);
        }
    }
    out.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    Ok(out)
}

/// Writes JSON atomically (temp file + rename) so a crash never leaves half a file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

/// Writes a file atomically (temp file in the same directory + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // Mode 0600: the launcher's records are its own (a VM's qemu may enter the directory).
    let write = || {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)
    };
    write().map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_log_is_parsed() {
        let s =
            GuestStatus::parse("WNODES phase=modules\nWNODES phase=payload-start\nWNODES exit=3\n");
        assert_eq!(s.exit_code, Some(3));
        assert_eq!(s.phases, ["modules", "payload-start"]);
        assert!(s.error.is_none());
        let s =
            GuestStatus::parse("WNODES phase=modules\nWNODES error=no scratch\nWNODES exit=123\n");
        assert_eq!(
            (s.exit_code, s.error.as_deref()),
            (Some(123), Some("no scratch"))
        );
        assert_eq!(GuestStatus::parse("WNODES phase=modules\n").exit_code, None);
    }

    #[test]
    fn vm_ids_are_validated_and_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert!(VmDir::new(dir.path(), "../etc").is_err());
        assert!(VmDir::new(dir.path(), "vm-0123456789AB").is_err());
        let vm = VmDir::new(dir.path(), "vm-0123456789ab").unwrap();
        vm.create().unwrap();
        std::fs::create_dir(dir.path().join("not-a-vm")).unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![vm.clone()]);
        let run = RunningRecord {
            pid: 42,
            accel: "tcg".into(),
            started_at_ms: 1,
            cores: 1,
            walltime_secs: 0,
            usage: UsageSource::Proc,
            cpu_at_start_ns: 0,
        };
        assert_eq!(vm.read_running().unwrap(), None);
        vm.write_running(&run).unwrap();
        assert_eq!(vm.read_running().unwrap(), Some(run));
        assert!(!vm.qemu_alive(std::process::id()));
        // Files written before cgroup v1 existed still read; the new variant round-trips.
        let old: UsageSource =
            serde_json::from_str(r#"{"kind":"cgroup","path":"/sys/fs/cgroup/wnodes/x"}"#).unwrap();
        assert!(matches!(old, UsageSource::Cgroup { .. }));
        let old: UsageSource = serde_json::from_str(r#"{"kind":"proc"}"#).unwrap();
        assert_eq!(old, UsageSource::Proc);
        let v1 = UsageSource::CgroupV1 {
            cpuacct: "/sys/fs/cgroup/cpuacct/wnodes/vm-0123456789ab".into(),
            memory: "/sys/fs/cgroup/memory/wnodes/vm-0123456789ab".into(),
            cpu: None,
        };
        let json = serde_json::to_string(&v1).unwrap();
        assert!(json.starts_with(r#"{"kind":"cgroup_v1","#), "{json}");
        assert_eq!(serde_json::from_str::<UsageSource>(&json).unwrap(), v1);
        std::fs::write(vm.output_log(), "x".repeat(5000) + "end").unwrap();
        let tail = vm.output_tail().unwrap();
        assert_eq!(tail.len(), OUTPUT_TAIL_BYTES as usize);
        assert!(tail.ends_with("end"));
    }
}
