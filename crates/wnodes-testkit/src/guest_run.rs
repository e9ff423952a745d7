//! The project's own code inside a TCG guest with an SR-IOV NIC: the test guest
//! (`guest/build.sh`) booted on q35 with QEMU's `igb` (Intel 82576: a PF with 7 VFs), plus the
//! igb guest's disk (`guest/build-igb.sh`: the `igb`, `igbvf`, `8021q` and `bridge` modules and
//! their dependencies, iproute2's `ip` and `bridge`) and a per-run disk with the script and the
//! files a test hands in, such as the static `wnodes-guest-probe`
//! (`scripts/build-guest-probe.sh`). The host's kernel has no SR-IOV and no VLANs; the guest's
//! Debian kernel has both. `guest/README.md`, "The igb guest", has the layout and the timings.
//!
//! [`run_in_igb_guest`] runs a shell script there with the probe on `PATH` and returns its
//! stdout, stderr and exit status ([`GuestOutput`]); [`IgbGuest`] adds other files, memory and
//! the timeout. A test lists [`IGB_GUEST_NEEDS`] as its preconditions and holds
//! [`crate::vm::vm_lock`] while the guest runs.
//!
//! Inside the guest the script runs as root, sourced by the payload (`busybox sh`) in a subshell
//! once everything is loaded: the PF is `eth0` (driver `igb`, PCI `0000:00:01.0` with this
//! command line), the handed-in files are in `/run/files` (first on `PATH`), and `ip` and
//! `bridge` are shell functions calling iproute2's (`/run/lab/bin/ip`, `/run/lab/bin/bridge`):
//! busybox's `sh` prefers its own `ip` applet to anything on `PATH`, and that one knows no `vf`.
//! Its stdout goes to ttyS1 (the guest contract's payload channel), its stderr to a fourth
//! serial port, its exit status to the status channel (`WNODES exit=<n>`).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::host::{Precondition, guest_dir, on_path};

/// The MAC of the guest's igb PF.
pub const PF_MAC: &str = "52:54:00:12:34:09";

/// What [`run_in_igb_guest`] needs of the host: qemu, the test guest, the igb guest's disk,
/// the static probe and `mkfs.ext4` (the per-run disk). Not root: qemu runs as the test's user
/// with a user-mode network.
pub const IGB_GUEST_NEEDS: &[Precondition] = &[
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::Other("the igb guest (guest/build-igb.sh)", igb_guest_present),
    Precondition::Other(
        "the static wnodes-guest-probe (scripts/build-guest-probe.sh)",
        probe_present,
    ),
    Precondition::Other("mkfs.ext4", mkfs_present),
];

/// Where `guest/build-igb.sh` leaves its disk: `<workspace>/.cache/guest-igb`.
pub fn igb_guest_dir() -> PathBuf {
    guest_dir().with_file_name("guest-igb")
}

/// The static `wnodes-guest-probe`: `$GUEST_PROBE_BIN`, else where
/// `scripts/build-guest-probe.sh` builds it for the target directory this test was built in
/// (`<target>/guest-probe/x86_64-unknown-linux-gnu/release/`).
pub fn probe_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GUEST_PROBE_BIN") {
        return PathBuf::from(p);
    }
    // <target>/debug/deps/<test binary>
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("guest-probe/x86_64-unknown-linux-gnu/release/wnodes-guest-probe")
}

fn igb_guest_present() -> Result<(), String> {
    let dir = igb_guest_dir();
    match std::fs::File::open(dir.join("lab.ext4")) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "the igb guest ({}/lab.ext4: {e}; run guest/build-igb.sh)",
            dir.display()
        )),
    }
}

fn probe_present() -> Result<(), String> {
    let p = probe_path();
    nix::unistd::access(&p, nix::unistd::AccessFlags::X_OK).map_err(|e| {
        format!(
            "the static wnodes-guest-probe ({}: {e}; run scripts/build-guest-probe.sh)",
            p.display()
        )
    })
}

fn mkfs_present() -> Result<(), String> {
    on_path("mkfs.ext4", "scripts/install-deps.sh vm")
}

/// What a script run in the guest left.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The script's stdout, byte for byte (lossily UTF-8).
    pub stdout: String,
    /// The script's stderr.
    pub stderr: String,
    /// The script's exit status (`128+n`: killed by signal n).
    pub exit_code: i32,
    /// The guest's console (kernel, init and the payload's progress lines), for messages.
    pub console: String,
    /// qemu's start to its exit.
    pub elapsed: Duration,
}

impl GuestOutput {
    /// Everything the guest printed, for an assertion's message.
    pub fn report(&self) -> String {
        format!(
            "exit={} after {:.1?}\n--- stdout\n{}\n--- stderr\n{}\n--- console\n{}",
            self.exit_code, self.elapsed, self.stdout, self.stderr, self.console
        )
    }
}

/// Runs `script` in the igb guest with the static probe in `/run/files`; see [`IgbGuest::run`].
///
/// # Errors
/// As [`IgbGuest::run`].
pub async fn run_in_igb_guest(script: &str, timeout: Duration) -> anyhow::Result<GuestOutput> {
    IgbGuest::new(script)
        .file("wnodes-guest-probe", probe_path())
        .timeout(timeout)
        .run()
        .await
}

/// [`run_in_igb_guest`] for a test whose script must succeed: prints what the guest printed
/// and panics (a test failure) unless the guest ran and the script exited 0; returns the
/// output and its [`GuestOutput::report`] for the test's own assertions.
///
/// # Panics
/// The guest did not run, or the script's exit status is not 0.
#[allow(clippy::panic)] // a failure is a test failure
pub async fn run_in_igb_guest_ok(script: &str, timeout: Duration) -> (GuestOutput, String) {
    let out = match run_in_igb_guest(script, timeout).await {
        Ok(o) => o,
        Err(e) => panic!("the igb guest did not run: {e:#}"),
    };
    let report = out.report();
    eprintln!(
        "igb guest: {:.1?}; what it printed:\n{}",
        out.elapsed, out.stdout
    );
    assert!(out.exit_code == 0, "the script failed\n{report}");
    (out, report)
}

/// One run of the igb guest: the script, the files it gets, memory and a time limit.
#[derive(Debug, Clone)]
pub struct IgbGuest {
    script: String,
    files: Vec<(String, PathBuf)>,
    memory_mib: u32,
    timeout: Duration,
}

/// The payload (`opt/wnodes/job.sh`): mounts the igb guest's disk (`/dev/vdb`) and the run's
/// (`/dev/vdc`), loads the modules, then sources the script in a subshell.
const PROLOGUE: &str = r#"# wnodes_testkit::guest_run: the igb guest's payload
say() { echo "wnodes-lab: $*" >/dev/console; }
fail() { say "FATAL: $*"; exit 126; }
mkdir -p /run/lab /run/files
mount -t ext4 -o ro /dev/vdb /run/lab || fail "cannot mount the igb guest's disk /dev/vdb"
[ -r /run/lab/modules/order ] || fail "/dev/vdb is not the igb guest's disk (no modules/order)"
mount -t ext4 -o ro /dev/vdc /run/files || fail "cannot mount the run's disk /dev/vdc"
[ -r /run/files/script.sh ] || fail "/dev/vdc holds no script.sh"
for m in $(cat /run/lab/modules/order); do
    [ -d "/sys/module/$m" ] || insmod "/run/lab/modules/$m.ko" || fail "insmod $m failed"
done
export PATH="/run/files:/run/lab/bin:$PATH"
ip() { /run/lab/bin/ip "$@"; }
bridge() { /run/lab/bin/bridge "$@"; }
stty -F /dev/ttyS3 raw -echo 2>/dev/null || fail "no fourth serial port for stderr"
say "ready, uptime $(cut -d' ' -f1 /proc/uptime) s"
( . /run/files/script.sh ) 2>/dev/ttyS3
"#;

/// The console line the payload prints once the script is about to run.
const READY: &str = "wnodes-lab: ready";

impl IgbGuest {
    /// A run of `script` with no files, 512 MiB and a 120 s limit.
    pub fn new(script: &str) -> Self {
        Self {
            script: script.to_owned(),
            files: Vec::new(),
            memory_mib: 512,
            timeout: Duration::from_secs(120),
        }
    }

    /// Copies `from` to `/run/files/<name>` (mode 0755).
    #[must_use]
    pub fn file(mut self, name: &str, from: impl Into<PathBuf>) -> Self {
        self.files.push((name.to_owned(), from.into()));
        self
    }

    /// The guest's memory.
    #[must_use]
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// How long qemu may run before it is killed and the run fails.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds the run's disk, boots the guest and waits for it to power off; its logs and the
    /// snapshot overlay go to a temporary directory, removed afterwards.
    ///
    /// # Errors
    /// When a file cannot be copied, `mkfs.ext4` or qemu fails, the guest does not power off
    /// within the timeout, or the guest's setup failed (no `WNODES exit=`, a `WNODES error=`,
    /// or the payload did not get to the script); each names what the guest printed.
    pub async fn run(self) -> anyhow::Result<GuestOutput> {
        let dir = tempfile::Builder::new()
            .prefix("wnodes-igb-guest.")
            .tempdir()
            .context("creating the run's directory")?;
        let dir = dir.path();
        let disk = self.files_disk(dir).await?;
        let job = dir.join("job.sh");
        std::fs::write(&job, PROLOGUE).context("writing the payload")?;
        let guest = guest_dir();
        let lab = igb_guest_dir().join("lab.ext4");
        let serial = |n: &str| format!("file:{}", dir.join(n).display());
        let drive = |p: &Path| format!("file={},format=raw,if=virtio,readonly=on", p.display());
        let qemu_log = std::fs::File::create(dir.join("qemu.log")).context("qemu's log")?;
        let mut qemu = tokio::process::Command::new("qemu-system-x86_64");
        qemu.args([
            "-accel",
            "tcg",
            "-M",
            "q35",
            "-m",
            &self.memory_mib.to_string(),
        ])
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-snapshot"])
        .arg("-kernel")
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", "console=ttyS0 root=/dev/vda panic=-1 quiet"])
        .args(["-drive", &drive(&guest.join("rootfs.ext4"))])
        .args(["-drive", &drive(&lab)])
        .args(["-drive", &drive(&disk)])
        .arg("-fw_cfg")
        .arg(format!("name=opt/wnodes/job.sh,file={}", job.display()))
        .args(["-serial", &serial("console.log")])
        .args(["-serial", &serial("stdout.log")])
        .args(["-serial", &serial("status.log")])
        .args(["-serial", &serial("stderr.log")])
        .args(["-netdev", "user,id=n0,restrict=on"])
        .args(["-device", &format!("igb,netdev=n0,mac={PF_MAC}")])
        .env("TMPDIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(qemu_log)
        .kill_on_drop(true);
        let start = Instant::now();
        let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
        let read = |n: &str| {
            String::from_utf8_lossy(&std::fs::read(dir.join(n)).unwrap_or_default()).into_owned()
        };
        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(status) => status.context("waiting for qemu")?,
            Err(_) => {
                child.kill().await.ok();
                bail!(
                    "the igb guest did not power off within {:?}; console:\n{}",
                    self.timeout,
                    read("console.log")
                );
            }
        };
        let elapsed = start.elapsed();
        if !status.success() {
            bail!(
                "qemu exited with {status}: {}\nconsole:\n{}",
                read("qemu.log").trim(),
                read("console.log")
            );
        }
        outcome(
            &read("status.log"),
            read("console.log"),
            read("stdout.log"),
            read("stderr.log"),
            elapsed,
        )
    }

    /// `dir/files.ext4` (label `wnodes-files`): `script.sh` and the files, made with
    /// `mkfs.ext4 -d` (no mount, no root).
    async fn files_disk(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let staging = dir.join("files");
        std::fs::create_dir(&staging).context("creating the run's staging directory")?;
        std::fs::write(staging.join("script.sh"), &self.script).context("writing script.sh")?;
        let mut bytes = self.script.len() as u64;
        for (name, from) in &self.files {
            if name.is_empty() || name.contains('/') || name == "script.sh" {
                bail!("{name:?} is not a file name the run's disk can hold");
            }
            let to = staging.join(name);
            bytes += std::fs::copy(from, &to)
                .with_context(|| format!("copying {} into the run's disk", from.display()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {name} executable"))?;
        }
        let disk = dir.join("files.ext4");
        // the files, plus room for ext4's own metadata
        let size = (bytes + (8 << 20)).div_ceil(1 << 20) << 20;
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(size))
            .context("creating the run's disk")?;
        let out = tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "wnodes-files", "-d"])
            .arg(&staging)
            .arg(&disk)
            .output()
            .await
            .context("running mkfs.ext4")?;
        if !out.status.success() {
            bail!(
                "mkfs.ext4 -d {} failed ({}): {}",
                staging.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(disk)
    }
}

/// The run's outcome from its status channel and console: the script's exit status, or why the
/// guest never got to run it.
fn outcome(
    status: &str,
    console: String,
    stdout: String,
    stderr: String,
    elapsed: Duration,
) -> anyhow::Result<GuestOutput> {
    let mut exit = None;
    let mut error = None;
    for line in status.lines() {
        if let Some(code) = line.strip_prefix("WNODES exit=") {
            exit = code.trim().parse::<i32>().ok();
        } else if let Some(e) = line.strip_prefix("WNODES error=") {
            error = Some(e.to_owned());
        }
    }
    if let Some(e) = error {
        bail!("the guest's setup failed: {e}\nconsole:\n{console}");
    }
    let Some(exit_code) = exit else {
        bail!("the guest stopped without an exit status (crashed?); console:\n{console}");
    };
    if !console.contains(READY) {
        let why = console
            .lines()
            .find_map(|l| l.split_once("wnodes-lab: FATAL: ").map(|(_, w)| w.trim()))
            .unwrap_or("the payload did not get to the script");
        bail!("the igb guest's payload failed: {why}\nconsole:\n{console}");
    }
    Ok(GuestOutput {
        stdout,
        stderr,
        exit_code,
        console,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(status: &str, console: &str) -> anyhow::Result<GuestOutput> {
        outcome(
            status,
            console.into(),
            "out".into(),
            "err".into(),
            Duration::ZERO,
        )
    }

    const OK_CONSOLE: &str = "wnodes-init: started\r\nwnodes-lab: ready, uptime 4.2 s\r\n";

    #[test]
    fn the_scripts_exit_status_is_the_last_status_line() {
        let out = run(
            "WNODES phase=modules\nWNODES phase=payload-start\nWNODES exit=7\n",
            OK_CONSOLE,
        )
        .unwrap();
        assert_eq!(
            (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
            (7, "out", "err")
        );
    }

    #[test]
    fn a_setup_failure_is_an_error_not_an_exit_status() {
        let e = run(
            "WNODES error=insmod virtio_blk failed\nWNODES exit=121\n",
            "",
        )
        .unwrap_err();
        assert!(e.to_string().contains("insmod virtio_blk failed"), "{e}");
        let e = run(
            "WNODES phase=payload-start\nWNODES exit=126\n",
            "wnodes-lab: FATAL: insmod igb failed\r\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("payload failed: insmod igb failed"),
            "{e}"
        );
    }

    #[test]
    fn no_exit_line_means_the_guest_crashed() {
        let e = run("WNODES phase=modules\n", "Kernel panic").unwrap_err();
        assert!(e.to_string().contains("without an exit status"), "{e}");
    }

    #[test]
    fn the_probe_is_looked_up_next_to_the_test_binarys_target_directory() {
        if std::env::var_os("GUEST_PROBE_BIN").is_none() {
            let p = probe_path();
            assert!(
                p.ends_with("guest-probe/x86_64-unknown-linux-gnu/release/wnodes-guest-probe"),
                "{}",
                p.display()
            );
        }
    }
}
