//! The qemu command line (`guest/README.md`, "Guest contract"), the payload script, and
//! starting qemu detached.
//!
//! qemu is started through the launcher's wrapper (`sh` joining the VM's cgroup, `setsid`,
//! `setpriv` to the VM's own user, see [`crate::confine`]), which execs it already detached
//! (its own session) and unprivileged; no `-daemonize`, no `-runas` (both conflict with
//! `-sandbox`'s denials). It survives a launcher crash or restart: the launcher never kills it
//! on drop, and a new launcher finds it through its pid file and QMP socket. No shell
//! interpolation anywhere: qemu gets an argument vector, and every value spliced into an
//! option string (paths, tap names, MACs, kernel parameters) is validated first.
//!
//! | module | what it holds |
//! |---|---|
//! | [`args`] | [`LaunchInputs`] → qemu's argument vector, every spliced value checked |
//! | [`payload`] | the job's payload script (`opt/wnodes/job.sh`), shell-quoted |
//! | [`spawn`] | starting qemu through the wrapper in the VM's cgroup as the VM's user, [`launch`] |

mod args;
mod payload;
mod spawn;

use std::{path::PathBuf, time::Duration};

pub use args::{LaunchInputs, build_args, option_path};
pub use payload::{payload_script, sh_quote};
pub use spawn::{JOIN_CGROUPS_AND_EXEC, Spawned, Wrapper, launch, spawn_detached};

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
    #[error("qemu did not finish initialising (its QMP monitor did not greet) within {0:?}")]
    Timeout(Duration),
    #[error("qemu failed to start ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("qemu started but its pid file {0} is missing or unreadable")]
    NoPid(PathBuf),
    #[error(transparent)]
    State(#[from] crate::vm_dir::StateError),
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    #[error("qemu started but its vCPUs could not be pinned")]
    Pin(#[source] crate::cores::PinError),
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use wnodes_proto::v1::{
        ImageReady, JobCommand, JobOwner, JobPayload, NetworkMode, NetworkReady, ScratchReady,
        StorageReady, VmSpec, job_payload,
    };

    use super::*;
    use crate::{config::Accel, vm_dir::VmDir};

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
            sandbox: true,
            tuning: None,
        })
        .unwrap();
        let d = "/state/vms/vm-0123456789ab";
        let q = "/state/vms/vm-0123456789ab/qemu";
        let expected: Vec<String> = [
            "-accel", "tcg", "-M", "pc", "-m", "256M", "-smp", "2", "-nodefaults", "-display",
            "none", "-no-reboot", "-snapshot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-name", "wnodes-vm-0123456789ab",
            "-kernel", "/img/vmlinux", "-initrd", "/img/initrd.img", "-append",
            "console=ttyS0 root=/dev/vda panic=-1 quiet wnodes.ip=10.231.1.2/24 wnodes.gw=10.231.1.1 wnodes.sshfs=10.231.1.1:2222:/home/alice wnodes.scratch=/dev/vdb wnodes.uid=1000 wnodes.gid=100",
            "-drive", "file=/img/rootfs.ext4,format=raw,if=virtio,readonly=on",
            "-drive", "file=/state/scratch/vm-0123456789ab.img,format=raw,if=virtio,snapshot=off",
            "-fw_cfg", &format!("name=opt/wnodes/job.sh,file={d}/job.sh"),
            "-serial", &format!("file:{q}/console.log"),
            "-serial", &format!("file:{q}/output.log"),
            "-serial", &format!("file:{q}/status.log"),
            "-netdev", "tap,id=n0,ifname=wn-0123456789ab,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-qmp", &format!("unix:{q}/qmp.sock,server=on,wait=off"),
            "-qmp", &format!("unix:{q}/qmp-events.sock,server=on,wait=off"),
            "-pidfile", &format!("{q}/qemu.pid"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(args, expected);
    }

    #[test]
    fn an_sriov_vf_is_passed_through_with_vfio_pci_and_no_netdev() {
        let (vm, spec, image) = fixture(Path::new("/s"));
        let mut net = NetworkReady {
            mode: NetworkMode::Sriov as i32,
            mac: "52:54:00:12:34:56".into(),
            address: "10.231.2.5/24".into(),
            gateway: "10.231.2.1".into(),
            vlan: 100,
            pci_address: "0000:00:12.2".into(),
            ..Default::default()
        };
        fn args_for(
            vm: &VmDir,
            spec: &VmSpec,
            image: &ImageReady,
            net: &NetworkReady,
        ) -> Result<Vec<String>, QemuError> {
            build_args(&LaunchInputs {
                accel: Accel::Kvm,
                vm,
                spec,
                image,
                scratch: None,
                network: Some(net),
                storage: None,
                sandbox: true,
                tuning: None,
            })
        }
        let args = args_for(&vm, &spec, &image, &net).unwrap();
        let dev: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(a, _)| *a == "-device")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(dev, ["vfio-pci,host=0000:00:12.2"]);
        assert!(!args.iter().any(|a| a == "-netdev"), "{args:?}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.contains("wnodes.ip=10.231.2.5/24 wnodes.gw=10.231.2.1"),
            "{append}"
        );
        for bad in [
            "",
            "0000:00:12.2,x-igd-opregion=on",
            "00:12.2",
            "0000:00:12.g",
        ] {
            net.pci_address = bad.into();
            let e = args_for(&vm, &spec, &image, &net).unwrap_err();
            assert!(e.to_string().contains("VF PCI address"), "{bad}: {e}");
        }
    }

    #[test]
    fn user_mode_networking_points_sshfs_at_the_host() {
        let (vm, mut spec, image) = fixture(Path::new("/s"));
        spec.owner = None;
        let net = NetworkReady {
            mode: NetworkMode::User as i32,
            mac: "52:54:00:00:00:01".into(),
            address: "10.0.2.15/24".into(),
            gateway: "10.0.2.2".into(),
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
            sandbox: false,
            tuning: None,
        })
        .unwrap();
        assert!(!args.iter().any(|a| a == "-sandbox" || a == "-daemonize"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.ends_with(
            "wnodes.ip=10.0.2.15/24 wnodes.gw=10.0.2.2 wnodes.sshfs=10.0.2.2:40000:/export"
        ));
        assert!(args.windows(2).any(|w| w == ["-netdev", "user,id=n0"]));
        assert!(args.windows(2).any(|w| w == ["-accel", "kvm"]));
        assert!(!args.iter().any(|a| a.contains("snapshot=off")));
    }

    #[test]
    fn an_nfs_export_is_mounted_from_the_gateway_address() {
        let (vm, spec, image) = fixture(Path::new("/s"));
        let net = NetworkReady {
            mode: NetworkMode::VirtioTap as i32,
            tap: "wn-0123456789ab".into(),
            mac: "52:54:00:12:34:56".into(),
            address: "10.231.1.2/24".into(),
            gateway: "10.231.1.1".into(),
            ..Default::default()
        };
        let storage = StorageReady {
            mode: wnodes_proto::v1::StorageMode::Nfs as i32,
            address: "10.231.1.1".into(),
            port: 2049,
            remote_path: "/wnodes/vm-0123456789ab".into(),
            ..Default::default()
        };
        let inputs = |storage| LaunchInputs {
            accel: Accel::Tcg,
            vm: &vm,
            spec: &spec,
            image: &image,
            scratch: None,
            network: Some(&net),
            storage: Some(storage),
            sandbox: true,
            tuning: None,
        };
        let args = build_args(&inputs(&storage)).unwrap();
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.contains(" wnodes.nfs=10.231.1.1:2049:/wnodes/vm-0123456789ab "),
            "{append}"
        );
        assert!(!append.contains("wnodes.sshfs"));
        let hostile = StorageReady {
            address: "10.231.1.1 init=/bin/sh".into(),
            ..storage.clone()
        };
        assert!(build_args(&inputs(&hostile)).is_err());
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
                sandbox: true,
                tuning: None,
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

    /// The arguments for the fixture with a scratch disk, a user-mode network and `tuning`.
    fn tuned(tuning: Option<&crate::tuning::VmTuning>) -> Result<Vec<String>, QemuError> {
        let (vm, mut spec, image) = fixture(Path::new("/s"));
        spec.memory_bytes = 255 * 1024 * 1024;
        let scratch = ScratchReady {
            path: "/scratch/vm.img".into(),
            ..Default::default()
        };
        let net = NetworkReady {
            mode: NetworkMode::User as i32,
            mac: "52:54:00:00:00:01".into(),
            ..Default::default()
        };
        build_args(&LaunchInputs {
            accel: Accel::Tcg,
            vm: &vm,
            spec: &spec,
            image: &image,
            scratch: Some(&scratch),
            network: Some(&net),
            storage: None,
            sandbox: true,
            tuning,
        })
    }

    fn has(args: &[String], pair: [&str; 2]) -> bool {
        args.windows(2).any(|w| w == pair)
    }

    #[test]
    fn no_tuning_leaves_the_command_line_as_it_was() {
        use crate::tuning::VmTuning;
        let plain = tuned(None).unwrap();
        assert_eq!(tuned(Some(&VmTuning::default())).unwrap(), plain);
        assert!(has(&plain, ["-M", "pc"]));
        assert!(has(&plain, ["-m", "255M"]));
        assert!(has(&plain, ["-name", "wnodes-vm-0123456789ab"]));
        assert!(has(
            &plain,
            [
                "-drive",
                "file=/img/rootfs.ext4,format=raw,if=virtio,readonly=on"
            ]
        ));
        assert!(has(
            &plain,
            [
                "-drive",
                "file=/scratch/vm.img,format=raw,if=virtio,snapshot=off"
            ]
        ));
        assert!(
            !plain
                .iter()
                .any(|a| a == "-object" || a.starts_with("virtio-blk") || a.contains("cache="))
        );
    }

    #[test]
    fn each_knob_is_on_the_command_line() {
        use crate::tuning::{DiskAio, DiskCache, Tuning, VmTuning};
        let with = |tuning: Tuning| VmTuning {
            tuning,
            host_cores: vec![1, 0],
            hugepages_path: None,
        };
        // Huge pages: a preallocated memfd backend, the size rounded up to whole 2 MiB pages.
        let args = tuned(Some(&with(Tuning {
            hugepages: true,
            ..Tuning::default()
        })))
        .unwrap();
        assert!(has(&args, ["-M", "pc,memory-backend=mem0"]), "{args:?}");
        assert!(has(&args, ["-m", "256M"]), "{args:?}");
        assert!(has(
            &args,
            [
                "-object",
                "memory-backend-memfd,id=mem0,size=256M,hugetlb=on,hugetlbsize=2M,share=off,prealloc=on"
            ]
        ));
        // ... or a file on a hugetlbfs mount.
        let mut on_mount = with(Tuning {
            hugepages: true,
            mem_merge: Some(false),
            ..Tuning::default()
        });
        on_mount.hugepages_path = Some("/dev/hugepages".into());
        let args = tuned(Some(&on_mount)).unwrap();
        assert!(
            has(&args, ["-M", "pc,memory-backend=mem0,mem-merge=off"]),
            "{args:?}"
        );
        assert!(has(
            &args,
            [
                "-object",
                "memory-backend-file,id=mem0,size=256M,mem-path=/dev/hugepages,share=off,prealloc=on"
            ]
        ));
        on_mount.hugepages_path = Some("/dev/hugepages,mem-path=/etc".into());
        assert!(tuned(Some(&on_mount)).is_err());
        // KSM.
        let args = tuned(Some(&with(Tuning {
            mem_merge: Some(true),
            ..Tuning::default()
        })))
        .unwrap();
        assert!(has(&args, ["-M", "pc,mem-merge=on"]), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("memory-backend")));
        // Pinned vCPUs: named threads (the pinning itself is done from outside qemu).
        let args = tuned(Some(&with(Tuning {
            pin_vcpus: true,
            ..Tuning::default()
        })))
        .unwrap();
        assert!(has(
            &args,
            ["-name", "wnodes-vm-0123456789ab,debug-threads=on"]
        ));
        // Disk cache and AIO on both disks, in their if=virtio drives.
        let args = tuned(Some(&with(Tuning {
            disk_cache: Some(DiskCache::None),
            disk_aio: Some(DiskAio::Native),
            ..Tuning::default()
        })))
        .unwrap();
        assert!(has(
            &args,
            [
                "-drive",
                "file=/img/rootfs.ext4,format=raw,if=virtio,readonly=on,cache=none,aio=native"
            ]
        ));
        assert!(has(
            &args,
            [
                "-drive",
                "file=/scratch/vm.img,format=raw,if=virtio,snapshot=off,cache=none,aio=native"
            ]
        ));
        // Native AIO without O_DIRECT is refused here too, not only in the config.
        let err = tuned(Some(&with(Tuning {
            disk_cache: Some(DiskCache::Writeback),
            disk_aio: Some(DiskAio::Native),
            ..Tuning::default()
        })))
        .unwrap_err();
        assert!(err.to_string().contains("exclude each other"), "{err}");
    }

    #[test]
    fn an_iothread_makes_each_disk_a_device_in_the_same_order() {
        use crate::tuning::{DiskAio, DiskCache, Tuning, VmTuning};
        let t = VmTuning {
            tuning: Tuning {
                iothread: true,
                disk_cache: Some(DiskCache::Writethrough),
                disk_aio: Some(DiskAio::IoUring),
                ..Tuning::default()
            },
            ..VmTuning::default()
        };
        let args = tuned(Some(&t)).unwrap();
        assert!(has(&args, ["-object", "iothread,id=io0"]));
        let to = args.iter().position(|a| a == "-fw_cfg").unwrap();
        let tail: Vec<&str> = args[..to]
            .iter()
            .map(String::as_str)
            .skip_while(|a| *a != "-append")
            .skip(2)
            .collect();
        assert_eq!(
            tail,
            [
                "-drive",
                "file=/img/rootfs.ext4,format=raw,if=none,id=vda,readonly=on,cache=writethrough,aio=io_uring",
                "-device",
                "virtio-blk-pci,drive=vda,id=vda,iothread=io0",
                "-drive",
                "file=/scratch/vm.img,format=raw,if=none,id=vdb,snapshot=off,cache=writethrough,aio=io_uring",
                "-device",
                "virtio-blk-pci,drive=vdb,id=vdb,iothread=io0",
            ]
        );
        // The guest still finds its root on the first disk.
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.contains("root=/dev/vda") && append.contains("wnodes.scratch=/dev/vdb"));
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
