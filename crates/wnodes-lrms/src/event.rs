//! The normalised event every parser produces: [`LrmsEvent`], its [`State`] (one mapping for
//! every LRMS) and the [`Usage`] a record carries.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize, Serializer};

/// The batch system a record comes from. JSON and `--lrms` names: `htcondor`, `slurm`, `pbs`,
/// `lsf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrmsKind {
    Htcondor,
    Slurm,
    /// PBS/Torque and OpenPBS.
    Pbs,
    Lsf,
}

impl LrmsKind {
    /// Every kind.
    pub const ALL: [LrmsKind; 4] = [Self::Htcondor, Self::Slurm, Self::Pbs, Self::Lsf];

    /// The lowercase name (`--lrms` value, JSON `lrms`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Htcondor => "htcondor",
            Self::Slurm => "slurm",
            Self::Pbs => "pbs",
            Self::Lsf => "lsf",
        }
    }

    /// The proto enum value.
    pub fn proto(self) -> wnodes_proto::v1::Lrms {
        use wnodes_proto::v1::Lrms;
        match self {
            Self::Htcondor => Lrms::Htcondor,
            Self::Slurm => Lrms::Slurm,
            Self::Pbs => Lrms::Pbs,
            Self::Lsf => Lrms::Lsf,
        }
    }
}

impl fmt::Display for LrmsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LrmsKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown LRMS {s:?}: expected htcondor, slurm, pbs or lsf"))
    }
}

/// A job state change, the same for every LRMS.
///
/// | state | HTCondor | PBS | LSF | Slurm |
/// |---|---|---|---|---|
/// | `queued` | 000 submit | `Q` | `JOB_NEW` | `PENDING` |
/// | `started` | 001 execute | `S` | `JOB_START` | `RUNNING`, jobcomp start record |
/// | `evicted` | 004 evicted | `R` (rerun) | `JOB_SIGNAL` `KILLREQUEUE` | `PREEMPTED`, `REQUEUED` |
/// | `finished` | 005 terminated | `E` | `JOB_STATUS` DONE/EXIT, `JOB_FINISH` | `COMPLETED`, `FAILED`, `TIMEOUT`, `NODE_FAIL`, `OUT_OF_MEMORY`, `DEADLINE`, `BOOT_FAIL` |
/// | `cancelled` | 009 aborted | `D`, `A` | `JOB_SIGNAL` `KILL` | `CANCELLED` |
/// | `held` | 012 held | — | `JOB_STATUS` PSUSP/SSUSP/USUSP | `SUSPENDED` |
/// | `released` | 013 released | — | `JOB_STATUS` PEND or RUN again (resumed) | — |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Started,
    Evicted,
    Finished,
    Cancelled,
    Held,
    Released,
}

impl State {
    /// Every state.
    pub const ALL: [State; 7] = [
        Self::Queued,
        Self::Started,
        Self::Evicted,
        Self::Finished,
        Self::Cancelled,
        Self::Held,
        Self::Released,
    ];

    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Started => "started",
            Self::Evicted => "evicted",
            Self::Finished => "finished",
            Self::Cancelled => "cancelled",
            Self::Held => "held",
            Self::Released => "released",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a record says about the job's resources and usage. Every field is optional: a record
/// carries what its LRMS writes there, nothing is invented. Units: seconds and bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// User CPU time of the run (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_user_s: Option<f64>,
    /// System CPU time of the run (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_sys_s: Option<f64>,
    /// CPU time when the LRMS gives only the total (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_total_s: Option<f64>,
    /// Wall-clock time of the run (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_s: Option<u64>,
    /// Peak resident memory (bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Peak virtual memory / swap (bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_memory_bytes: Option<u64>,
    /// Memory requested or allocated (bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_request_bytes: Option<u64>,
    /// Cores allocated (or requested, when that is all the record has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    /// Disk used (bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// The job's exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
    /// Queue, partition or pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Local user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Local group name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Job name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Execution host as the LRMS wrote it (a name, an address, or a list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_host: Option<String>,
    /// The first execution host as a host name, when the record names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why (hold, eviction, cancellation, release), as the LRMS wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Hold reason code (HTCondor `HoldReasonCode`; on an HTCondor eviction, the `Code` of
    /// `Job was evicted. Code C Subcode S`, from the same table; LSF: the pending/suspend reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_code: Option<i32>,
    /// Hold reason subcode (HTCondor `HoldReasonSubCode`, or the eviction's `Subcode`; LSF: the
    /// subreason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_subcode: Option<i32>,
    /// The image the job asks for, when the record carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_hint: Option<String>,
    /// When the LRMS accepted the job.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time",
        deserialize_with = "de_opt_time",
        default
    )]
    pub submit_time: Option<Timestamp>,
    /// When the run started.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_time",
        deserialize_with = "de_opt_time",
        default
    )]
    pub start_time: Option<Timestamp>,
}

/// One job state change read from an LRMS record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrmsEvent {
    /// The batch system.
    pub lrms: LrmsKind,
    /// LRMS job id: HTCondor `cluster.proc` (`2758.0`), the full PBS id, LSF `jobId` or
    /// `jobId[index]`, Slurm `jobid`.
    pub job_id: String,
    /// The state the job entered.
    pub state: State,
    /// When, in UTC (RFC 3339 with `Z` in JSON).
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time")]
    pub time: Timestamp,
    /// 1-based run attempt: from the record when it has one (PBS `run_count`, LSF `runCount`),
    /// otherwise counted by the parser (starts seen for the job, at least 1).
    pub run_attempt: u32,
    /// The LRMS's own name for the record type (`012`, `E`, `JOB_STATUS`, `sacct`).
    pub lrms_record: String,
    /// Distinguishes events of one type within one run (e.g. two holds): derived from the
    /// record's content (its LRMS time, a Slurm step name), never from its position in a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Resources and usage the record carries.
    #[serde(flatten)]
    pub usage: Usage,
}

impl LrmsEvent {
    /// A bare event; parsers fill `usage` and `identity`.
    pub fn new(
        lrms: LrmsKind,
        job_id: impl Into<String>,
        state: State,
        time: Timestamp,
        lrms_record: impl Into<String>,
    ) -> Self {
        Self {
            lrms,
            job_id: job_id.into(),
            state,
            time,
            run_attempt: 1,
            lrms_record: lrms_record.into(),
            identity: None,
            usage: Usage::default(),
        }
    }
}

/// RFC 3339 in UTC with `Z`, seconds precision unless the instant has a fraction.
pub fn rfc3339(t: Timestamp) -> String {
    // jiff's Display for Timestamp is RFC 3339 in UTC with `Z`, fraction only when non-zero.
    t.to_string()
}

fn ser_time<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_opt_time<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_opt_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_required_keys_in_utc_with_z() {
        let t: Timestamp = "2025-03-01T10:00:05Z".parse().unwrap();
        let mut e = LrmsEvent::new(LrmsKind::Htcondor, "1001.0", State::Held, t, "012");
        e.usage.hold_code = Some(1);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["lrms"], "htcondor");
        assert_eq!(v["job_id"], "1001.0");
        assert_eq!(v["state"], "held");
        assert_eq!(v["time"], "2025-03-01T10:00:05Z");
        assert_eq!(v["hold_code"], 1);
        assert!(v.get("exit_code").is_none());
        let back: LrmsEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn names_round_trip() {
        for k in LrmsKind::ALL {
            assert_eq!(k.name().parse::<LrmsKind>().unwrap(), k);
        }
        assert!("sge".parse::<LrmsKind>().is_err());
        let names: Vec<_> = State::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "queued",
                "started",
                "evicted",
                "finished",
                "cancelled",
                "held",
                "released"
            ]
        );
    }
}

/// The site's image hints for queued jobs whose record names no image: by the job's queue
/// (partition), then by its group (the local group a VO's jobs map to). `[bridge.image_hints]`
/// in the configuration file:
///
/// ```toml
/// [bridge.image_hints.by_queue]
/// long = "el9-long"
/// [bridge.image_hints.by_group]
/// atlas = "atlas-el9"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageHints {
    /// Queue (partition) name → image name in the image service's catalog.
    pub by_queue: std::collections::BTreeMap<String, String>,
    /// Local group name → image name.
    pub by_group: std::collections::BTreeMap<String, String>,
}

impl ImageHints {
    /// Sets the image hint of a `queued` event that has none, from its queue, else its group.
    /// Other events, and events whose record named an image, are left alone.
    pub fn apply(&self, ev: &mut LrmsEvent) {
        if ev.state != State::Queued || ev.usage.image_hint.is_some() {
            return;
        }
        let by = |map: &std::collections::BTreeMap<String, String>, key: &Option<String>| {
            key.as_ref().and_then(|k| map.get(k)).cloned()
        };
        ev.usage.image_hint =
            by(&self.by_queue, &ev.usage.queue).or_else(|| by(&self.by_group, &ev.usage.group));
    }
}

#[cfg(test)]
mod image_hint_tests {
    use super::*;

    fn queued(queue: Option<&str>, group: Option<&str>, hint: Option<&str>) -> LrmsEvent {
        let mut e = LrmsEvent::new(
            LrmsKind::Pbs,
            "1.pbs",
            State::Queued,
            Timestamp::UNIX_EPOCH,
            "Q",
        );
        e.usage.queue = queue.map(str::to_owned);
        e.usage.group = group.map(str::to_owned);
        e.usage.image_hint = hint.map(str::to_owned);
        e
    }

    #[test]
    fn the_queue_wins_then_the_group_and_a_named_image_is_kept() {
        let hints = ImageHints {
            by_queue: [("long".to_owned(), "el9-long".to_owned())].into(),
            by_group: [("atlas".to_owned(), "atlas-el9".to_owned())].into(),
        };
        let hint = |mut e: LrmsEvent| {
            hints.apply(&mut e);
            e.usage.image_hint
        };
        assert_eq!(
            hint(queued(Some("long"), Some("atlas"), None)).as_deref(),
            Some("el9-long")
        );
        assert_eq!(
            hint(queued(Some("short"), Some("atlas"), None)).as_deref(),
            Some("atlas-el9")
        );
        assert_eq!(hint(queued(Some("short"), Some("cms"), None)), None);
        assert_eq!(
            hint(queued(Some("long"), None, Some("own"))).as_deref(),
            Some("own")
        );
        let mut started = queued(Some("long"), None, None);
        started.state = State::Started;
        assert_eq!(hint(started), None);
    }
}
