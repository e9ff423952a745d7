//! The error rule for this crate's error types (`docs/errors-and-logging.md`): one sample per
//! variant; a new variant does not compile until it has one here.

use wnodes_testkit::error_rule::io_source;

use crate::slurm::SlurmError;

wnodes_testkit::error_rule! {
    SlurmError {
        SlurmError::NotInJob { .. } => SlurmError::NotInJob {
            pid: 4242,
            said: "Failed to locate job for requested pid".into(),
        },
        SlurmError::Spawn { .. } => SlurmError::Spawn {
            command: "scontrol pidinfo 4242".into(),
            source: io_source(),
        },
        SlurmError::Timeout { .. } => SlurmError::Timeout {
            command: "squeue -h -j 42".into(),
            secs: 20,
        },
        SlurmError::Failed { .. } => SlurmError::Failed {
            command: "squeue".into(),
            said: "slurm_load_jobs error: Unable to contact slurm controller".into(),
        },
        SlurmError::Parse { .. } => SlurmError::Parse {
            command: "squeue".into(),
            said: "1|x|".into(),
            what: "2 fields where 10 were asked for".into(),
        },
    }
}
