//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use std::path::PathBuf;

use wnodes_testkit::error_rule::io_source;

use crate::{
    config::{GatewayConfigError, PortRangeError},
    nfs::{NfsError, config::NfsConfigError},
};

wnodes_testkit::error_rule! {
    PortRangeError {
        PortRangeError(_) => PortRangeError("2300-2200".into()),
    }
    GatewayConfigError {
        GatewayConfigError::PortRange(_) => GatewayConfigError::PortRange(PortRangeError("9-1".into())),
        GatewayConfigError::NotAbsolute { .. } => GatewayConfigError::NotAbsolute {
            key: "sftp_server",
            path: "sftp-server".into(),
        },
        GatewayConfigError::IdRange { .. } => GatewayConfigError::IdRange {
            key: "job_uids",
            value: "0-100".into(),
        },
        GatewayConfigError::RootExport { .. } => GatewayConfigError::RootExport { path: "/".into() },
        GatewayConfigError::Jail(_) => GatewayConfigError::Jail("ldd /usr/lib/openssh/sftp-server: ldd listed no library".into()),
        GatewayConfigError::Nfs(_) => GatewayConfigError::Nfs(NfsConfigError::Port),
    }
    NfsConfigError {
        NfsConfigError::ExportIds(_) => NfsConfigError::ExportIds("0-10".into()),
        NfsConfigError::NotAbsolute { .. } => NfsConfigError::NotAbsolute {
            key: "exportfs.exportfs",
            path: "exportfs".into(),
        },
        NfsConfigError::PseudoRoot(_) => NfsConfigError::PseudoRoot("wnodes".into()),
        NfsConfigError::Port => NfsConfigError::Port,
    }
    NfsError {
        NfsError::Spawn { .. } => NfsError::Spawn {
            program: "/usr/bin/dbus-send".into(),
            source: io_source(),
        },
        NfsError::Command { .. } => NfsError::Command {
            program: "/usr/sbin/exportfs".into(),
            action: "export".into(),
            status: "exit status: 1".into(),
            stderr: "exportfs: Failed to stat /srv/x: No such file or directory".into(),
        },
        NfsError::Write { .. } => NfsError::Write {
            path: PathBuf::from("/var/lib/wnodes/gateway/ganesha/exports/export-100.conf"),
            source: io_source(),
        },
        NfsError::Daemon(_) => NfsError::Daemon("ganesha.nfsd did not start".into()),
        NfsError::PathChars { .. } => NfsError::PathChars { path: "/srv/a b".into() },
        NfsError::VmId { .. } => NfsError::VmId { vm_id: "vm-1/..".into() },
    }
}
