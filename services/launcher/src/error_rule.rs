//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use std::time::Duration;

use prost::Message as _;
use wnodes_bus::BusError;
use wnodes_testkit::error_rule::{SOURCE_TEXT, io_source};

use crate::{
    confine::ConfineError,
    cores::PinError,
    policy::{PolicyConfigError, PolicyError},
    qemu::QemuError,
    qmp::QmpError,
    state::LauncherError,
    tuning::TuningConfigError,
    usage::UsageError,
    vm_dir::StateError,
    vm_table::VmTableError,
    watch::WatchError,
};

const VM: &str = "vm-0123456789ab";

fn state_error() -> StateError {
    StateError::Io {
        op: "read",
        path: "/var/lib/wnodes/vms/vm-0123456789ab/running.json".into(),
        source: io_source(),
    }
}

fn join_error() -> VmTableError {
    VmTableError::Sql {
        op: "insert",
        source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
    }
}

fn pin_error() -> PinError {
    PinError::Affinity {
        tid: 4242,
        cores: vec![2, 3],
        source: nix::Error::EPERM,
    }
}

fn policy_config_error() -> PolicyConfigError {
    PolicyConfigError("default_cores 0 must be between 1 and max_cores 8".into())
}

wnodes_testkit::error_rule! {
    StateError {
        StateError::InvalidVmId(_) => StateError::InvalidVmId("vm-../etc".into()),
        StateError::Io { .. } => state_error(),
        StateError::Json { .. } => StateError::Json {
            path: "/var/lib/wnodes/vms/vm-0123456789ab/running.json".into(),
            source: serde_json::from_str::<u8>("{").unwrap_err(),
        },
        StateError::Proto { .. } => StateError::Proto {
            path: "/var/lib/wnodes/vms/vm-0123456789ab/spec.json".into(),
            source: prost_types::Timestamp::decode(&[0xff_u8][..]).unwrap_err(),
        },
        StateError::Hex { .. } => StateError::Hex {
            path: "/var/lib/wnodes/vms/vm-0123456789ab/spec.json".into(),
            source: hex::FromHexError::OddLength,
        },
    }
    VmTableError {
        VmTableError::Sql { .. } => join_error(),
        VmTableError::Corrupt { .. } => VmTableError::Corrupt {
            vm_id: VM.into(),
            column: "state",
            detail: "unknown state \"Flying\"".into(),
        },
    }
    UsageError {
        UsageError::Cgroup { .. } => UsageError::Cgroup {
            op: "create",
            path: "/sys/fs/cgroup/cpuacct/wnodes/vm-0123456789ab".into(),
            source: io_source(),
        },
        UsageError::NoCgroup(_) => UsageError::NoCgroup(VM.into()),
        UsageError::State(_) => UsageError::State(state_error()),
    }
    QemuError {
        QemuError::BadValue { .. } => QemuError::BadValue {
            what: "kernel path",
            value: "/boot/vmlinuz,if=none".into(),
            why: "contains a comma",
        },
        QemuError::Payload(_) => QemuError::Payload("environment name \"A;B\" is not a shell name".into()),
        QemuError::Spawn { .. } => QemuError::Spawn {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            source: io_source(),
        },
        QemuError::Timeout(_) => QemuError::Timeout(Duration::from_secs(30)),
        QemuError::Failed { .. } => QemuError::Failed {
            status: "exit status: 1".into(),
            stderr: "qemu-system-x86_64: -drive file=/x: Could not open '/x'".into(),
        },
        QemuError::NoPid(_) => QemuError::NoPid("/var/lib/wnodes/vms/vm-0123456789ab/qemu.pid".into()),
        QemuError::State(_) => QemuError::State(state_error()),
        QemuError::Confine(_) => QemuError::Confine(ConfineError::Exhausted { first: 3_000_000_000, last: 3_000_000_009 }),
        QemuError::Pin(_) => QemuError::Pin(pin_error()),
        QemuError::Io { .. } => QemuError::Io {
            op: "create",
            path: "/var/lib/wnodes/vms/vm-0123456789ab/qemu/qemu.log".into(),
            source: io_source(),
        },
    }
    ConfineError {
        ConfineError::BadRange { .. } => ConfineError::BadRange { first: 0, count: 10 },
        ConfineError::NotRoot { .. } => ConfineError::NotRoot { euid: 1000 },
        ConfineError::Exhausted { .. } => ConfineError::Exhausted { first: 3_000_000_000, last: 3_000_000_009 },
        ConfineError::Io { .. } => ConfineError::Io {
            op: "change the owner of",
            path: "/var/lib/wnodes/vms/vm-0123456789ab/qemu".into(),
            source: io_source(),
        },
        ConfineError::Inspect { .. } => ConfineError::Inspect {
            what: "image",
            path: "/var/lib/wnodes/image/cache/el9.img".into(),
            at: "/var/lib/wnodes/image/cache".into(),
            source: io_source(),
        },
        ConfineError::Unreachable { .. } => ConfineError::Unreachable {
            what: "image",
            path: "/var/lib/wnodes/image/cache/el9.img".into(),
            how: "read",
            uid: 3_000_000_000,
            gid: 3_000_000_000,
            blocker: "cannot enter /var/lib/wnodes/image".into(),
            mode: 0o700,
            owner: 0,
            group: 0,
        },
    }
    PinError {
        PinError::Qmp(_) => PinError::Qmp(QmpError::Closed { path: "qmp.sock".into() }),
        PinError::NoThreads(_) => PinError::NoThreads("[{\"cpu-index\":0}]".into()),
        PinError::Affinity { .. } => pin_error(),
    }
    TuningConfigError {
        TuningConfigError { .. } => TuningConfigError {
            key: "queues.short".into(),
            reason: "disk_aio = \"native\" needs O_DIRECT: disk_cache = \"none\" or \"directsync\"".into(),
        },
    }
    QmpError {
        QmpError::Io { .. } => QmpError::Io {
            path: "/var/lib/wnodes/vms/vm-0123456789ab/qmp.sock".into(),
            source: io_source(),
        },
        QmpError::Timeout { .. } => QmpError::Timeout { path: "qmp.sock".into() },
        QmpError::Closed { .. } => QmpError::Closed { path: "qmp.sock".into() },
        QmpError::Protocol { .. } => QmpError::Protocol {
            path: "qmp.sock".into(),
            line: "{\"QMP\"".into(),
        },
        QmpError::Command { .. } => QmpError::Command {
            path: "qmp.sock".into(),
            command: "system_powerdown".into(),
            error: "{\"class\":\"GenericError\"}".into(),
        },
    }
    WatchError {
        WatchError::NotStarted(_) => WatchError::NotStarted(VM.into()),
        WatchError::State(_) => WatchError::State(state_error()),
    }
    PolicyError {
        PolicyError::NoImage { .. } => PolicyError::NoImage { vo: "atlas".into() },
        PolicyError::AboveMaximum { .. } => PolicyError::AboveMaximum {
            resource: "cores",
            requested: 9,
            maximum: 8,
        },
        PolicyError::UnknownImage { .. } => PolicyError::UnknownImage { hint: "el7".into() },
        PolicyError::ImageOfAnotherVo { .. } => PolicyError::ImageOfAnotherVo {
            hint: "cms-el9".into(),
            owner: "cms".into(),
            vo: "atlas".into(),
        },
        PolicyError::NoPayload => PolicyError::NoPayload,
        PolicyError::ScriptRefUnsupported => PolicyError::ScriptRefUnsupported,
        PolicyError::NoRun => PolicyError::NoRun,
        PolicyError::BadWalltime { .. } => PolicyError::BadWalltime { seconds: -1, nanos: 0 },
        PolicyError::StorageModeNotAllowed { .. } => PolicyError::StorageModeNotAllowed {
            requested: "nfs".into(),
            allowed: vec![crate::policy::StorageModeConfig::Sshfs],
        },
    }
    PolicyConfigError {
        PolicyConfigError(_) => policy_config_error(),
    }
    LauncherError {
        LauncherError::Table(_) => LauncherError::Table(join_error()),
        LauncherError::State(_) => LauncherError::State(state_error()),
        LauncherError::Store(_) => LauncherError::Store(sqlx::Error::Protocol(SOURCE_TEXT.into())),
        LauncherError::Confine(_) => LauncherError::Confine(ConfineError::NotRoot { euid: 1000 }),
        LauncherError::Bus(_) => LauncherError::Bus(BusError::NotProvisioned {
            what: "WNODES_EVENTS".into(),
            source: Box::new(io_source()),
        }),
    }
}
