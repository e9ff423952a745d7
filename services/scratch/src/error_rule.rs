//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::{SOURCE_TEXT, io_source};

use crate::{ConfigError, ReconcileError, VolumeError};

fn config_error() -> ConfigError {
    ConfigError {
        key: "lvm.vg",
        problem: "\"vg;rm\" is not a volume group name".into(),
    }
}

fn volume_error() -> VolumeError {
    VolumeError::Io {
        op: "create the volume directory",
        path: "/var/lib/wnodes/scratch".into(),
        source: io_source(),
    }
}

fn table_error() -> wnodes_preparer::TableError {
    wnodes_preparer::TableError::Row {
        op: "mark prepared",
        kind: wnodes_preparer::Kind::Scratch,
        vm_id: "vm-0123456789ab".into(),
        source: sqlx::Error::Protocol(SOURCE_TEXT.into()),
    }
}

wnodes_testkit::error_rule! {
    ConfigError {
        ConfigError { .. } => config_error(),
    }
    VolumeError {
        VolumeError::Io { .. } => volume_error(),
        VolumeError::MkfsSpawn { .. } => VolumeError::MkfsSpawn {
            program: "mkfs.ext4".into(),
            source: io_source(),
        },
        VolumeError::Mkfs { .. } => VolumeError::Mkfs {
            program: "mkfs.ext4".into(),
            path: "/var/lib/wnodes/scratch/vm-0123456789ab.img".into(),
            status: "exit status: 1".into(),
            stderr: "mkfs.ext4: Device size reported to be zero.".into(),
        },
        VolumeError::Run { .. } => VolumeError::Run {
            program: "lvm".into(),
            source: io_source(),
        },
        VolumeError::Failed { .. } => VolumeError::Failed {
            command: "lvm lvcreate -L 1073741824b -n vm-0123456789ab vg_scratch".into(),
            status: "exit status: 5".into(),
            stderr: "Volume group \"vg_scratch\" has insufficient free space".into(),
        },
        VolumeError::Report { .. } => VolumeError::Report {
            command: "lvs".into(),
            problem: "lv_size \"1G\" is not a number of bytes".into(),
        },
        VolumeError::BadName { .. } => VolumeError::BadName {
            what: "volume group",
            name: "vg;rm".into(),
        },
    }
    // The table's own errors are sampled in wnodes-preparer; here the instance this crate
    // returns.
    ReconcileError {
        ReconcileError::Table(_) => ReconcileError::Table(table_error()),
        ReconcileError::Host(_) => ReconcileError::Host(volume_error()),
    }
}
