//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::lrms::{ClientError, LrmsError};

wnodes_testkit::error_rule! {
    ClientError {
        ClientError::Spawn { .. } => ClientError::Spawn {
            command: "scontrol pidinfo 4242".into(),
            source: io_source(),
        },
        ClientError::Timeout { .. } => ClientError::Timeout {
            command: "squeue -h -j 42".into(),
            secs: 20,
        },
        ClientError::Failed { .. } => ClientError::Failed {
            command: "squeue".into(),
            said: "slurm_load_jobs error: Unable to contact slurm controller".into(),
        },
        ClientError::Parse { .. } => ClientError::Parse {
            command: "squeue".into(),
            said: "1|x|".into(),
            what: "2 fields where 10 were asked for".into(),
        },
    }
    LrmsError {
        LrmsError::Refused { .. } => LrmsError::refused(
            "not_in_job",
            "process 4242 is not part of a Slurm job on this host (scontrol pidinfo: Failed to locate job for requested pid)",
        ),
        LrmsError::Client(_) => LrmsError::Client(ClientError::Timeout {
            command: "qstat -f -F json 1042.pbs01".into(),
            secs: 20,
        }),
        LrmsError::Proc { .. } => LrmsError::Proc {
            pid: 4242,
            what: "cgroup",
            source: io_source(),
        },
    }
}
