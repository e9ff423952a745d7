//! The qemu command line (`guest/README.md`, "Guest contract"), the payload script, and
//! starting qemu detached.
//!
//! qemu is started with `-daemonize`: it detaches itself (`setsid`) once initialised, writes
//! `qemu.pid`, and is reparented away from the launcher, so it survives a launcher crash or
//! restart. The launcher never kills it on drop. No shell is involved anywhere: qemu gets an
//! argument vector, and every value spliced into an option string (paths, tap names, MACs,
//! kernel parameters) is validated first.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use wnodes_proto::v1::{
    ImageReady, JobPayload, NetworkMode, NetworkReady, ScratchReady, StorageReady, VmSpec,
    job_payload,
};

use crate::{
    config::Accel,
    usage::{self, CgroupHost},
    vmstate::{RunningRecord, UsageSource, VmDir},
};

/// In user-mode networking the guest is 10.0.2.15/24 and reaches the host's 127.0.0.1 as
/// 10.0.2.2.
pub const USER_NET_GUEST: &str = "10.0.2.15/24";
pub const USER_NET_HOST: &str = "10.0.2.2";

/// How long qemu may take to initialise before `-daemonize` returns.
const DAEMONIZE_TIMEOUT: Duration = Duration::from_secs(60);

/// `sh -c` program run as `sh -c JOIN_CGROUPS_AND_EXEC wnodes-qemu <cgroup.procs>... -- <qemu>
/// <args>...`: joins each group (re-creating a directory that vanished) and execs qemu. Paths
/// and arguments are positional parameters, never interpolated into the program text. A group
/// it cannot join is skipped silently: the launcher checks the daemon's membership afterwards.
pub const JOIN_CGROUPS_AND_EXEC: &str = r#"for f; do shift; [ "$f" = -- ] && break; { mkdir -p "${f%/*}"; echo $$ > "$f"; } 2>/dev/null; done; exec "$@""#;

/// A launch problem.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what} {value:?} is not usable on the qemu command line: {why}")]
    BadValue {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("payload: {0}")]
    Payload(String),
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu did not finish initialising within {0:?}")]
    Timeout(Duration),
    #[error("qemu failed to start ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("qemu started but its pid file {0} is missing or unreadable")]
    NoPid(PathBuf),
    #[error(transparent)]
    State(#[from] crate::vmstate::StateError),
}

fn bad(what: &'static str, value: &str, why: &'static str) -> QemuError {
    QemuError::BadValue {
        what,
        value: value.to_owned(),
        why,
    }
}

/// A host path that can be spliced into a qemu option value: absolute, UTF-8, no `,` (the
/// option separator) and no control characters.
pub fn option_path<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, QemuError> {
    let s = path
        .to_str()
        .ok_or_else(|| bad(what, &path.display().to_string(), "not UTF-8"))?;
    if !path.is_absolute() {
        return Err(bad(what, s, "must be an absolute path"));
    }
    if s.contains(',') || s.chars().any(char::is_control) {
        return Err(bad(what, s, "must not contain ',' or control characters"));
    }
    Ok(s)
}

/// A value for the kernel command line: printable ASCII without spaces, quotes or backslashes.
fn kernel_value<'a>(what: &'static str, v: &'a str) -> Result<&'a str, QemuError> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\'))
    {
        return Err(bad(
            what,
            v,
            "must be printable ASCII without spaces, quotes or backslashes",
        ));
    }
    Ok(v)
}

fn check_mac(mac: &str) -> Result<&str, QemuError> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(mac)
    } else {
        Err(bad("MAC address", mac, "expected xx:xx:xx:xx:xx:xx"))
    }
}

fn check_tap(tap: &str) -> Result<&str, QemuError> {
    if !tap.is_empty()
        && tap.len() <= 15
        && tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        Ok(tap)
    } else {
        Err(bad("tap name", tap, "expected 1-15 of A-Z a-z 0-9 - _"))
    }
}

fn check_cidr(addr: &str) -> Result<&str, QemuError> {
    let ok = addr.split_once('/').is_some_and(|(ip, prefix)| {
        ip.parse::<Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
    });
    if ok {
        Ok(addr)
    } else {
        Err(bad("guest address", addr, "expected IPv4/prefix"))
    }
}

fn check_ip(ip: &str) -> Result<&str, QemuError> {
    ip.parse::<Ipv4Addr>()
        .map(|_| ip)
        .map_err(|_| bad("IPv4 address", ip, "not an IPv4 address"))
}

/// Everything a VM's command line is made of.
#[derive(Debug, Clone, Copy)]
pub struct LaunchInputs<'a> {
    pub accel: Accel,
    pub vm: &'a VmDir,
    pub spec: &'a VmSpec,
    pub image: &'a ImageReady,
    /// `None` or an empty path: no scratch disk.
    pub scratch: Option<&'a ScratchReady>,
    /// `None`: no network.
    pub network: Option<&'a NetworkReady>,
    /// `None` or port 0: nothing to mount.
    pub storage: Option<&'a StorageReady>,
}

/// The qemu arguments (without the binary) for `inputs`.
pub fn build_args(inputs: &LaunchInputs<'_>) -> Result<Vec<String>, QemuError> {
    let vm = inputs.vm;
    let spec = inputs.spec;
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    let mem_mib = spec.memory_bytes.div_ceil(1024 * 1024).max(16);
    push(&["-accel", inputs.accel.as_str(), "-M", "pc"]);
    push(&[
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        &spec.cores.max(1).to_string(),
    ]);
    push(&["-nodefaults", "-display", "none", "-no-reboot", "-snapshot"]);
    push(&["-name", &format!("wnodes-{}", vm.vm_id())]);

    // Kernel parameters.
    let mut kparams: Vec<String> = vec![
        "console=ttyS0".into(),
        "root=/dev/vda".into(),
        "panic=-1".into(),
        "quiet".into(),
    ];
    let net_mode = inputs.network.map(|n| n.mode);
    let user_net = net_mode == Some(NetworkMode::User as i32);
    if let Some(n) = inputs.network {
        if user_net {
            kparams.push(format!("wnodes.ip={USER_NET_GUEST}"));
            kparams.push(format!("wnodes.gw={USER_NET_HOST}"));
        } else {
            if !n.address.is_empty() {
                kparams.push(format!("wnodes.ip={}", check_cidr(&n.address)?));
            }
            if !n.gateway.is_empty() {
                kparams.push(format!("wnodes.gw={}", check_ip(&n.gateway)?));
            }
        }
    }
    if let Some(s) = inputs.storage.filter(|s| s.port != 0) {
        let host = if user_net {
            USER_NET_HOST
        } else {
            check_ip(&s.address)?
        };
        let path = kernel_value("storage remote path", &s.remote_path)?;
        kparams.push(format!("wnodes.sshfs={host}:{}:{path}", s.port));
    }
    let scratch = inputs.scratch.filter(|s| !s.path.is_empty());
    if scratch.is_some() {
        kparams.push("wnodes.scratch=/dev/vdb".into());
    }
    if let Some(owner) = spec.owner.as_ref().filter(|o| o.uid != 0) {
        kparams.push(format!("wnodes.uid={}", owner.uid));
        kparams.push(format!("wnodes.gid={}", owner.gid));
    }

    let image = inputs.image;
    if !image.kernel_path.is_empty() {
        let k = option_path("kernel", Path::new(&image.kernel_path))?;
        push(&["-kernel", k]);
        if !image.initrd_path.is_empty() {
            let i = option_path("initrd", Path::new(&image.initrd_path))?;
            push(&["-initrd", i]);
        }
        push(&["-append", &kparams.join(" ")]);
    }
    let format = match image.format.as_str() {
        "" | "raw" => "raw",
        "qcow2" => "qcow2",
        other => return Err(bad("image format", other, "expected raw or qcow2")),
    };
    let img = option_path("image", Path::new(&image.path))?;
    push(&[
        "-drive",
        &format!("file={img},format={format},if=virtio,readonly=on"),
    ]);
    if let Some(s) = scratch {
        let p = option_path("scratch disk", Path::new(&s.path))?;
        if !(s.format.is_empty() || s.format == "raw") {
            return Err(bad("scratch format", &s.format, "expected raw"));
        }
        push(&[
            "-drive",
            &format!("file={p},format=raw,if=virtio,snapshot=off"),
        ]);
    }
    let payload = vm.payload();
    let payload = option_path("payload", &payload)?;
    push(&["-fw_cfg", &format!("name=opt/wnodes/job.sh,file={payload}")]);
    for log in [vm.console_log(), vm.output_log(), vm.status_log()] {
        let p = option_path("serial file", &log)?;
        push(&["-serial", &format!("file:{p}")]);
    }
    if let Some(n) = inputs.network {
        let mac = check_mac(&n.mac)?;
        if user_net {
            push(&["-netdev", "user,id=n0"]);
        } else {
            let tap = check_tap(&n.tap)?;
            push(&[
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ]);
        }
        push(&["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
    }
    let qmp = vm.qmp_socket();
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            option_path("QMP socket", &qmp)?
        ),
    ]);
    let events = vm.qmp_events_socket();
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            option_path("QMP event socket", &events)?
        ),
    ]);
    let pid = vm.pid_file();
    push(&["-pidfile", option_path("pid file", &pid)?, "-daemonize"]);
    Ok(a)
}

/// Quotes `s` for POSIX sh: single quotes, each `'` written as `'\''`.
pub fn sh_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

fn no_nul(what: &str, s: &str) -> Result<(), QemuError> {
    if s.contains('\0') {
        return Err(QemuError::Payload(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

/// The script the guest runs: environment exports, `cd` to the working directory, then the
/// inline script verbatim or the command (`exec` with every word single-quoted).
pub fn payload_script(payload: &JobPayload) -> Result<Vec<u8>, QemuError> {
    let mut head = String::new();
    for (name, value) in &payload.environment {
        let valid = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(QemuError::Payload(format!(
                "environment variable name {name:?} is not a valid shell name"
            )));
        }
        no_nul("an environment value", value)?;
        head.push_str(&format!("export {name}={}\n", sh_quote(value)));
    }
    if !payload.working_dir.is_empty() {
        no_nul("the working directory", &payload.working_dir)?;
        head.push_str(&format!(
            "cd {} || exit 125\n",
            sh_quote(&payload.working_dir)
        ));
    }
    match &payload.kind {
        Some(job_payload::Kind::InlineScript(script)) => {
            let mut out = head.into_bytes();
            out.extend_from_slice(script);
            if !script.ends_with(b"\n") {
                out.push(b'\n');
            }
            Ok(out)
        }
        Some(job_payload::Kind::Command(cmd)) => {
            if cmd.executable.is_empty() {
                return Err(QemuError::Payload("the command has no executable".into()));
            }
            let mut line = String::from("exec");
            for word in std::iter::once(&cmd.executable).chain(&cmd.args) {
                no_nul("a command argument", word)?;
                line.push(' ');
                line.push_str(&sh_quote(word));
            }
            Ok(format!("{head}{line}\n").into_bytes())
        }
        Some(job_payload::Kind::ScriptRef(_)) => Err(QemuError::Payload(
            "script_ref payloads are not supported".into(),
        )),
        None => Err(QemuError::Payload("the job has no payload".into())),
    }
}

/// A qemu that initialised and daemonized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// The daemon's pid (from qemu's pid file).
    pub pid: u32,
    /// Where its usage is measured.
    pub usage: UsageSource,
    /// With a cgroup: the daemon was already in the group(s) when checked, i.e. it inherited
    /// them from the foreground qemu (otherwise it was moved there afterwards, and the CPU
    /// time it used before that is not counted).
    pub daemon_inherited: bool,
}

fn kill(pid: u32) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Writes the payload file, runs qemu (which daemonizes) and returns qemu's pid. qemu's
/// `-snapshot` overlay goes to the VM directory (`TMPDIR`).
///
/// With `cgroups`, the VM's group(s) are created first and qemu is started in them: a `sh`
/// ([`JOIN_CGROUPS_AND_EXEC`]) writes its own pid into each group's `cgroup.procs` and then
/// execs qemu, so qemu and the daemon it forks are in the groups from their first instruction
/// and all of qemu's CPU time and memory is counted (moving the foreground qemu after `spawn()`
/// raced with its fork). The daemon's membership is checked (and, if it is missing, the
/// daemon is moved in). Any cgroup failure falls back to `/proc` samples.
pub async fn spawn_detached(
    binary: &Path,
    vm: &VmDir,
    payload: &JobPayload,
    args: &[String],
    cgroups: Option<&CgroupHost>,
) -> Result<Spawned, QemuError> {
    let script = payload_script(payload)?;
    crate::vmstate::write_atomic(&vm.payload(), &script)?;
    // A stale pid file from an earlier attempt must not be taken for this qemu.
    let _ = std::fs::remove_file(vm.pid_file());
    let vm_id = vm.vm_id();
    let group = cgroups.and_then(|host| match host.create(vm_id) {
        Ok(source) => Some(source),
        Err(e) => {
            tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&e), "No cgroup for the VM; sampling /proc.");
            None
        }
    });
    let mut command = match &group {
        Some(g) => {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg(JOIN_CGROUPS_AND_EXEC).arg("wnodes-qemu");
            c.args(usage::group_dirs(g).iter().map(|d| d.join("cgroup.procs")));
            c.arg("--").arg(binary);
            c
        }
        None => tokio::process::Command::new(binary),
    };
    let spawned = command
        .args(args)
        .env("TMPDIR", vm.dir())
        .current_dir(vm.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let child = match spawned {
        Ok(c) => c,
        Err(source) => {
            if let Some(g) = &group {
                usage::remove_groups(vm_id, g);
            }
            return Err(QemuError::Spawn {
                binary: binary.to_path_buf(),
                source,
            });
        }
    };
    // The foreground qemu exits once the daemon is initialised; the daemon itself has its
    // stdio on /dev/null by then, so the pipes close.
    let waited = tokio::time::timeout(DAEMONIZE_TIMEOUT, child.wait_with_output()).await;
    match waited {
        Ok(Ok(out)) if out.status.success() => {}
        other => {
            // The group goes too; one still busy (a qemu stuck initialising) is left to the
            // reconciliation at the next launcher start.
            if let Some(g) = &group {
                usage::remove_groups(vm_id, g);
            }
            return Err(match other {
                Err(_) => QemuError::Timeout(DAEMONIZE_TIMEOUT),
                Ok(Err(source)) => QemuError::Spawn {
                    binary: binary.to_path_buf(),
                    source,
                },
                Ok(Ok(out)) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let stderr: String = stderr.trim().chars().take(2000).collect();
                    QemuError::Failed {
                        status: out.status.to_string(),
                        stderr,
                    }
                }
            });
        }
    }
    let pid = vm
        .read_pid_file()
        .ok_or_else(|| QemuError::NoPid(vm.pid_file()))?;
    let Some(source) = group else {
        return Ok(Spawned {
            pid,
            usage: UsageSource::Proc,
            daemon_inherited: false,
        });
    };
    if usage::contains(&source, pid) {
        return Ok(Spawned {
            pid,
            usage: source,
            daemon_inherited: true,
        });
    }
    tracing::warn!(
        vm_id,
        pid,
        "The qemu daemon did not inherit its cgroup; moving it there now (its start-up is not counted)."
    );
    match usage::attach(vm_id, &source, pid) {
        Ok(()) => Ok(Spawned {
            pid,
            usage: source,
            daemon_inherited: false,
        }),
        Err(e) => {
            tracing::warn!(vm_id, error = %wnodes_bus::ErrorChain(&e), "Cannot move qemu into its cgroup; sampling /proc.");
            usage::remove_groups(vm_id, &source);
            Ok(Spawned {
                pid,
                usage: UsageSource::Proc,
                daemon_inherited: false,
            })
        }
    }
}

/// Starts a VM: writes the payload, runs qemu detached inside its own cgroup(s) when the host
/// allows (else usage comes from `/proc` samples, see [`crate::usage`]), and writes
/// `running.json`.
pub async fn launch(
    binary: &Path,
    inputs: &LaunchInputs<'_>,
    cgroups: Option<&CgroupHost>,
) -> Result<RunningRecord, QemuError> {
    let vm = inputs.vm;
    vm.create()?;
    let payload = inputs
        .spec
        .payload
        .as_ref()
        .ok_or_else(|| QemuError::Payload("the job has no payload".into()))?;
    let args = build_args(inputs)?;
    let spawned = spawn_detached(binary, vm, payload, &args, cgroups).await?;
    // The VM runs from the moment qemu has initialised and detached (what `vm.running`
    // reports): the usage record's wall time is measured from here, and qemu's start-up CPU
    // time still counts in its CPU seconds.
    let started_at_ms = crate::vmstate::unix_ms(std::time::SystemTime::now());
    let pid = spawned.pid;
    let running = RunningRecord {
        pid,
        accel: inputs.accel.as_str().to_owned(),
        started_at_ms,
        cores: inputs.spec.cores.max(1),
        walltime_secs: inputs
            .spec
            .walltime
            .as_ref()
            .map(|w| u64::try_from(w.seconds).unwrap_or(0))
            .unwrap_or(0),
        cpu_at_start_ns: cpu_used_so_far(vm.vm_id(), &spawned.usage, pid),
        usage: spawned.usage,
    };
    if let Err(e) = vm.write_running(&running) {
        // The launch is reported as failed: a qemu nobody would watch must not keep running.
        kill(pid);
        return Err(e.into());
    }
    Ok(running)
}

/// CPU time qemu has used so far (its start-up), in nanoseconds; 0 when it cannot be read.
fn cpu_used_so_far(vm_id: &str, source: &UsageSource, pid: u32) -> u64 {
    let sample = match source {
        UsageSource::Proc => crate::usage::sample_proc(pid),
        cgroup => crate::usage::read_source(vm_id, cgroup).ok(),
    };
    sample.map_or(0, |s| (s.cpu_seconds * 1e9) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_proto::v1::{JobCommand, JobOwner};

    fn fixture(dir: &Path) -> (VmDir, VmSpec, ImageReady) {
        let vm = VmDir::new(dir, "vm-0123456789ab").unwrap();
        let spec = VmSpec {
            vm_id: "vm-0123456789ab".into(),
            cores: 2,
            memory_bytes: 256 * 1024 * 1024,
            owner: Some(JobOwner {
                user: "alice".into(),
                uid: 1000,
                gid: 100,
            }),
            ..Default::default()
        };
        let image = ImageReady {
            path: "/img/rootfs.ext4".into(),
            format: "raw".into(),
            kernel_path: "/img/vmlinux".into(),
            initrd_path: "/img/initrd.img".into(),
            ..Default::default()
        };
        (vm, spec, image)
    }

    #[test]
    fn command_line_follows_the_guest_contract() {
        let (vm, spec, image) = fixture(Path::new("/state/vms"));
        let scratch = ScratchReady {
            path: "/state/scratch/vm-0123456789ab.img".into(),
            format: "raw".into(),
            ..Default::default()
        };
        let net = NetworkReady {
            mode: NetworkMode::VirtioTap as i32,
            tap: "wn-0123456789ab".into(),
            mac: "52:54:00:12:34:56".into(),
            address: "10.231.1.2/24".into(),
            gateway: "10.231.1.1".into(),
            ..Default::default()
        };
        let storage = StorageReady {
            address: "10.231.1.1".into(),
            port: 2222,
            remote_path: "/home/alice".into(),
            ..Default::default()
        };
        let args = build_args(&LaunchInputs {
            accel: Accel::Tcg,
            vm: &vm,
            spec: &spec,
            image: &image,
            scratch: Some(&scratch),
            network: Some(&net),
            storage: Some(&storage),
        })
        .unwrap();
        let d = "/state/vms/vm-0123456789ab";
        let expected: Vec<String> = [
            "-accel", "tcg", "-M", "pc", "-m", "256M", "-smp", "2", "-nodefaults", "-display",
            "none", "-no-reboot", "-snapshot", "-name", "wnodes-vm-0123456789ab",
            "-kernel", "/img/vmlinux", "-initrd", "/img/initrd.img", "-append",
            "console=ttyS0 root=/dev/vda panic=-1 quiet wnodes.ip=10.231.1.2/24 wnodes.gw=10.231.1.1 wnodes.sshfs=10.231.1.1:2222:/home/alice wnodes.scratch=/dev/vdb wnodes.uid=1000 wnodes.gid=100",
            "-drive", "file=/img/rootfs.ext4,format=raw,if=virtio,readonly=on",
            "-drive", "file=/state/scratch/vm-0123456789ab.img,format=raw,if=virtio,snapshot=off",
            "-fw_cfg", &format!("name=opt/wnodes/job.sh,file={d}/job.sh"),
            "-serial", &format!("file:{d}/console.log"),
            "-serial", &format!("file:{d}/output.log"),
            "-serial", &format!("file:{d}/status.log"),
            "-netdev", "tap,id=n0,ifname=wn-0123456789ab,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-qmp", &format!("unix:{d}/qmp.sock,server=on,wait=off"),
            "-qmp", &format!("unix:{d}/qmp-events.sock,server=on,wait=off"),
            "-pidfile", &format!("{d}/qemu.pid"), "-daemonize",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(args, expected);
    }

    #[test]
    fn user_mode_networking_points_sshfs_at_the_host() {
        let (vm, mut spec, image) = fixture(Path::new("/s"));
        spec.owner = None;
        let net = NetworkReady {
            mode: NetworkMode::User as i32,
            mac: "52:54:00:00:00:01".into(),
            ..Default::default()
        };
        let storage = StorageReady {
            address: "127.0.0.1".into(),
            port: 40000,
            remote_path: "/export".into(),
            ..Default::default()
        };
        let args = build_args(&LaunchInputs {
            accel: Accel::Kvm,
            vm: &vm,
            spec: &spec,
            image: &image,
            scratch: None,
            network: Some(&net),
            storage: Some(&storage),
        })
        .unwrap();
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.ends_with(
            "wnodes.ip=10.0.2.15/24 wnodes.gw=10.0.2.2 wnodes.sshfs=10.0.2.2:40000:/export"
        ));
        assert!(args.windows(2).any(|w| w == ["-netdev", "user,id=n0"]));
        assert!(args.windows(2).any(|w| w == ["-accel", "kvm"]));
        assert!(!args.iter().any(|a| a.contains("snapshot=off")));
    }

    #[test]
    fn hostile_values_are_refused() {
        let dir = Path::new("/s");
        let (vm, spec, mut image) = fixture(dir);
        let inputs = |image: &ImageReady, net: Option<&NetworkReady>| {
            build_args(&LaunchInputs {
                accel: Accel::Tcg,
                vm: &vm,
                spec: &spec,
                image,
                scratch: None,
                network: net,
                storage: None,
            })
        };
        image.path = "/img/a,file=/etc/shadow".into();
        assert!(inputs(&image, None).is_err());
        image.path = "relative.img".into();
        assert!(inputs(&image, None).is_err());
        let (_, _, image) = fixture(dir);
        let mut net = NetworkReady {
            mode: NetworkMode::VirtioTap as i32,
            tap: "wn0,script=/x".into(),
            mac: "52:54:00:00:00:01".into(),
            ..Default::default()
        };
        assert!(inputs(&image, Some(&net)).is_err());
        net.tap = "wn0".into();
        net.address = "10.0.0.1/24 init=/bin/sh".into();
        assert!(inputs(&image, Some(&net)).is_err());
        net.address = String::new();
        net.mac = "52:54:00:00:00:01,x=y".into();
        assert!(inputs(&image, Some(&net)).is_err());
    }

    #[test]
    fn command_payload_quotes_every_word() {
        let hostile = "'; rm -rf / #";
        let payload = JobPayload {
            kind: Some(job_payload::Kind::Command(JobCommand {
                executable: "/bin/echo".into(),
                args: vec![hostile.into(), "$HOME `id`".into()],
            })),
            environment: [("GREETING".to_string(), "it's $x".to_string())].into(),
            working_dir: "/scratch/my dir".into(),
        };
        let script = String::from_utf8(payload_script(&payload).unwrap()).unwrap();
        assert_eq!(
            script,
            "export GREETING='it'\\''s $x'\ncd '/scratch/my dir' || exit 125\n\
             exec '/bin/echo' ''\\''; rm -rf / #' '$HOME `id`'\n"
        );
        let bad_env = JobPayload {
            environment: [("A;B".to_string(), "x".to_string())].into(),
            ..payload.clone()
        };
        assert!(payload_script(&bad_env).is_err());
        let inline = JobPayload {
            kind: Some(job_payload::Kind::InlineScript(b"echo hi; exit 3".to_vec())),
            ..Default::default()
        };
        assert_eq!(payload_script(&inline).unwrap(), b"echo hi; exit 3\n");
    }

    #[test]
    fn sh_quote_round_trips_through_a_real_shell() {
        let hostile = "'; rm -rf / # \" $(id) `x` \\ \n end";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", sh_quote(hostile)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), hostile);
    }
}
