//! The LVM backend against real lvm2 (metadata-only mode, `--driverloaded n`: this machine has
//! no device-mapper) on a volume group made by each test on a loop device over a file, with a
//! private `LVM_SYSTEM_DIR` whose `lvm.conf` only accepts that loop device: create, list,
//! reconcile, remove, a full volume group, a tag naming a VM nobody knows, and a VM that runs
//! on an LV's extents mapped through a loop device and writes its scratch there.
//!
//! Host tests (`wnodes_testkit::host`): they need root, lvm2 and loop devices (and qemu and the
//! test guest for the VM). Every loop device and volume group a test makes is removed by a
//! `Drop` guard, also when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use wnodes_bus::{
    Bus, KeyStore,
    proto::{self, event::Body},
};
use wnodes_runtime::{Config, start::InProcess};
use wnodes_scratch::{
    Backend, LvmBackend, LvmConfig, Scratch, ScratchConfig, Volumes, lvm::TAG_RELEASED, state,
};
use wnodes_testkit::{
    NatsServer,
    bus::{EventSub, connect, subscribe},
    events::{Events, RunRefExt, run},
    host::{self, Precondition},
    host_test,
    vm::vm_lock,
};

const HOST: &str = "hv1.example.org";
const MIB: u64 = 1 << 20;
/// The uid the VM's qemu runs as (as the launcher's confinement gives one).
const VM_UID: u32 = 3_999_000_077;

fn lvm2() -> Result<(), String> {
    let found = Command::new("lvm").arg("version").output();
    match found {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("lvm2 (`lvm` on PATH; scripts/install-vm-deps.sh installs it)".into()),
    }
}

const LVM: Precondition = Precondition::Other("lvm2", lvm2);
const LOOP: Precondition = Precondition::LoopDevices;
const NEEDS: &[Precondition] = &[Precondition::Root, LVM, LOOP];
const VM_NEEDS: &[Precondition] = &[
    Precondition::Root,
    LVM,
    LOOP,
    Precondition::Qemu,
    Precondition::TestGuest,
    Precondition::Setpriv,
];

/// Runs a command; panics with its output when it fails. Returns stdout.
fn run_cmd(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A volume group on a loop device over a file, with its private LVM configuration. Dropping
/// it detaches every loop device over the PV, removes the VG and the PV's loop device.
struct Vg {
    tmp: tempfile::TempDir,
    name: String,
    pv: String,
    system_dir: PathBuf,
}

impl Vg {
    fn new(size: u64) -> Vg {
        static N: AtomicU32 = AtomicU32::new(0);
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("pv.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let pv = run_cmd(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image),
        );
        let name = format!(
            "wnodes_t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let system_dir = tmp.path().join("lvm");
        std::fs::create_dir_all(system_dir.join("lock")).unwrap();
        std::fs::write(
            system_dir.join("lvm.conf"),
            format!(
                "devices {{\n  filter = [ \"a|^{pv}$|\", \"r|.*|\" ]\n  hints = \"none\"\n  obtain_device_list_from_udev = 0\n  external_device_info_source = \"none\"\n}}\n\
                 global {{\n  locking_dir = \"{}\"\n}}\n\
                 backup {{\n  backup = 0\n  archive = 0\n}}\n\
                 activation {{\n  udev_sync = 0\n  udev_rules = 0\n  monitoring = 0\n}}\n",
                system_dir.join("lock").display()
            ),
        )
        .unwrap();
        let vg = Vg {
            tmp,
            name,
            pv,
            system_dir,
        };
        vg.lvm(&["pvcreate", "--driverloaded", "n", &vg.pv]);
        vg.lvm(&["vgcreate", "--driverloaded", "n", &vg.name, &vg.pv]);
        vg
    }

    fn lvm(&self, args: &[&str]) -> String {
        run_cmd(
            Command::new("lvm")
                .args(args)
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .env("LVM_SYSTEM_DIR", &self.system_dir),
        )
    }

    fn config(&self) -> LvmConfig {
        LvmConfig {
            vg: self.name.clone(),
            system_dir: Some(self.system_dir.clone()),
            metadata_only: true,
            ..Default::default()
        }
    }

    fn backend(&self) -> LvmBackend {
        LvmBackend::new(self.config(), Some("mkfs.ext4".into())).unwrap()
    }

    /// The loop devices over the PV (the LVs' mappings).
    fn mappings(&self) -> Vec<String> {
        run_cmd(Command::new("losetup").args(["--noheadings", "-O", "NAME", "-j", &self.pv]))
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The names of every LV in the VG (ours or not).
    fn lv_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lvm(&[
                "lvs",
                "--driverloaded",
                "n",
                "--noheadings",
                "-o",
                "lv_name",
                &self.name,
            ])
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    fn pv_image(&self) -> PathBuf {
        self.tmp.path().join("pv.img")
    }
}

impl Drop for Vg {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .env("LVM_SYSTEM_DIR", &self.system_dir)
                .output();
        };
        for dev in self.mappings() {
            quiet(Command::new("losetup").args(["-d", &dev]));
        }
        quiet(Command::new("lvm").args(["vgremove", "--driverloaded", "n", "-f", &self.name]));
        quiet(Command::new("lvm").args(["pvremove", "--driverloaded", "n", "-ff", "-y", &self.pv]));
        quiet(Command::new("losetup").args(["-d", &self.pv]));
    }
}

fn from_launcher(job: &str, body: impl wnodes_testkit::events::IntoBody) -> proto::Event {
    Events::new(HOST, "launcher@hv1.example.org").build(&run(job).lrms(proto::Lrms::Slurm), body)
}

fn vm_requested(job: &str, scratch_bytes: u64) -> proto::Event {
    from_launcher(
        job,
        wnodes_testkit::events::vm_requested(proto::VmSpec {
            vm_id: format!("vm-{job}"),
            image: "sl6".into(),
            scratch_bytes,
            vm_user: Some(proto::HostUser {
                uid: VM_UID,
                gid: VM_UID,
            }),
            ..Default::default()
        }),
    )
}

fn vm_stopped(job: &str) -> proto::Event {
    from_launcher(
        job,
        wnodes_testkit::events::vm_stopped(&format!("vm-{job}")),
    )
}

async fn next(
    sub: &mut EventSub,
    what: &str,
    pred: impl Fn(&proto::Event) -> bool,
) -> proto::Event {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ev = sub.next(Duration::from_secs(30)).await.unwrap();
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The scratch service on an LVM volume group on 64 MiB (15 extents of 4 MiB after the
/// metadata): a VM gets an LV, mapped, formatted and owned by its user; the LV is listed with
/// its tags; a request the VG cannot hold fails naming it; the release removes LV and mapping.
async fn lvm_create_list_full_vg_and_remove_through_the_service() {
    let vg = Vg::new(64 * MIB);
    let nats = NatsServer::start().await.unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let bus: Bus = connect(&nats.admin(), "launcher@hv1.example.org")
        .await
        .unwrap();
    let mut sub = subscribe(&bus, "wnodes.evt.>").await.unwrap();
    let config = ScratchConfig {
        backend: Backend::Lvm,
        max_bytes: 64 * MIB,
        default_bytes: 8 * MIB,
        lvm: vg.config(),
        ..Default::default()
    };
    let running = InProcess::start::<Scratch>(Config::local(
        &nats
            .identity(&wnodes_bus::roles::SCRATCH, HOST)
            .await
            .unwrap(),
        HOST,
        state_dir.path(),
        config,
    ))
    .await
    .unwrap();

    bus.publish(&vm_requested("a", 16 * MIB)).await.unwrap();
    let ev = next(&mut sub, "scratch.ready of vm-a", |e| {
        matches!(&e.body, Some(Body::ScratchReady(r)) if r.vm_id == "vm-a")
            || matches!(&e.body, Some(Body::ScratchFailed(_)))
    })
    .await;
    let Some(Body::ScratchReady(ready)) = &ev.body else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (ready.backend.as_str(), ready.size_bytes),
        ("lvm", 16 * MIB)
    );
    // The device the VM gets: a loop device over the LV's extents, ext4, the VM user's.
    assert!(ready.path.starts_with("/dev/loop"), "{}", ready.path);
    let meta = std::fs::metadata(&ready.path).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!((meta.uid(), meta.gid()), (VM_UID, VM_UID));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut magic = [0u8; 2];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&ready.path).unwrap();
        f.seek(SeekFrom::Start(1080)).unwrap();
        f.read_exact(&mut magic).unwrap();
    }
    assert_eq!(magic, [0x53, 0xef], "ext4 superblock magic");
    assert_eq!(vg.mappings(), vec![ready.path.clone()]);
    let size_of_dev = run_cmd(Command::new("blockdev").args(["--getsize64", &ready.path]));
    assert_eq!(size_of_dev, (16 * MIB).to_string());

    // Listed, with the tags naming VM and run.
    let lvs = vg.backend().list().await.unwrap();
    assert_eq!(lvs.len(), 1, "{lvs:?}");
    assert_eq!(lvs[0].name, "vm-a");
    assert_eq!(lvs[0].vm_id(), Some("vm-a"));
    assert_eq!(lvs[0].run(), Some("T1/slurm/a/1"));
    assert_eq!(lvs[0].loop_device(), Some(ready.path.as_str()));

    // 10 MiB take 3 extents (12 MiB); the same request again (another key, as a redelivery
    // after a lost ack) finds that LV and answers ready again instead of refusing its size.
    let odd = vm_requested("odd", 10 * MIB);
    let mut again = odd.clone();
    again.id = format!("{}#again", odd.id);
    for ev in [&odd, &again] {
        bus.publish(ev).await.unwrap();
        let ev = next(&mut sub, "scratch.ready of vm-odd", |e| {
            matches!(&e.body, Some(Body::ScratchReady(r)) if r.vm_id == "vm-odd")
                || matches!(&e.body, Some(Body::ScratchFailed(f)) if f.vm_id == "vm-odd")
        })
        .await;
        let Some(Body::ScratchReady(r)) = &ev.body else {
            panic!("{ev:?}")
        };
        assert_eq!(r.size_bytes, 10 * MIB);
    }
    assert_eq!(vg.lv_names(), ["vm-a", "vm-odd"]);
    bus.publish(&vm_stopped("odd")).await.unwrap();
    next(
        &mut sub,
        "resource.released of vm-odd",
        |e| matches!(&e.body, Some(Body::ResourceReleased(r)) if r.vm_id == "vm-odd"),
    )
    .await;

    // 48 MiB more do not fit in what is left (15 extents of 4 MiB, less 16 MiB: 44 MiB).
    bus.publish(&vm_requested("big", 48 * MIB)).await.unwrap();
    let ev = next(&mut sub, "scratch.failed of vm-big", |e| {
        matches!(&e.body, Some(Body::ScratchFailed(f)) if f.vm_id == "vm-big")
            || matches!(&e.body, Some(Body::ScratchReady(r)) if r.vm_id == "vm-big")
    })
    .await;
    let Some(Body::ScratchFailed(f)) = &ev.body else {
        panic!("a full VG must fail the request: {ev:?}")
    };
    assert!(
        f.reason.contains(&vg.name) && f.reason.contains("bytes free"),
        "{}",
        f.reason
    );
    assert_eq!(vg.lv_names(), ["vm-a"]);

    bus.publish(&vm_stopped("a")).await.unwrap();
    let ev = next(
        &mut sub,
        "resource.released of vm-a",
        |e| matches!(&e.body, Some(Body::ResourceReleased(r)) if r.vm_id == "vm-a"),
    )
    .await;
    let Some(Body::ResourceReleased(r)) = &ev.body else {
        unreachable!()
    };
    assert!(
        r.detail.contains(&format!("{}/vm-a", vg.name)),
        "{}",
        r.detail
    );
    assert!(vg.lv_names().is_empty(), "{:?}", vg.lv_names());
    assert!(vg.mappings().is_empty(), "{:?}", vg.mappings());
    assert_eq!(running.stop().await, 0);
}

/// Start-up reconcile on a VG holding: the LV of a prepared row (kept), the LV of a released
/// row, an LV whose tag says released though its row is prepared (a release that crashed
/// half-way), an LV tagged with a VM nobody knows, and an LV that is not ours (kept).
async fn lvm_reconcile_removes_released_and_unknown_lvs_and_keeps_the_rest() {
    let vg = Vg::new(64 * MIB);
    let backend = vg.backend();
    for vm in ["vm-keep", "vm-rel", "vm-halfway", "vm-stranger"] {
        backend
            .create(vm, &format!("T1/slurm/{vm}/1"), 4 * MIB, None)
            .await
            .unwrap();
    }
    vg.lvm(&[
        "lvchange",
        "--driverloaded",
        "n",
        "--addtag",
        TAG_RELEASED,
        &format!("{}/vm-halfway", vg.name),
    ]);
    vg.lvm(&[
        "lvcreate",
        "--driverloaded",
        "n",
        "-an",
        "-Zn",
        "-L",
        "4m",
        "-n",
        "not-ours",
        &vg.name,
    ]);
    assert_eq!(vg.mappings().len(), 4);
    let state_dir = tempfile::tempdir().unwrap();
    let store = KeyStore::open(&state_dir.path().join("keys.db"))
        .await
        .unwrap();
    state::init(store.pool()).await.unwrap();
    {
        let mut conn = store.pool().acquire().await.unwrap();
        for vm in ["vm-keep", "vm-rel", "vm-halfway"] {
            state::mark_prepared(&mut conn, vm, "k", "/dev/loopX", 4 * MIB)
                .await
                .unwrap();
        }
        state::mark_released(&mut conn, "vm-rel", "k", "/dev/loopX")
            .await
            .unwrap();
    }
    let volumes = Volumes::Lvm(backend.clone());
    let mut removed = wnodes_scratch::reconcile(&volumes, store.read_pool())
        .await
        .unwrap();
    removed.sort();
    assert_eq!(removed, ["vm-halfway", "vm-rel", "vm-stranger"]);
    assert_eq!(vg.lv_names(), ["not-ours", "vm-keep"]);
    let kept = backend.device_of("vm-keep").await.unwrap().unwrap();
    assert_eq!(vg.mappings(), vec![kept.display().to_string()]);
    // Nothing left to do the second time.
    let again = wnodes_scratch::reconcile(&volumes, store.read_pool())
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

/// A VM (qemu, TCG, the test guest, as the VM's own uid) gets an LV's extents mapped through a
/// loop device as its scratch disk and writes a file there; the file is read back from the
/// LV's extents inside the PV (the loop device's offset), and the release leaves nothing.
async fn vm_writes_its_scratch_on_an_lv_mapped_through_a_loop_device() {
    let _lock = vm_lock();
    let vg = Vg::new(64 * MIB);
    let backend = vg.backend();
    let user = proto::HostUser {
        uid: VM_UID,
        gid: VM_UID,
    };
    let dev = backend
        .create("vm-guest", "T1/slurm/guest/1", 32 * MIB, Some(&user))
        .await
        .unwrap();
    let lv = backend.find("vm-guest").await.unwrap().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let job = work.path().join("job.sh");
    std::fs::write(
        &job,
        "echo hello; echo written-on-the-lv > /scratch/x; sync; exit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&job, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut qemu =
        wnodes_testkit::vm::guest_qemu(work.path(), &job, "wnodes.scratch=/dev/vdb", Some(VM_UID));
    qemu.arg("-drive").arg(format!(
        "file={},format=raw,if=virtio,snapshot=off,cache=none",
        dev.display()
    ));
    let out = tokio::time::timeout(Duration::from_secs(240), qemu.output())
        .await
        .expect("the VM ends within 4 minutes")
        .unwrap();
    let read = |f: &str| std::fs::read_to_string(work.path().join(f)).unwrap_or_default();
    assert!(
        out.status.success() && read("status.log").lines().any(|l| l == "WNODES exit=3"),
        "qemu: {}\n{}\nconsole:\n{}\nstatus:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        read("console.log"),
        read("status.log")
    );
    assert_eq!(read("output.log").trim(), "hello");
    assert!(
        read("status.log")
            .lines()
            .any(|l| l == "WNODES phase=scratch"),
        "{}",
        read("status.log")
    );
    // What the guest wrote, read from the LV's device ...
    let got = run_cmd(Command::new("debugfs").args(["-R", "cat /x"]).arg(&dev));
    assert_eq!(got, "written-on-the-lv");
    // ... lies in the LV's extents inside the PV: a fresh mapping at the offset lvs and pvs
    // give (pe_start + first extent * extent size) over the PV's backing file sees it too.
    let (pv, first) = lv.single_segment().unwrap();
    assert_eq!(pv, vg.pv);
    let pe_start: u64 = vg
        .lvm(&[
            "pvs",
            "--driverloaded",
            "n",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "pe_start",
            &vg.pv,
        ])
        .parse()
        .unwrap();
    let extent: u64 = vg
        .lvm(&[
            "vgs",
            "--driverloaded",
            "n",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_extent_size",
            &vg.name,
        ])
        .parse()
        .unwrap();
    let offset = pe_start + first * extent;
    let image = vg.pv_image();
    let check = run_cmd(
        Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--read-only",
                "--offset",
                &offset.to_string(),
                "--sizelimit",
                &lv.size_bytes.to_string(),
            ])
            .arg(&image),
    );
    let seen = Command::new("debugfs")
        .args(["-R", "cat /x", &check])
        .output();
    let _ = Command::new("losetup").args(["-d", &check]).output();
    assert_eq!(
        String::from_utf8_lossy(&seen.unwrap().stdout).trim(),
        "written-on-the-lv"
    );

    assert!(backend.remove("vm-guest").await.unwrap());
    assert!(vg.lv_names().is_empty());
    assert!(vg.mappings().is_empty(), "{:?}", vg.mappings());
}

fn main() -> std::process::ExitCode {
    host::main(vec![
        host_test!(multi_thread lvm_create_list_full_vg_and_remove_through_the_service needs NEEDS),
        host_test!(multi_thread lvm_reconcile_removes_released_and_unknown_lvs_and_keeps_the_rest needs NEEDS),
        host_test!(multi_thread vm_writes_its_scratch_on_an_lv_mapped_through_a_loop_device needs VM_NEEDS),
    ])
}
