//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use crate::config::{GatewayConfigError, PortRangeError};

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
    }
}
