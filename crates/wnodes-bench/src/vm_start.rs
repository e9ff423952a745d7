//! `vm-start`: one job through the whole WNoDeS stack vs the same guest under a bare qemu.
//!
//! - **wnodes**: `wnodes-bridge submit` of a trivial payload (`Stack::submit`), timed from
//!   spawning the job starter to its exit; the image cache is warm (one untimed warm-up job).
//! - **bare**: `qemu-system-x86_64` with the command line the launcher builds
//!   (`wnodes_launcher::qemu::build_args`, fed with the warm-up run's `vm.requested` spec and
//!   preparation results) minus what only the launcher needs (`-qmp`, `-pidfile`,
//!   `-daemonize`): same vmlinux, initrd, rootfs image, payload file (fw_cfg), memory, cores,
//!   `-snapshot`, serial files and kernel command line. Its scratch disk is created and
//!   formatted (same `mkfs.ext4` options as the scratch service) and its tap is created on the
//!   same bridge before the clock starts; timed from spawning qemu to its exit (the guest powers
//!   itself off).
//!
//! The two sides alternate. The stack runs in a private network namespace (tap mode, needs
//! root) without a storage export, so the guest mounts nothing on either side.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use clap::Args;
use wnodes_bus::{EventType, proto, proto::event::Body};
use wnodes_devstack::{NetworkChoice, RunEvent, Stack, StackOptions, SubmitArgs, timeline};
use wnodes_launcher::{
    config::Accel,
    qemu::{LaunchInputs, build_args, payload_script},
    vm_dir::VmDir,
};

/// The payload both sides run: no gateway needed.
const PAYLOAD: &str = "echo hi > /scratch/x; cat /scratch/x; exit 0\n";
/// The bare side's tap (not `wn-*`, so the stack's leftover check ignores it).
const BARE_TAP: &str = "wnbench0";
/// The bare guest's address and MAC on the bridge (outside what the network service hands
/// out first; nothing runs concurrently anyway).
const BARE_ADDR: &str = "10.231.1.250/24";
const BARE_MAC: &str = "52:54:00:be:0c:01";
const QEMU: &str = "qemu-system-x86_64";

/// `vm-start` options.
#[derive(Args, Debug)]
pub struct VmStartArgs {
    /// Timed runs of each side (alternating; at least 5).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Where the `wnodes-*` binaries are (default: next to this executable).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Keep the work dir (stack config, logs, bare VM files) for inspection.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the benchmark. The private network namespace must be entered before any thread of
/// the runtime that starts the stack exists: this runs on a new thread that unshares first and
/// builds its own runtime (its threads, and every process they spawn, inherit the namespace).
pub fn run(args: VmStartArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "vm-start needs root (a private network namespace, taps on a bridge)"
    );
    std::thread::Builder::new()
        .name("vm-start".into())
        .spawn(move || -> anyhow::Result<()> {
            wnodes_devstack::enter_private_netns()?;
            let ns = netns_of_thread()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                // Every runtime thread must be in the private namespace.
                let worker = tokio::spawn(async { netns_of_thread() }).await??;
                let blocking = tokio::task::spawn_blocking(netns_of_thread).await??;
                anyhow::ensure!(
                    worker == ns && blocking == ns,
                    "runtime threads are not in the private network namespace ({ns} vs {worker}, {blocking})"
                );
                bench(args).await
            })
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the vm-start thread panicked"))?
}

fn netns_of_thread() -> anyhow::Result<String> {
    Ok(std::fs::read_link("/proc/thread-self/ns/net")?
        .display()
        .to_string())
}

fn run_cmd(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the warm-up run tells about the VM the launcher started.
struct Template {
    spec: proto::VmSpec,
    image: proto::ImageReady,
    scratch: proto::ScratchReady,
    network: proto::NetworkReady,
    storage: proto::StorageReady,
}

impl Template {
    fn from_events(events: &[RunEvent]) -> anyhow::Result<Self> {
        let mut spec = None;
        let mut image = None;
        let mut scratch = None;
        let mut network = None;
        let mut storage = None;
        for e in events {
            match &e.event.body {
                Some(Body::VmRequested(v)) => spec = v.spec.clone(),
                Some(Body::ImageReady(v)) => image = Some(v.clone()),
                Some(Body::ScratchReady(v)) => scratch = Some(v.clone()),
                Some(Body::NetworkReady(v)) => network = Some(v.clone()),
                Some(Body::StorageReady(v)) => storage = Some(v.clone()),
                _ => {}
            }
        }
        let t = Self {
            spec: spec.context("warm-up run: no vm.requested spec")?,
            image: image.context("warm-up run: no image.ready")?,
            scratch: scratch.context("warm-up run: no scratch.ready")?,
            network: network.context("warm-up run: no network.ready")?,
            storage: storage.context("warm-up run: no storage.ready")?,
        };
        anyhow::ensure!(
            t.storage.port == 0,
            "the gateway served an export (port {}): the stack must run without one",
            t.storage.port
        );
        Ok(t)
    }
}

/// The bare side: a VM directory, a scratch file, a tap, the argument vector.
struct Bare {
    vm: VmDir,
    scratch: PathBuf,
    scratch_bytes: u64,
    args: Vec<String>,
}

impl Bare {
    fn prepare(root: &Path, t: &Template) -> anyhow::Result<Self> {
        let vm = VmDir::new(root, &t.spec.vm_id)?;
        vm.create()?;
        let scratch_path = root.join("scratch.img");
        let scratch = proto::ScratchReady {
            path: scratch_path.display().to_string(),
            ..t.scratch.clone()
        };
        let network = proto::NetworkReady {
            tap: BARE_TAP.into(),
            address: BARE_ADDR.into(),
            mac: BARE_MAC.into(),
            ..t.network.clone()
        };
        let full = build_args(&LaunchInputs {
            accel: Accel::Tcg,
            vm: &vm,
            spec: &t.spec,
            image: &t.image,
            scratch: Some(&scratch),
            network: Some(&network),
            storage: Some(&t.storage),
            // The bare baseline is plain qemu as root, as a hand-written script would run it.
            sandbox: false,
            tuning: None,
        })?;
        // What only the launcher needs: the QMP socket, the pid file.
        let mut args = Vec::with_capacity(full.len());
        let mut it = full.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-qmp" | "-pidfile" => {
                    it.next();
                }
                _ => args.push(a),
            }
        }
        let payload = t.spec.payload.as_ref().context("the spec has no payload")?;
        std::fs::write(vm.payload(), payload_script(payload)?)?;
        let _ = run_cmd(&["ip", "link", "del", BARE_TAP]);
        run_cmd(&["ip", "tuntap", "add", "mode", "tap", "name", BARE_TAP])?;
        run_cmd(&[
            "ip", "link", "set", "dev", BARE_TAP, "master", "wnbr0", "up",
        ])?;
        Ok(Self {
            vm,
            scratch: scratch_path,
            scratch_bytes: t.spec.scratch_bytes,
            args,
        })
    }

    fn command_line(&self) -> String {
        let mut s = String::from(QEMU);
        for a in &self.args {
            s.push(' ');
            if a.contains(' ') {
                s.push('"');
                s.push_str(a);
                s.push('"');
            } else {
                s.push_str(a);
            }
        }
        s
    }

    /// A fresh scratch disk, formatted as the scratch service does; serial files removed.
    fn reset(&self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.scratch);
        let f = std::fs::File::create(&self.scratch)?;
        f.set_len(self.scratch_bytes)?;
        drop(f);
        let p = self.scratch.display().to_string();
        run_cmd(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            &p,
        ])?;
        for f in [
            self.vm.console_log(),
            self.vm.output_log(),
            self.vm.status_log(),
        ] {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// Spawn → exit, as the launcher runs qemu (TMPDIR and cwd = the VM dir), minus
    /// `-daemonize`.
    /// Returns spawn → exit and spawn → the guest's last serial write.
    async fn run(&self) -> anyhow::Result<(Duration, f64)> {
        self.reset()?;
        let spawned = SystemTime::now();
        let t = Instant::now();
        let status = tokio::process::Command::new(QEMU)
            .args(&self.args)
            .env("TMPDIR", self.vm.dir())
            .current_dir(self.vm.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await?;
        let wall = t.elapsed();
        anyhow::ensure!(status.success(), "bare qemu exited with {status}");
        let guest = std::fs::read_to_string(self.vm.status_log()).unwrap_or_default();
        anyhow::ensure!(
            guest.contains("WNODES exit=0") && !guest.contains("error="),
            "bare guest status: {guest:?}"
        );
        let out = std::fs::read_to_string(self.vm.output_log()).unwrap_or_default();
        anyhow::ensure!(out.trim() == "hi", "bare guest output: {out:?}");
        let exit = std::fs::metadata(self.vm.status_log())?.modified()?;
        Ok((wall, secs_between(spawned, exit)))
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = run_cmd(&["ip", "link", "del", BARE_TAP]);
    }
}

/// `"job.started → usage.recorded (total)"` → `"phase_job_started_to_usage_recorded_total_s"`.
fn phase_key(name: &str) -> String {
    let mut k = String::from("phase_");
    let mut sep = false;
    for c in name.replace('→', " to ").chars() {
        if c.is_ascii_alphanumeric() {
            if sep && !k.ends_with('_') {
                k.push('_');
            }
            k.push(c.to_ascii_lowercase());
            sep = false;
        } else {
            sep = true;
        }
    }
    k.push_str("_s");
    k
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn first_time(events: &[RunEvent], t: EventType) -> Option<SystemTime> {
    events
        .iter()
        .filter(|e| e.event_type == t)
        .map(|e| e.time)
        .min()
}

/// One WNoDeS job: submit, check, wait for its usage record and released resources (untimed),
/// return the timed wall and the per-phase durations.
async fn wnodes_job(stack: &Stack, job_id: &str) -> anyhow::Result<(f64, BTreeMap<String, f64>)> {
    let mut args = SubmitArgs::script(job_id, PAYLOAD);
    args.timeout = Duration::from_secs(300);
    let spawned = SystemTime::now();
    let out = stack.submit(&args).await?;
    let exited = SystemTime::now();
    anyhow::ensure!(
        out.exit_code == 0 && out.stdout.trim() == "hi",
        "job {job_id}: exit {} stdout {:?} stderr {:?}",
        out.exit_code,
        out.stdout,
        out.stderr
    );
    let wall = out.wall.as_secs_f64();
    // Untimed: the run's tail (release, accounting), so the next run starts on a quiet host.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let recorded = !stack.usage_record(job_id).await?.is_empty();
        if recorded && stack.leftovers().is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "job {job_id}: usage record {recorded}, leftovers {:?}",
            stack.leftovers()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = stack.run_events(job_id).await?;
    let mut phases: BTreeMap<String, f64> = timeline(&events)
        .into_iter()
        .map(|p| (phase_key(&p.name), p.duration.as_secs_f64()))
        .collect();
    if let Some(t) = first_time(&events, EventType::JobStarted) {
        phases.insert(
            "phase_submit_spawn_to_job_started_s".into(),
            secs_between(spawned, t),
        );
    }
    if let Some(t) = first_time(&events, EventType::VmStopped) {
        phases.insert(
            "phase_vm_stopped_to_submit_exit_s".into(),
            secs_between(t, exited),
        );
    }
    // qemu's spawn: the launcher writes the payload file (`job.sh`) right before it spawns qemu
    // (`VmRunning.started_at` is not used: where it is stamped may change). The guest's last
    // serial write (`WNODES exit=`, just before `poweroff -f`) splits qemu's run into the
    // guest's work and the launcher noticing the exit.
    let vm_dir = events.iter().find_map(|e| match &e.event.body {
        Some(Body::VmRunning(r)) => Some(stack.state_dir("launcher").join("vms").join(&r.vm_id)),
        _ => None,
    });
    let mtime = |name: &str| {
        let p = vm_dir.as_ref()?.join(name);
        std::fs::metadata(p).ok()?.modified().ok()
    };
    if let Some(spawn) = mtime("job.sh") {
        if let Some(running) = first_time(&events, EventType::VmRunning) {
            phases.insert(
                "phase_qemu_spawn_to_vm_running_s".into(),
                secs_between(spawn, running),
            );
        }
        if let Some(exit) = mtime("status.log") {
            phases.insert(
                "phase_qemu_spawn_to_guest_exit_s".into(),
                secs_between(spawn, exit),
            );
            if let Some(stopped) = first_time(&events, EventType::VmStopped) {
                phases.insert(
                    "phase_guest_exit_to_vm_stopped_s".into(),
                    secs_between(exit, stopped),
                );
            }
        }
    }
    Ok((wall, phases))
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    let qemu = run_cmd(&[QEMU, "--version"])
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let kernel = run_cmd(&["uname", "-r"]).unwrap_or_default();
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "os": os,
        "kernel": kernel.trim(),
        "qemu": qemu,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn bench(args: VmStartArgs) -> anyhow::Result<()> {
    let runs = args.runs.max(5);
    let dir = tempfile::Builder::new()
        .prefix("wnodes-vm-start-")
        .tempdir()?;
    let work = dir.path().to_path_buf();
    let mut opts = StackOptions::new(work.join("stack"));
    opts.network = NetworkChoice::Tap;
    opts.storage_export = false;
    opts.bin_dir = args.bin_dir.clone();
    opts.log_level = "info".into();
    let load_before = loadavg();
    eprintln!("vm-start: starting the stack in {}", work.display());
    let t = Instant::now();
    let stack = Stack::start(opts).await?;
    eprintln!("vm-start: stack ready in {:.1}s", t.elapsed().as_secs_f64());

    let result = async {
        let pid = std::process::id();
        let warm = format!("vmstart-{pid}-warmup");
        let (w, _) = wnodes_job(&stack, &warm).await.context("warm-up job")?;
        eprintln!("vm-start: warm-up job {w:.2}s (image now cached)");
        let template = Template::from_events(&stack.run_events(&warm).await?)?;
        let bare = Bare::prepare(&work.join("bare"), &template)?;
        eprintln!("vm-start: bare command line: {}", bare.command_line());
        let (untimed, _) = bare.run().await.context("bare warm-up")?;
        eprintln!(
            "vm-start: bare warm-up {:.2}s (untimed)",
            untimed.as_secs_f64()
        );

        let (mut wn, mut br, mut br_guest) = (Vec::new(), Vec::new(), Vec::new());
        let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for i in 0..runs {
            let (w, p) = wnodes_job(&stack, &format!("vmstart-{pid}-{i}"))
                .await
                .with_context(|| format!("wnodes run {i}"))?;
            for (k, v) in p {
                phases.entry(k).or_default().push(v);
            }
            let (b, bg) = bare.run().await.with_context(|| format!("bare run {i}"))?;
            let b = b.as_secs_f64();
            eprintln!("vm-start: run {i}: wnodes {w:.3}s  bare {b:.3}s");
            wn.push(w);
            br.push(b);
            br_guest.push(bg);
        }
        let (wm, bm) = (median(&wn), median(&br));
        let minmax = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let (wmin, wmax) = minmax(&wn);
        let (bmin, bmax) = minmax(&br);
        let mut summary = serde_json::json!({
            "bench": "vm-start",
            "runs": runs,
            "wnodes_median_s": r3(wm),
            "bare_median_s": r3(bm),
            "overhead_ratio": r3(wm / bm - 1.0),
            "overhead_median_s": r3(wm - bm),
            "wnodes_min_s": r3(wmin),
            "wnodes_max_s": r3(wmax),
            "bare_min_s": r3(bmin),
            "bare_max_s": r3(bmax),
            "bare_spawn_to_guest_exit_median_s": r3(median(&br_guest)),
            "bare_guest_exit_to_qemu_exit_median_s": r3(median(
                &br.iter().zip(&br_guest).map(|(b, g)| b - g).collect::<Vec<_>>()
            )),
            "wnodes_s": wn.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
            "bare_s": br.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
            "accel": "tcg",
            "payload": PAYLOAD.trim_end(),
            "network": "tap",
            "storage_export": false,
            "machine": machine(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        });
        if let Some(obj) = summary.as_object_mut() {
            for (k, v) in &phases {
                obj.insert(k.clone(), serde_json::json!(r3(median(v))));
            }
        }
        println!("{summary}");
        anyhow::Ok(())
    }
    .await;
    if result.is_err() || args.keep {
        let kept = dir.keep();
        eprintln!("vm-start: work dir kept: {}", kept.display());
    }
    drop(stack);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_become_json_keys() {
        assert_eq!(
            phase_key("job.started → usage.recorded (total)"),
            "phase_job_started_to_usage_recorded_total_s"
        );
        assert_eq!(
            phase_key("vm.requested → image.ready"),
            "phase_vm_requested_to_image_ready_s"
        );
        assert_eq!(
            phase_key("last ready → vm.running"),
            "phase_last_ready_to_vm_running_s"
        );
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
