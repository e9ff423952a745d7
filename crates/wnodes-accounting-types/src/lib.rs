//! The usage record: one per finished VM, written once by `wnodes-accounting`, printed by its
//! `records --json` subcommand (one JSON object per line) and read back by the dev stack and
//! the tests. A types crate, so readers share the definition without depending on the service.

use serde::{Deserialize, Serialize};

/// One usage record, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct UsageRecord {
    /// `site/lrms/job_id/attempt`.
    pub run_key: String,
    pub site: String,
    pub lrms: String,
    pub job_id: String,
    pub run_attempt: i64,
    /// Hypervisor host name.
    pub host: String,
    pub vm_id: String,
    pub vo: String,
    /// Local user name.
    pub user_name: String,
    pub uid: Option<i64>,
    pub gid: Option<i64>,
    pub x509_dn: String,
    /// JSON array of VOMS FQANs.
    pub fqans: String,
    pub queue: String,
    /// vCPUs (count).
    pub cores: i64,
    /// CPU time, user + system (seconds).
    pub cpu_seconds: f64,
    /// Peak resident memory (bytes).
    pub peak_memory_bytes: i64,
    /// From VM start to stop (seconds).
    pub wall_seconds: f64,
    /// The payload's exit status.
    pub exit_code: i64,
    /// The exit status the LRMS recorded (from `JobFinished`), when it came.
    pub lrms_exit_code: Option<i64>,
    pub stop_reason: String,
    /// Unix milliseconds.
    pub started_ms: Option<i64>,
    /// Unix milliseconds.
    pub stopped_ms: Option<i64>,
    /// Unix milliseconds.
    pub recorded_ms: i64,
    /// When the LRMS accepted the job (Unix milliseconds), when known.
    #[serde(default)]
    pub submitted_ms: Option<i64>,
    /// The image's catalog name (empty when unknown).
    #[serde(default)]
    pub image: String,
    /// The image's verified SHA-256 (empty when unknown).
    #[serde(default)]
    pub image_sha256: String,
    /// Guest RAM the VM was given (bytes), when known.
    #[serde(default)]
    pub memory_bytes: Option<i64>,
    /// Scratch disk size (bytes), when known.
    #[serde(default)]
    pub scratch_bytes: Option<i64>,
    /// `virtio_tap`, `sriov` or `user` (empty when unknown).
    #[serde(default)]
    pub network_mode: String,
    /// The host's benchmark: `hepspec06`, `hepscore23` or `si2k` (empty when none configured).
    #[serde(default)]
    pub benchmark_kind: String,
    /// The host's benchmark score per core, when configured.
    #[serde(default)]
    pub benchmark_per_core: Option<f64>,
    /// The part of `cpu_seconds` in user mode (seconds), when measured.
    #[serde(default)]
    pub cpu_user_seconds: Option<f64>,
    /// The part in the kernel (seconds), when measured.
    #[serde(default)]
    pub cpu_system_seconds: Option<f64>,
    /// Bytes the storage gateway carried to the VM, when it counted all of them.
    #[serde(default)]
    pub gateway_bytes_to_vm: Option<i64>,
    /// Bytes the storage gateway carried from the VM, when it counted all of them.
    #[serde(default)]
    pub gateway_bytes_from_vm: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_json_and_absent_options_stay_none() {
        let json = r#"{"run_key":"s/slurm/1/1","site":"s","lrms":"slurm","job_id":"1","run_attempt":1,
            "host":"h","vm_id":"vm-0123456789ab","vo":"atlas","user_name":"u","uid":null,"gid":null,
            "x509_dn":"","fqans":"[]","queue":"q","cores":2,"cpu_seconds":1.5,
            "peak_memory_bytes":1024,"wall_seconds":3.0,"exit_code":0,"lrms_exit_code":null,
            "stop_reason":"guest_poweroff","started_ms":1,"stopped_ms":2,"recorded_ms":3}"#;
        let r: UsageRecord = serde_json::from_str(json).unwrap();
        assert_eq!((r.cores, r.uid, r.lrms_exit_code), (2, None, None));
        let again: UsageRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
        assert!(serde_json::from_str::<UsageRecord>("{}").is_err());
    }
}
