//! `gateway`: reading and writing a file through the WNoDeS sftp gateway vs the paper's
//! baseline (sshfs to `sftp-server` behind a plain `socat` TCP listener), and through the NFS
//! gateway from a guest.
//!
//! - **sftp** (WNoDeS): the listener the gateway runs for a VM ([`Listeners`], with the
//!   production programs: each connection's `sftp-server` jailed and run as the job's uid/gid,
//!   only the VM's address accepted, the bytes piped and counted in process), bound on the host
//!   side of a veth pair.
//! - **socat** (baseline): `socat TCP-LISTEN:PORT,bind=HOST,reuseaddr,fork EXEC:"setpriv
//!   --reuid=U --regid=G --clear-groups -- sftp-server -d EXPORT"` on the same address: the same
//!   `sftp-server` as the same user, without the gateway's address check, jail or counting.
//!   `--socat-tuned` gives it the gateway's copy settings (`-b 65536` and `,nodelay`): an
//!   ablation comparing the two data paths, not the paper's listener.
//! - **guest NFS**: nfs-ganesha started and managed by the gateway's NFS module (private
//!   `dbus-daemon`, the VM's export added over D-Bus, restricted to the guest's address and
//!   squashed to the job's uid/gid); the test guest boots under TCG on a tap, mounts it over
//!   NFSv4.1 as the launcher would ask it to, and times `dd` inside (`/proc/uptime`).
//!
//! The host-side client is `sshfs -o directport=PORT,reconnect,allow_other` (the guest's
//! options) run by `nsenter` in a network namespace of its own at the other end of the veth,
//! so every byte crosses a network stack as it would from a VM; `dd` does the I/O (`bs=1M`,
//! writes with `conv=fsync`). Each transfer has a mount of its own: a read never hits the
//! client's page cache. The export lives on a tmpfs so that no disk limits any path.
//!
//! Everything runs in a private network namespace (needs root). Each round runs the three paths
//! in turn, the order rotating between rounds. Rates are MB/s (10^6 bytes per second); ratios
//! are WNoDeS sftp ÷ socat per round; each transfer also reports how busy the host's CPUs were
//! (from `/proc/stat`), which says what limits it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use tokio::process::Command;
use wnodes_gateway::{
    GatewayConfig,
    listener::{Listeners, Programs, ServeSpec},
    nfs::{NfsBackend, NfsConfig, NfsExport, NfsServer, config::GaneshaConfig},
};

/// `nobody`/`nogroup`: the job's uid and gid on both sides.
const UID: u32 = 65534;
/// The hypervisor's end of the veth, and the client namespace's.
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The guest's tap: the hypervisor's address on it and the guest's.
const TAP: &str = "wnbgw0";
const TAP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const GUEST_MAC: &str = "52:54:00:be:0c:02";
const VM_ID: &str = "vm-0be4c0000001";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
const SETPRIV: &str = "/usr/bin/setpriv";
const MB: f64 = 1e6;

/// `gateway` options.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Rounds; each runs every path once (at least 3).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The host-side file size in MiB (sftp and socat).
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// The file size in MiB inside the guest (NFS; the guest has 256 MiB of memory).
    #[arg(long, default_value_t = 256)]
    pub guest_size_mib: u64,
    /// Leave the guest out (for quick runs comparing the host paths; the guest's fields are
    /// then null).
    #[arg(long)]
    pub no_guest: bool,
    /// Give the baseline socat the gateway's settings (`-b 65536`, `nodelay`): an ablation
    /// that compares the two data paths rather than the paper's plain listener.
    #[arg(long)]
    pub socat_tuned: bool,
    /// Keep the work dir (guest logs, ganesha's state) for inspection.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Sftp,
    Socat,
    GuestNfs,
}

impl Path3 {
    fn name(self) -> &'static str {
        match self {
            Path3::Sftp => "sftp",
            Path3::Socat => "socat",
            Path3::GuestNfs => "guest_nfs",
        }
    }
}

/// One transfer: its rate and how busy the host's CPUs were meanwhile (0..1 of all cores).
#[derive(Debug, Clone, Copy)]
struct Transfer {
    mb_s: f64,
    cpu_busy: f64,
}

#[derive(Debug, Default)]
struct Series {
    read: Vec<Transfer>,
    write: Vec<Transfer>,
}

/// Runs the benchmark on a thread of its own in a private network namespace (entered before
/// its runtime exists, so that every thread and child process shares it).
pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "gateway needs root (network namespaces, a veth pair, a tap, tmpfs, ganesha)"
    );
    anyhow::ensure!(args.rounds >= 3, "--rounds must be at least 3");
    for p in [
        "/usr/bin/socat",
        "/usr/bin/sshfs",
        "/usr/bin/nsenter",
        SFTP_SERVER,
        SETPRIV,
        "/usr/bin/ganesha.nfsd",
        "/usr/bin/dbus-daemon",
        "/usr/bin/qemu-system-x86_64",
    ] {
        anyhow::ensure!(
            Path::new(p).exists(),
            "{p} is missing (scripts/install-vm-deps.sh installs it)"
        );
    }
    let guest = wnodes_testkit::host::guest_dir();
    anyhow::ensure!(
        guest.join("rootfs.ext4").exists(),
        "the test guest is not built in {} (guest/build.sh)",
        guest.display()
    );
    std::thread::Builder::new()
        .name("gateway-bench".into())
        .spawn(move || -> anyhow::Result<()> {
            wnodes_devstack::enter_private_netns()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(bench(args))
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
}

async fn bench(args: GatewayArgs) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("wnodes-gwbench-")
        .tempdir_in("/var/tmp")?;
    let work_path = work.path().to_owned();
    let mut cleanup = Cleanup::default();
    // SIGINT or SIGTERM drops the run (its children are killed on drop) and still cleans up.
    let result = tokio::select! {
        r = bench_in(&args, &work_path, &mut cleanup) => r,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    cleanup.run().await;
    if args.keep {
        let kept = work.keep();
        eprintln!("gateway: work dir kept in {}", kept.display());
    }
    result
}

async fn bench_in(args: &GatewayArgs, work: &Path, cleanup: &mut Cleanup) -> anyhow::Result<()> {
    // The export, on a tmpfs big enough for every file at once.
    let fs = work.join("fs");
    std::fs::create_dir(&fs)?;
    let tmpfs_mib = args.size_mib + 2 * args.guest_size_mib + 256;
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={tmpfs_mib}m,mode=0755"),
            "wnodes-gwbench",
            &fs.display().to_string(),
        ],
    )
    .await?;
    cleanup.unmount.push(fs.clone());
    let export = fs.join("export");
    std::fs::create_dir(&export)?;
    std::os::unix::fs::chown(&export, Some(UID), Some(UID))?;
    std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o755))?;

    // The client's namespace at the other end of a veth pair.
    let ns = format!("wnbench-gw-{}", std::process::id());
    sh("ip", &["netns", "add", &ns]).await?;
    cleanup.netns = Some(ns.clone());
    sh(
        "ip",
        &[
            "link", "add", "wnbgwh", "type", "veth", "peer", "name", "wnbgwc", "netns", &ns,
        ],
    )
    .await?;
    sh(
        "ip",
        &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", "wnbgwh"],
    )
    .await?;
    sh("ip", &["link", "set", "wnbgwh", "up"]).await?;
    let in_ns = |a: &[&str]| {
        let mut v = vec!["netns", "exec", ns.as_str(), "ip"];
        v.extend_from_slice(a);
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for a in [
        in_ns(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "wnbgwc"]),
        in_ns(&["link", "set", "wnbgwc", "up"]),
        in_ns(&["link", "set", "lo", "up"]),
    ] {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        sh("ip", &a).await?;
    }

    // WNoDeS: the gateway's listener for the client, with the production programs and jail.
    let jail_dir = work.join("jail");
    let cfg = GatewayConfig {
        jail_dir,
        ..Default::default()
    };
    let jail = cfg
        .prepare_jail()
        .context("preparing the sftp-server jail")?;
    anyhow::ensure!(jail.is_some(), "the gateway's jail is off (not root?)");
    let listeners = Listeners::new(Programs {
        setpriv: cfg.setpriv.clone(),
        sftp_server: cfg.sftp_server.clone(),
        jail,
    });
    let tcp = tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(HOST_ADDR), 0)).await?;
    let sftp_addr = listeners.start(
        tcp,
        ServeSpec {
            vm_id: VM_ID.into(),
            allowed: IpAddr::V4(CLIENT_ADDR),
            path: export.clone(),
            read_only: false,
            uid: UID,
            gid: UID,
            peer_uid: None,
        },
        true,
    )?;

    // The baseline: a plain socat listener on a free port of the same address.
    let socat_port = {
        let l = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(HOST_ADDR), 0))?;
        l.local_addr()?.port()
    };
    let mut socat = Command::new("/usr/bin/socat");
    if args.socat_tuned {
        // The gateway's own settings: 64 KiB copies, no Nagle.
        socat.args(["-b", "65536"]);
    }
    let mut socat = socat
        .arg(format!(
            "TCP-LISTEN:{socat_port},bind={HOST_ADDR},reuseaddr,fork{}",
            if args.socat_tuned { ",nodelay" } else { "" }
        ))
        .arg(format!(
            "EXEC:{SETPRIV} --reuid={UID} --regid={UID} --clear-groups -- {SFTP_SERVER} -d {}",
            export.display()
        ))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting socat")?;
    wait_listening(socat_port).await?;

    // Guest NFS: ganesha managed as the gateway runs it, the guest's export, the guest's tap.
    let nfs_cfg = NfsConfig {
        backend: NfsBackend::Ganesha,
        ganesha: GaneshaConfig {
            state_dir: work.join("ganesha"),
            ..Default::default()
        },
        ..Default::default()
    };
    let server = NfsServer::start(&nfs_cfg)
        .await
        .context("starting nfs-ganesha")?;
    cleanup.nfs = Some(server);
    let e = NfsExport {
        id: 100,
        vm_id: VM_ID.into(),
        path: export.clone(),
        client: IpAddr::V4(GUEST_ADDR),
        uid: UID,
        gid: UID,
        read_only: false,
    };
    // Added before each guest boots and removed after it stops, as the gateway does for each
    // VM: ganesha keeps the files a guest used open until their export goes, so a file removed
    // on the host while its export lives still holds its space.
    let remote = cleanup.nfs.as_ref().context("nfs server")?.remote_path(&e);
    sh("ip", &["tuntap", "add", "dev", TAP, "mode", "tap"]).await?;
    sh(
        "ip",
        &["addr", "add", &format!("{TAP_ADDR}/24"), "dev", TAP],
    )
    .await?;
    sh("ip", &["link", "set", TAP, "up"]).await?;
    let guest_params = format!(
        "wnodes.ip={GUEST_ADDR}/24 wnodes.gw={TAP_ADDR} wnodes.nfs={TAP_ADDR}:{}:{remote} wnodes.uid={UID} wnodes.gid={UID}",
        nfs_cfg.port
    );

    let size = args.size_mib << 20;
    let guest_size = args.guest_size_mib << 20;
    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt)?;
    let mut series: [(Path3, Series); 3] = [
        (Path3::Sftp, Series::default()),
        (Path3::Socat, Series::default()),
        (Path3::GuestNfs, Series::default()),
    ];
    let order: &[Path3] = if args.no_guest {
        &[Path3::Sftp, Path3::Socat]
    } else {
        &[Path3::Sftp, Path3::Socat, Path3::GuestNfs]
    };
    for round in 0..args.rounds {
        for k in 0..order.len() {
            let path = order[(k + round) % order.len()];
            let (w, r) = match path {
                Path3::Sftp => sshfs_round(&ns, sftp_addr.port(), &mnt, &export, size).await?,
                Path3::Socat => sshfs_round(&ns, socat_port, &mnt, &export, size).await?,
                Path3::GuestNfs => {
                    let nfs = cleanup.nfs.as_ref().context("nfs server")?;
                    nfs.add(&e).await.context("adding the guest's export")?;
                    let done = guest_round(work, round, &export, guest_size, &guest_params).await;
                    nfs.remove(e.id, &e.path)
                        .await
                        .context("removing the guest's export")?;
                    done?
                }
            };
            eprintln!(
                "gateway: round {}/{} {:>9}: write {:7.1} MB/s (cpu {:3.0}%), read {:7.1} MB/s (cpu {:3.0}%)",
                round + 1,
                args.rounds,
                path.name(),
                w.mb_s,
                w.cpu_busy * 100.0,
                r.mb_s,
                r.cpu_busy * 100.0
            );
            let s = &mut series
                .iter_mut()
                .find(|(p, _)| *p == path)
                .context("series")?
                .1;
            s.write.push(w);
            s.read.push(r);
        }
    }
    let _ = socat.start_kill();
    let _ = socat.wait().await;
    let stopped = listeners.stop(VM_ID).await;

    let get = |p: Path3| series.iter().find(|(q, _)| *q == p).map(|(_, s)| s);
    let (Some(sftp), Some(base), Some(guest)) =
        (get(Path3::Sftp), get(Path3::Socat), get(Path3::GuestNfs))
    else {
        anyhow::bail!("a path has no series");
    };
    let rates = |v: &[Transfer]| v.iter().map(|t| t.mb_s).collect::<Vec<_>>();
    let busy = |v: &[Transfer]| median(&v.iter().map(|t| t.cpu_busy).collect::<Vec<_>>());
    let ratios = |a: &[Transfer], b: &[Transfer]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.mb_s / y.mb_s)
            .collect::<Vec<_>>()
    };
    let read_ratios = ratios(&sftp.read, &base.read);
    let write_ratios = ratios(&sftp.write, &base.write);
    let all: Vec<f64> = read_ratios.iter().chain(&write_ratios).copied().collect();
    let spread = |v: &[f64]| {
        v.iter().copied().fold(f64::MIN, f64::max) - v.iter().copied().fold(f64::MAX, f64::min)
    };
    let summary = serde_json::json!({
        "bench": "gateway",
        "rounds": args.rounds,
        "size_mib": args.size_mib,
        "socat_tuned": args.socat_tuned,
        "guest_size_mib": args.guest_size_mib,
        "host_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "sftp_read_mb_s": r1(median(&rates(&sftp.read))),
        "sftp_write_mb_s": r1(median(&rates(&sftp.write))),
        "socat_read_mb_s": r1(median(&rates(&base.read))),
        "socat_write_mb_s": r1(median(&rates(&base.write))),
        "guest_nfs_read_mb_s": opt(r1(median(&rates(&guest.read)))),
        "guest_nfs_write_mb_s": opt(r1(median(&rates(&guest.write)))),
        "read_ratio": r3(median(&read_ratios)),
        "write_ratio": r3(median(&write_ratios)),
        "ratio_spread": r3(spread(&all)),
        "read_ratios": read_ratios.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
        "write_ratios": write_ratios.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
        "sftp_read_rounds_mb_s": rates(&sftp.read).into_iter().map(r1).collect::<Vec<_>>(),
        "sftp_write_rounds_mb_s": rates(&sftp.write).into_iter().map(r1).collect::<Vec<_>>(),
        "socat_read_rounds_mb_s": rates(&base.read).into_iter().map(r1).collect::<Vec<_>>(),
        "socat_write_rounds_mb_s": rates(&base.write).into_iter().map(r1).collect::<Vec<_>>(),
        "guest_nfs_read_rounds_mb_s": rates(&guest.read).into_iter().map(r1).collect::<Vec<_>>(),
        "guest_nfs_write_rounds_mb_s": rates(&guest.write).into_iter().map(r1).collect::<Vec<_>>(),
        "cpu_busy": {
            "sftp_read": r3(busy(&sftp.read)),
            "sftp_write": r3(busy(&sftp.write)),
            "socat_read": r3(busy(&base.read)),
            "socat_write": r3(busy(&base.write)),
            "guest_nfs_read": opt(r3(busy(&guest.read))),
            "guest_nfs_write": opt(r3(busy(&guest.write))),
        },
        "gateway_sessions": stopped.map(|s| s.served),
        "gateway_bytes_to_client": stopped.and_then(|s| s.traffic).map(|t| t.to_vm),
        "gateway_bytes_from_client": stopped.and_then(|s| s.traffic).map(|t| t.from_vm),
    });
    println!("{summary}");
    Ok(())
}

/// One write and one read of `size` bytes through sshfs to `port` from the client namespace,
/// each on a fresh mount.
async fn sshfs_round(
    ns: &str,
    port: u16,
    mnt: &Path,
    export: &Path,
    size: u64,
) -> anyhow::Result<(Transfer, Transfer)> {
    let file = mnt.join("bench.bin");
    let count = format!("count={}", size >> 20);
    let of = format!("of={}", file.display());
    let ifile = format!("if={}", file.display());
    let client = mount_sshfs(ns, port, mnt).await?;
    let w = timed(
        size,
        dd(&["if=/dev/zero", &of, "bs=1M", &count, "conv=fsync"]),
    )
    .await;
    umount(mnt, client).await?;
    let w = w?;
    let on_server = std::fs::metadata(export.join("bench.bin"))?.len();
    anyhow::ensure!(
        on_server == size,
        "the server holds {on_server} bytes after writing {size}"
    );
    let client = mount_sshfs(ns, port, mnt).await?;
    let r = timed(size, dd(&[&ifile, "of=/dev/null", "bs=1M"])).await;
    umount(mnt, client).await?;
    std::fs::remove_file(export.join("bench.bin"))?;
    Ok((w, r?))
}

/// sshfs in the foreground (`-f`), as a child of this process, so that it is known to be gone
/// after each transfer: sshfs outlives `umount` here and keeps its connection,
/// and its server's `sftp-server`, open for the rest of the run.
async fn mount_sshfs(ns: &str, port: u16, mnt: &Path) -> anyhow::Result<tokio::process::Child> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "sshfs", "-f", "-o"])
        .arg(format!("directport={port},reconnect,allow_other"))
        .arg(format!("{HOST_ADDR}:"))
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting sshfs")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = format!(" {} ", mnt.display());
    loop {
        let mounted = std::fs::read_to_string("/proc/self/mounts")?
            .lines()
            .any(|l| l.contains(&target) && l.contains("fuse.sshfs"));
        if mounted {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("sshfs exited ({status}) before mounting {}", mnt.display());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "sshfs did not mount {} within 10 s",
            mnt.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn umount(mnt: &Path, mut client: tokio::process::Child) -> anyhow::Result<()> {
    sh("umount", &[&mnt.display().to_string()]).await?;
    // Unmounted, sshfs still waits on its connection here: end it.
    let _ = client.start_kill();
    let _ = client.wait().await;
    Ok(())
}

fn dd(args: &[&str]) -> Command {
    let mut c = Command::new("dd");
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Runs `cmd` (which moves `size` bytes) and times it, with the host's CPU use meanwhile.
async fn timed(size: u64, mut cmd: Command) -> anyhow::Result<Transfer> {
    let cpu0 = cpu_times()?;
    let t0 = Instant::now();
    let out = cmd.output().await.context("running dd")?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_times()?;
    anyhow::ensure!(
        out.status.success(),
        "dd failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(Transfer {
        mb_s: size as f64 / MB / secs,
        cpu_busy: busy_between(cpu0, cpu1),
    })
}

/// Boots the guest on its tap: it writes `size` bytes to its NFS mount and reads a file of
/// `size` bytes the host wrote (so not in the guest's page cache), timing each inside.
async fn guest_round(
    work: &Path,
    round: usize,
    export: &Path,
    size: u64,
    params: &str,
) -> anyhow::Result<(Transfer, Transfer)> {
    // Names of their own each round: ganesha caches what it has served, and a file the host
    // removed behind its back could still be found there by the next guest.
    let input = export.join(format!("guest-in-{round}.bin"));
    let output = export.join(format!("guest-out-{round}.bin"));
    write_file(&input, size)?;
    std::os::unix::fs::chown(&input, Some(UID), Some(UID))?;
    let dir = work.join(format!("guest-{round}"));
    std::fs::create_dir_all(&dir)?;
    let job = dir.join("job.sh");
    let mib = size >> 20;
    std::fs::write(
        &job,
        format!(
            "set -e\n\
             t0=$(cut -d' ' -f1 /proc/uptime)\n\
             dd if=/dev/zero of=/shared/guest-out-{round}.bin bs=1M count={mib} conv=fsync\n\
             t1=$(cut -d' ' -f1 /proc/uptime)\n\
             dd if=/shared/guest-in-{round}.bin of=/dev/null bs=1M\n\
             t2=$(cut -d' ' -f1 /proc/uptime)\n\
             grep ' /shared ' /proc/mounts\n\
             echo \"WNBENCH $t0 $t1 $t2\"\n"
        ),
    )?;
    let mut qemu = wnodes_testkit::vm::guest_qemu(&dir, &job, params, None);
    qemu.args([
        "-netdev",
        &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
    ])
    .args([
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    let cpu0 = cpu_times()?;
    let status = tokio::time::timeout(Duration::from_secs(600), qemu.status())
        .await
        .context("the guest did not power off within 600 s")??;
    let cpu1 = cpu_times()?;
    let out = std::fs::read_to_string(dir.join("output.log")).unwrap_or_default();
    let guest_status = std::fs::read_to_string(dir.join("status.log")).unwrap_or_default();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("WNBENCH "))
        .with_context(|| {
            format!(
                "the guest reported no timing (qemu {status}); status.log: {guest_status}; output.log: {out}; console.log in {}",
                dir.display()
            )
        })?;
    anyhow::ensure!(
        out.contains(" nfs4 "),
        "the guest's /shared is not NFSv4: {out}"
    );
    let t: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad timing line {line:?}"))?;
    anyhow::ensure!(t.len() == 3, "bad timing line {line:?}");
    let written = std::fs::metadata(&output)
        .with_context(|| format!("{}", output.display()))?
        .len();
    anyhow::ensure!(
        written == size,
        "the guest wrote {written} bytes, not {size}"
    );
    std::fs::remove_file(&output)?;
    std::fs::remove_file(&input)?;
    // The guest's own clock at 10 ms resolution; the CPU use is the whole boot's.
    let busy = busy_between(cpu0, cpu1);
    let rate = |secs: f64| size as f64 / MB / secs.max(0.01);
    Ok((
        Transfer {
            mb_s: rate(t[1] - t[0]),
            cpu_busy: busy,
        },
        Transfer {
            mb_s: rate(t[2] - t[1]),
            cpu_busy: busy,
        },
    ))
}

fn write_file(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// (busy, total) jiffies of all CPUs from `/proc/stat`.
fn cpu_times() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat")?;
    anyhow::ensure!(v.len() >= 5, "short /proc/stat line {line:?}");
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Ok((total - idle, total))
}

fn busy_between(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        0.0
    } else {
        b.0.saturating_sub(a.0) as f64 / total as f64
    }
}

/// Waits until something accepts on `HOST_ADDR:port` (socat's listener).
async fn wait_listening(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening = std::fs::read_to_string("/proc/thread-self/net/tcp")?
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[3] == "0A" && f[1].ends_with(&format!(":{port:04X}"))
            });
        if listening {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "socat does not listen on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The first SIGINT or SIGTERM (never, where the handlers cannot be installed).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// What the run set up on the host, undone at the end whatever happened.
#[derive(Default)]
struct Cleanup {
    unmount: Vec<PathBuf>,
    netns: Option<String>,
    nfs: Option<NfsServer>,
}

impl Cleanup {
    async fn run(&mut self) {
        if let Some(server) = self.nfs.take() {
            server.stop().await;
        }
        // A mount left by a failed round, then the tmpfs.
        for m in self.unmount.iter().rev() {
            let _ = sh(
                "umount",
                &["-l", &m.with_file_name("mnt").display().to_string()],
            )
            .await;
            if let Err(e) = sh("umount", &["-l", &m.display().to_string()]).await {
                eprintln!("gateway: {e:#}");
            }
        }
        if let Some(ns) = self.netns.take()
            && let Err(e) = sh("ip", &["netns", "del", &ns]).await
        {
            eprintln!("gateway: {e:#}");
        }
    }
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

/// `null` for a path left out (a median of nothing).
fn opt(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
