//! What the launcher's fuzz target checks (`fuzz/`, run by hand with `scripts/fuzz.sh launch`),
//! shared with the test that replays its committed corpus (`tests/fuzz_corpus.rs`), so a crash
//! input stays a regression test.
//!
//! [`exercise_launch`] takes the values an event hands the launcher (the VM id of a spec; the
//! paths, format, tap, MAC and addresses of the four preparation results; a host path against
//! the host policy's roots) as newline-separated fields and runs them through the validators
//! that guard qemu's command line and the host: [`VmDir::new`], [`build_args`] and
//! [`wnodes_runtime::host_paths::resolve_under`]. Nothing may panic, and whatever is accepted
//! must be harmless: every option qemu gets carries only the keys the launcher means to set
//! (no `,file=/etc/shadow` smuggled in a path), the kernel command line only the launcher's
//! parameters, the VM id is one path component, and a resolved host path lies under a root.
//!
//! [`exercise_policy`] takes what a `job.started` asks for (VO, image hint, cores, memory,
//! scratch, walltime, payload, job id) as newline-separated fields and runs it through the site
//! policy ([`PolicyConfig::apply`]). Nothing may panic, and a spec it makes stays inside the
//! policy: a configured image (the VO's own unless the job named another configured one), cores,
//! memory and scratch within the maxima and never 0, a walltime of whole seconds and at least
//! one, an inline or command payload, a valid VM id.

use std::path::{Component, Path, PathBuf};

use wnodes_proto::v1::{
    JobCommand, JobDescription, JobPayload, JobRunRef, ResourceRequest, job_payload,
};

use wnodes_proto::v1::{ImageReady, NetworkMode, NetworkReady, ScratchReady, StorageReady, VmSpec};

use crate::{
    config::Accel,
    policy::{PolicyConfig, is_valid_vm_id},
    qemu::{LaunchInputs, build_args},
    vm_dir::VmDir,
};

/// The keys each qemu option may carry, the first item's fixed value where it has one.
fn allowed_keys(
    option: &str,
) -> Option<(&'static [&'static str], Option<&'static [&'static str]>)> {
    Some(match option {
        "-drive" => (&["file", "format", "if", "readonly", "snapshot"], None),
        "-netdev" => (
            &["id", "ifname", "script", "downscript"],
            Some(&["user", "tap"]),
        ),
        "-device" => (&["netdev", "mac"], Some(&["virtio-net-pci"])),
        "-fw_cfg" => (&["name", "file"], None),
        "-qmp" => (&["server", "wait"], None),
        _ => return None,
    })
}

/// The kernel parameters the launcher sets.
const KERNEL_KEYS: [&str; 11] = [
    "console",
    "root",
    "panic",
    "quiet",
    "wnodes.ip",
    "wnodes.gw",
    "wnodes.sshfs",
    "wnodes.nfs",
    "wnodes.scratch",
    "wnodes.uid",
    "wnodes.gid",
];

fn check_option(option: &str, value: &str) {
    match option {
        "-serial" => assert!(
            value.starts_with("file:") && !value.contains(','),
            "-serial {value:?}"
        ),
        "-append" => {
            assert!(
                !value.contains(['"', '\'', '\\', '\n']),
                "kernel command line {value:?}"
            );
            for word in value.split(' ') {
                let key = word.split_once('=').map_or(word, |(k, _)| k);
                assert!(
                    KERNEL_KEYS.contains(&key),
                    "kernel parameter {word:?} in {value:?}"
                );
            }
        }
        _ => {
            let Some((keys, first)) = allowed_keys(option) else {
                return;
            };
            let mut items = value.split(',');
            if let Some(first) = first {
                let head = items.next().unwrap_or_default();
                assert!(first.contains(&head), "{option} {value:?}");
            } else if option == "-qmp" {
                let head = items.next().unwrap_or_default();
                assert!(head.starts_with("unix:"), "{option} {value:?}");
            }
            let mut files = 0;
            for item in items {
                let key = item.split_once('=').map_or(item, |(k, _)| k);
                assert!(keys.contains(&key), "{option} {value:?}: key {key:?}");
                files += usize::from(key == "file");
            }
            assert!(files <= 1, "{option} {value:?} names more than one file");
        }
    }
}

/// Field `i` of the newline-separated input (empty when missing).
fn field<'a>(fields: &[&'a str], i: usize) -> &'a str {
    fields.get(i).copied().unwrap_or_default()
}

/// Runs `data` through the launcher's validators (see the module doc). Returns whether qemu's
/// command line was built.
pub fn exercise_launch(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let fields: Vec<&str> = text.split('\n').collect();
    let vm_id = field(&fields, 0);
    let vms = Path::new("/var/lib/wnodes/launcher/vms");
    let vm = match VmDir::new(vms, vm_id) {
        Ok(vm) => {
            let mut parts = Path::new(vm_id).components();
            assert!(
                matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none(),
                "VM id {vm_id:?} is not one path component"
            );
            vm
        }
        // Refused: the rest runs on a valid id.
        Err(_) => match VmDir::new(vms, "vm-0123456789ab") {
            Ok(vm) => vm,
            Err(_) => return false,
        },
    };

    // The host policy's path check.
    let roots = [
        PathBuf::from("/var/lib/wnodes/image/cache"),
        PathBuf::from("/tmp"),
    ];
    if let Ok(resolved) = wnodes_runtime::host_paths::resolve_under(field(&fields, 13), &roots) {
        assert!(
            roots.iter().any(|r| resolved.starts_with(r)),
            "{resolved:?} is not under a root"
        );
        assert!(
            !resolved.components().any(|c| c == Component::ParentDir),
            "{resolved:?} keeps a .."
        );
    }

    let spec = VmSpec {
        vm_id: vm.vm_id().to_owned(),
        cores: u32::from(data.first().copied().unwrap_or(1)),
        memory_bytes: 256 << 20,
        ..Default::default()
    };
    let image = ImageReady {
        path: field(&fields, 1).into(),
        kernel_path: field(&fields, 2).into(),
        initrd_path: field(&fields, 3).into(),
        format: field(&fields, 4).into(),
        ..Default::default()
    };
    let scratch = ScratchReady {
        path: field(&fields, 5).into(),
        ..Default::default()
    };
    let user_mode = field(&fields, 6).starts_with('u');
    let network = NetworkReady {
        mode: if user_mode {
            NetworkMode::User
        } else {
            NetworkMode::VirtioTap
        } as i32,
        tap: field(&fields, 7).into(),
        mac: field(&fields, 8).into(),
        address: field(&fields, 9).into(),
        gateway: field(&fields, 10).into(),
        ..Default::default()
    };
    let storage = StorageReady {
        address: field(&fields, 11).into(),
        port: 2222,
        remote_path: field(&fields, 12).into(),
        ..Default::default()
    };
    let inputs = LaunchInputs {
        accel: Accel::Tcg,
        vm: &vm,
        spec: &spec,
        image: &image,
        scratch: Some(&scratch),
        network: Some(&network),
        storage: Some(&storage),
        sandbox: true,
        tuning: None,
    };
    let Ok(args) = build_args(&inputs) else {
        return false;
    };
    let mut it = args.iter();
    while let Some(option) = it.next() {
        assert!(
            option.starts_with('-'),
            "a value where an option belongs: {option:?}"
        );
        if matches!(option.as_str(), "-nodefaults" | "-no-reboot" | "-snapshot") {
            continue;
        }
        let value = it.next();
        assert!(value.is_some(), "option {option} without its value");
        if let Some(value) = value {
            check_option(option, value);
        }
    }
    true
}

/// The site policy [`exercise_policy`] applies: two VOs, each its own image.
fn fuzz_policy() -> PolicyConfig {
    PolicyConfig {
        vo_images: [
            ("atlas".to_string(), "el9".to_string()),
            ("cms".to_string(), "cms-el8".to_string()),
        ]
        .into(),
        max_cores: 8,
        max_memory_bytes: 16 << 30,
        max_scratch_bytes: 10 << 30,
        ..PolicyConfig::default()
    }
}

/// Runs a job's request (newline-separated fields: VO, image hint, cores, memory bytes, scratch
/// bytes, walltime seconds, walltime nanoseconds, payload kind `command|inline|ref|none`,
/// payload text, job id; a number that does not parse is 0, an empty job id means no run)
/// through [`PolicyConfig::apply`]. Panics when an accepted spec breaks the policy. Returns
/// whether a spec was made.
pub fn exercise_policy(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let fields: Vec<&str> = text.split('\n').collect();
    let num = |i: usize| field(&fields, i).trim().parse::<i128>().unwrap_or(0);
    let clamp_u64 = |v: i128| u64::try_from(v.max(0)).unwrap_or(u64::MAX);
    let (vo, hint) = (field(&fields, 0), field(&fields, 1));
    let payload_text = field(&fields, 8).as_bytes().to_vec();
    let kind = match field(&fields, 7) {
        "command" => Some(job_payload::Kind::Command(JobCommand {
            executable: String::from_utf8_lossy(&payload_text).into_owned(),
            args: Vec::new(),
        })),
        "inline" => Some(job_payload::Kind::InlineScript(payload_text)),
        "ref" => Some(job_payload::Kind::ScriptRef(Default::default())),
        _ => None,
    };
    let job_id = field(&fields, 9);
    let job = JobDescription {
        run: (!job_id.is_empty()).then(|| JobRunRef {
            site: "INFN-T1".into(),
            job_id: job_id.into(),
            run_attempt: 1,
            ..Default::default()
        }),
        vo: vo.into(),
        image_hint: hint.into(),
        resources: Some(ResourceRequest {
            cores: u32::try_from(clamp_u64(num(2))).unwrap_or(u32::MAX),
            memory_bytes: clamp_u64(num(3)),
            scratch_bytes: clamp_u64(num(4)),
            walltime: Some(prost_types::Duration {
                seconds: i64::try_from(num(5)).unwrap_or(i64::MAX),
                nanos: i32::try_from(num(6)).unwrap_or(i32::MAX),
            }),
        }),
        payload: (field(&fields, 7) != "absent").then_some(JobPayload {
            kind,
            ..Default::default()
        }),
        ..Default::default()
    };
    let policy = fuzz_policy();
    let Ok(spec) = policy.apply(&job) else {
        return false;
    };
    let vo_image = policy.vo_images.get(vo);
    assert!(
        vo_image.is_some(),
        "a spec for VO {vo:?}, which has no image"
    );
    // Whatever the hint, a job runs its own VO's image and never another VO's.
    assert_eq!(Some(&spec.image), vo_image, "not the VO's own image");
    assert_eq!(spec.vo, vo);
    assert!(
        (1..=policy.max_cores).contains(&spec.cores),
        "cores {}",
        spec.cores
    );
    assert!(
        (1..=policy.max_memory_bytes).contains(&spec.memory_bytes),
        "memory {}",
        spec.memory_bytes
    );
    assert!(
        (1..=policy.max_scratch_bytes).contains(&spec.scratch_bytes),
        "scratch {}",
        spec.scratch_bytes
    );
    let wall = spec.walltime.unwrap_or_default();
    assert!(
        wall.seconds >= 1 && wall.nanos == 0,
        "walltime {wall:?} (requested {}, {})",
        num(5),
        num(6)
    );
    assert!(
        matches!(
            spec.payload.as_ref().and_then(|p| p.kind.as_ref()),
            Some(job_payload::Kind::Command(_) | job_payload::Kind::InlineScript(_))
        ),
        "payload {:?}",
        spec.payload
    );
    assert!(is_valid_vm_id(&spec.vm_id), "vm id {:?}", spec.vm_id);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "key \"cache\"")]
    fn a_key_smuggled_into_an_option_is_caught() {
        check_option("-drive", "file=/img/a,if=virtio,cache=unsafe");
    }

    #[test]
    #[should_panic(expected = "kernel parameter")]
    fn a_kernel_parameter_smuggled_in_is_caught() {
        check_option("-append", "console=ttyS0 init=/bin/sh");
    }

    #[test]
    fn the_launchers_own_options_pass() {
        check_option("-drive", "file=/img/a,format=raw,if=virtio,readonly=on");
        check_option(
            "-netdev",
            "tap,id=n0,ifname=wn-0123456789ab,script=no,downscript=no",
        );
        check_option("-qmp", "unix:/s/qmp.sock,server=on,wait=off");
        check_option(
            "-append",
            "console=ttyS0 root=/dev/vda wnodes.sshfs=10.0.2.2:2222:/e",
        );
    }
}
