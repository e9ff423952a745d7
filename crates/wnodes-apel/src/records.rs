//! The four APEL record kinds, built from usage records, in APEL's units: durations in integer
//! seconds, times in epoch seconds (UTC), job memory in KB, cloud memory in MB (as cASO writes
//! it), CPU counts and benchmarks as floats in cloud records.
//!
//! What a [`UsageRecord`] does not carry is left absent (`None` in the message, which APEL
//! reads as null): a job's virtual memory; a VM's disk, image, public IPs, network traffic and
//! local group name (the gid is written instead). The submit host, the site's GOCDB name, the
//! infrastructure description and the benchmark come from [`ApelConfig`]. VO, group and role
//! are derived from the first FQAN as APEL itself does ([`crate::fqan`]); without an FQAN the
//! record's VO is written and group and role are absent.

use std::collections::BTreeMap;

use wnodes_accounting_types::UsageRecord;

use crate::{ApelConfig, ApelError, Benchmark, Kind, fqan};

/// A record as APEL's writer lists it: field names in APEL's order, `None` for absent.
pub type Fields = Vec<(&'static str, Option<String>)>;

/// A record kind's fields in APEL's order.
pub trait ApelRecord {
    const KIND: Kind;
    fn fields(&self) -> Fields;
}

/// `APEL-individual-job-message: v0.3`: one job run.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub site: String,
    pub submit_host: Option<String>,
    pub machine_name: Option<String>,
    pub queue: Option<String>,
    pub local_job_id: String,
    pub local_user_id: Option<String>,
    pub global_user_name: Option<String>,
    pub fqan: Option<String>,
    pub vo: Option<String>,
    pub vo_group: Option<String>,
    pub vo_role: Option<String>,
    /// Seconds (elapsed, not multiplied by cores).
    pub wall_duration: i64,
    /// Seconds, user + system over all cores.
    pub cpu_duration: i64,
    pub processors: Option<i64>,
    pub node_count: Option<i64>,
    /// Epoch seconds.
    pub start_time: i64,
    /// Epoch seconds.
    pub end_time: i64,
    pub infrastructure_description: Option<String>,
    /// `grid` or `local`.
    pub infrastructure_type: Option<String>,
    /// KB.
    pub memory_real_kb: Option<i64>,
    /// KB.
    pub memory_virtual_kb: Option<i64>,
    pub service_level: Option<Benchmark>,
}

/// `APEL-summary-job-message: v0.3` (the normalised summary): one month of one site, user, VO,
/// group, role, submit host, infrastructure and job shape (processors, nodes).
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRecord {
    pub site: String,
    pub month: u8,
    pub year: i32,
    pub global_user_name: Option<String>,
    pub vo: Option<String>,
    pub vo_group: Option<String>,
    pub vo_role: Option<String>,
    pub submit_host: Option<String>,
    pub infrastructure: Option<String>,
    pub infrastructure_description: Option<String>,
    pub node_count: Option<i64>,
    pub processors: Option<i64>,
    pub earliest_end_time: i64,
    pub latest_end_time: i64,
    pub wall_duration: i64,
    pub cpu_duration: i64,
    /// Benchmark × seconds (HS06·s).
    pub normalised_wall_duration: i64,
    pub normalised_cpu_duration: i64,
    pub number_of_jobs: i64,
}

/// `APEL-cloud-message: v0.4`: one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudRecord {
    pub vm_uuid: String,
    pub site_name: String,
    pub cloud_compute_service: Option<String>,
    pub machine_name: Option<String>,
    pub local_user_id: Option<String>,
    pub local_group_id: Option<String>,
    pub global_user_name: Option<String>,
    pub fqan: Option<String>,
    pub status: Option<String>,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub suspend_duration: Option<i64>,
    pub wall_duration: Option<i64>,
    pub cpu_duration: Option<i64>,
    pub cpu_count: Option<f64>,
    pub network_type: Option<String>,
    pub network_inbound: Option<i64>,
    pub network_outbound: Option<i64>,
    pub public_ip_count: Option<i64>,
    /// MB.
    pub memory_mb: Option<i64>,
    /// GB.
    pub disk_gb: Option<i64>,
    pub benchmark: Option<Benchmark>,
    pub storage_record_id: Option<String>,
    pub image_id: Option<String>,
    pub cloud_type: Option<String>,
}

/// `APEL-sync-message: v0.1`: how many job records a site sent for a month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    pub site: String,
    pub submit_host: Option<String>,
    pub number_of_jobs: i64,
    pub month: u8,
    pub year: i32,
}

/// What cloud records say in `CloudType`.
pub const CLOUD_TYPE: &str = "WNoDeS";

fn text(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn int(v: Option<i64>) -> Option<String> {
    v.map(|v| v.to_string())
}

/// Python's `str(float)` for the values APEL sees (`1.0`, `12.5`).
fn float(v: Option<f64>) -> Option<String> {
    v.map(|v| format!("{v:?}"))
}

fn seconds(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// The first FQAN of the record's JSON array.
fn first_fqan(u: &UsageRecord) -> Result<Option<String>, ApelError> {
    let fqans: Vec<String> =
        serde_json::from_str(&u.fqans).map_err(|_| ApelError::Unexportable {
            run_key: u.run_key.clone(),
            reason: "fqans is not a JSON array of strings",
        })?;
    Ok(fqans.into_iter().find(|f| !f.is_empty()))
}

/// The year and month (1-12) of an epoch second, in UTC.
pub fn year_month(epoch_s: i64) -> (i32, u8) {
    match time::OffsetDateTime::from_unix_timestamp(epoch_s) {
        Ok(t) => (t.year(), u8::from(t.month())),
        Err(_) => (1970, 1),
    }
}

struct Common {
    start: i64,
    end: i64,
    wall: i64,
    cpu: i64,
    fqan: Option<String>,
    vo: Option<String>,
    vo_group: Option<String>,
    vo_role: Option<String>,
}

fn common(u: &UsageRecord) -> Result<Common, ApelError> {
    let bad = |reason| ApelError::Unexportable {
        run_key: u.run_key.clone(),
        reason,
    };
    let start = u.started_ms.ok_or_else(|| bad("no start time"))?;
    let end = u.stopped_ms.ok_or_else(|| bad("no end time"))?;
    if end < start {
        return Err(bad("ends before it starts"));
    }
    if !(u.wall_seconds.is_finite() && u.wall_seconds >= 0.0) {
        return Err(bad("wall time is negative or not a number"));
    }
    if !(u.cpu_seconds.is_finite() && u.cpu_seconds >= 0.0) {
        return Err(bad("CPU time is negative or not a number"));
    }
    let fqan = first_fqan(u)?;
    let attrs = fqan.as_deref().and_then(fqan::parse);
    let (vo, vo_group, vo_role) = match attrs {
        Some(a) => (Some(a.vo), Some(a.group), a.role),
        None => (text(&u.vo), None, None),
    };
    #[allow(clippy::cast_possible_truncation)] // checked finite and >= 0 above
    Ok(Common {
        start: seconds(start),
        end: seconds(end),
        wall: u.wall_seconds.round() as i64,
        cpu: u.cpu_seconds.round() as i64,
        fqan,
        vo,
        vo_group,
        vo_role,
    })
}

impl JobRecord {
    /// The job record of one usage record. `LocalJobId` is the LRMS job id, `MachineName` the
    /// hypervisor host, `MemoryReal` the peak resident memory (KB; absent when 0, i.e. not
    /// measured), `NodeCount` 1, `InfrastructureType` `grid` when the run has a DN or an FQAN
    /// and `local` otherwise.
    ///
    /// # Errors
    /// [`ApelError::Unexportable`]: no job id, no start or end time, end before start,
    /// negative durations, unreadable FQANs.
    pub fn from_usage(u: &UsageRecord, cfg: &ApelConfig) -> Result<Self, ApelError> {
        if u.job_id.is_empty() {
            return Err(ApelError::Unexportable {
                run_key: u.run_key.clone(),
                reason: "no job id",
            });
        }
        let c = common(u)?;
        let grid = !u.x509_dn.is_empty() || c.fqan.is_some();
        Ok(Self {
            site: cfg.site_name.clone().unwrap_or_else(|| u.site.clone()),
            submit_host: cfg.submit_host.clone(),
            machine_name: text(&u.host),
            queue: text(&u.queue),
            local_job_id: u.job_id.clone(),
            local_user_id: text(&u.user_name),
            global_user_name: text(&u.x509_dn),
            fqan: c.fqan,
            vo: c.vo,
            vo_group: c.vo_group,
            vo_role: c.vo_role,
            wall_duration: c.wall,
            cpu_duration: c.cpu,
            processors: Some(u.cores),
            node_count: Some(1),
            start_time: c.start,
            end_time: c.end,
            infrastructure_description: cfg.infrastructure_description.clone(),
            infrastructure_type: Some(if grid { "grid" } else { "local" }.into()),
            memory_real_kb: (u.peak_memory_bytes > 0).then_some(u.peak_memory_bytes / 1024),
            // The guest RAM the VM was given: the most the job could address.
            memory_virtual_kb: u.memory_bytes.filter(|b| *b > 0).map(|b| b / 1024),
            service_level: record_benchmark(u).or(cfg.benchmark),
        })
    }
}

impl ApelRecord for JobRecord {
    const KIND: Kind = Kind::Job;
    fn fields(&self) -> Fields {
        vec![
            ("Site", Some(self.site.clone())),
            ("SubmitHost", self.submit_host.clone()),
            ("MachineName", self.machine_name.clone()),
            ("Queue", self.queue.clone()),
            ("LocalJobId", Some(self.local_job_id.clone())),
            ("LocalUserId", self.local_user_id.clone()),
            ("GlobalUserName", self.global_user_name.clone()),
            ("FQAN", self.fqan.clone()),
            ("VO", self.vo.clone()),
            ("VOGroup", self.vo_group.clone()),
            ("VORole", self.vo_role.clone()),
            ("WallDuration", int(Some(self.wall_duration))),
            ("CpuDuration", int(Some(self.cpu_duration))),
            ("Processors", int(self.processors)),
            ("NodeCount", int(self.node_count)),
            ("StartTime", int(Some(self.start_time))),
            ("EndTime", int(Some(self.end_time))),
            (
                "InfrastructureDescription",
                self.infrastructure_description.clone(),
            ),
            ("InfrastructureType", self.infrastructure_type.clone()),
            ("MemoryReal", int(self.memory_real_kb)),
            ("MemoryVirtual", int(self.memory_virtual_kb)),
            (
                "ServiceLevelType",
                self.service_level
                    .map(|b| b.kind.service_level_type().to_string()),
            ),
            (
                "ServiceLevel",
                float(self.service_level.map(|b| b.per_core)),
            ),
        ]
    }
}

impl CloudRecord {
    /// The cloud record of one usage record's VM: `VMUUID` is the VM id, `MachineName` the
    /// hypervisor host, `Status` `completed` (a usage record exists only for a stopped VM),
    /// `CpuCount` the vCPUs, `Memory` the peak resident memory in MB (absent when 0),
    /// `LocalGroupId` the gid, `CloudType` [`CLOUD_TYPE`].
    ///
    /// # Errors
    /// [`ApelError::Unexportable`]: no VM id, or the checks of [`JobRecord::from_usage`] on
    /// times and durations.
    pub fn from_usage(u: &UsageRecord, cfg: &ApelConfig) -> Result<Self, ApelError> {
        if u.vm_id.is_empty() {
            return Err(ApelError::Unexportable {
                run_key: u.run_key.clone(),
                reason: "no VM id",
            });
        }
        let c = common(u)?;
        #[allow(clippy::cast_precision_loss)] // a core count
        Ok(Self {
            vm_uuid: u.vm_id.clone(),
            site_name: cfg.site_name.clone().unwrap_or_else(|| u.site.clone()),
            cloud_compute_service: cfg.cloud_compute_service.clone(),
            machine_name: text(&u.host),
            local_user_id: text(&u.user_name),
            local_group_id: u.gid.map(|g| g.to_string()),
            global_user_name: text(&u.x509_dn),
            fqan: c.fqan,
            status: Some("completed".into()),
            start_time: Some(c.start),
            end_time: Some(c.end),
            suspend_duration: None,
            wall_duration: Some(c.wall),
            cpu_duration: Some(c.cpu),
            cpu_count: Some(u.cores as f64),
            network_type: None,
            network_inbound: None,
            network_outbound: None,
            public_ip_count: None,
            memory_mb: (u.peak_memory_bytes > 0).then_some(u.peak_memory_bytes / (1024 * 1024)),
            disk_gb: u
                .scratch_bytes
                .filter(|b| *b > 0)
                .map(|b| b.saturating_add((1 << 30) - 1) / (1 << 30)),
            benchmark: record_benchmark(u).or(cfg.benchmark),
            storage_record_id: None,
            image_id: (!u.image.is_empty()).then(|| u.image.clone()),
            cloud_type: Some(CLOUD_TYPE.into()),
        })
    }

    /// APEL's key for the record: the VM and the month (UTC) of its end.
    pub fn key(&self) -> String {
        let (y, m) = year_month(self.end_time.or(self.start_time).unwrap_or(0));
        format!("{}|{y:04}-{m:02}", self.vm_uuid)
    }
}

impl ApelRecord for CloudRecord {
    const KIND: Kind = Kind::Cloud;
    fn fields(&self) -> Fields {
        vec![
            ("VMUUID", Some(self.vm_uuid.clone())),
            ("SiteName", Some(self.site_name.clone())),
            ("CloudComputeService", self.cloud_compute_service.clone()),
            ("MachineName", self.machine_name.clone()),
            ("LocalUserId", self.local_user_id.clone()),
            ("LocalGroupId", self.local_group_id.clone()),
            ("GlobalUserName", self.global_user_name.clone()),
            ("FQAN", self.fqan.clone()),
            ("Status", self.status.clone()),
            ("StartTime", int(self.start_time)),
            ("EndTime", int(self.end_time)),
            ("SuspendDuration", int(self.suspend_duration)),
            ("WallDuration", int(self.wall_duration)),
            ("CpuDuration", int(self.cpu_duration)),
            ("CpuCount", float(self.cpu_count)),
            ("NetworkType", self.network_type.clone()),
            ("NetworkInbound", int(self.network_inbound)),
            ("NetworkOutbound", int(self.network_outbound)),
            ("PublicIPCount", int(self.public_ip_count)),
            ("Memory", int(self.memory_mb)),
            ("Disk", int(self.disk_gb)),
            (
                "BenchmarkType",
                self.benchmark
                    .map(|b| b.kind.cloud_benchmark_type().to_string()),
            ),
            ("Benchmark", float(self.benchmark.map(|b| b.per_core))),
            ("StorageRecordId", self.storage_record_id.clone()),
            ("ImageId", self.image_id.clone()),
            ("CloudType", self.cloud_type.clone()),
        ]
    }
}

type SummaryKey = (
    i32,
    u8,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

impl SummaryRecord {
    /// Normalised summaries of `jobs`, one per month (of the end time, UTC), site, user (DN),
    /// VO, group, role, submit host, infrastructure, processors and node count, ordered by
    /// that key. `NormalisedWallDuration` = round(Σ wall × benchmark per core), likewise for
    /// CPU, as APEL's server computes it.
    ///
    /// # Errors
    /// [`ApelError::Config`] when a job has no benchmark (normalised durations are mandatory).
    pub fn summarise(jobs: &[JobRecord]) -> Result<Vec<Self>, ApelError> {
        let mut groups: BTreeMap<SummaryKey, (Self, f64, f64)> = BTreeMap::new();
        for j in jobs {
            let Some(b) = j.service_level else {
                return Err(ApelError::Config(format!(
                    "job {} has no benchmark: summaries need [accounting.apel] benchmark",
                    j.local_job_id
                )));
            };
            let (year, month) = year_month(j.end_time);
            let key = (
                year,
                month,
                j.site.clone(),
                j.global_user_name.clone(),
                j.vo.clone(),
                j.vo_group.clone(),
                j.vo_role.clone(),
                j.submit_host.clone(),
                j.infrastructure_type.clone(),
                j.infrastructure_description.clone(),
                j.processors,
                j.node_count,
            );
            let entry = groups.entry(key).or_insert_with(|| {
                (
                    Self {
                        site: j.site.clone(),
                        month,
                        year,
                        global_user_name: j.global_user_name.clone(),
                        vo: j.vo.clone(),
                        vo_group: j.vo_group.clone(),
                        vo_role: j.vo_role.clone(),
                        submit_host: j.submit_host.clone(),
                        infrastructure: j.infrastructure_type.clone(),
                        infrastructure_description: j.infrastructure_description.clone(),
                        node_count: j.node_count,
                        processors: j.processors,
                        earliest_end_time: j.end_time,
                        latest_end_time: j.end_time,
                        wall_duration: 0,
                        cpu_duration: 0,
                        normalised_wall_duration: 0,
                        normalised_cpu_duration: 0,
                        number_of_jobs: 0,
                    },
                    0.0,
                    0.0,
                )
            });
            let (s, nwall, ncpu) = entry;
            s.earliest_end_time = s.earliest_end_time.min(j.end_time);
            s.latest_end_time = s.latest_end_time.max(j.end_time);
            s.wall_duration += j.wall_duration;
            s.cpu_duration += j.cpu_duration;
            s.number_of_jobs += 1;
            #[allow(clippy::cast_precision_loss)] // seconds: far below 2^53
            {
                *nwall += j.wall_duration as f64 * b.normalisation_factor();
                *ncpu += j.cpu_duration as f64 * b.normalisation_factor();
            }
        }
        #[allow(clippy::cast_possible_truncation)] // sums of i64 seconds × a benchmark
        Ok(groups
            .into_values()
            .map(|(mut s, nwall, ncpu)| {
                s.normalised_wall_duration = nwall.round() as i64;
                s.normalised_cpu_duration = ncpu.round() as i64;
                s
            })
            .collect())
    }

    /// APEL's key for the summary (the grouping of [`Self::summarise`]).
    pub fn key(&self) -> String {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        let n = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        format!(
            "{:04}-{:02}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.year,
            self.month,
            self.site,
            o(&self.global_user_name),
            o(&self.vo),
            o(&self.vo_group),
            o(&self.vo_role),
            o(&self.submit_host),
            o(&self.infrastructure),
            o(&self.infrastructure_description),
            n(self.processors),
            n(self.node_count)
        )
    }
}

impl ApelRecord for SummaryRecord {
    const KIND: Kind = Kind::Summary;
    fn fields(&self) -> Fields {
        vec![
            ("Site", Some(self.site.clone())),
            ("Month", Some(self.month.to_string())),
            ("Year", Some(self.year.to_string())),
            ("GlobalUserName", self.global_user_name.clone()),
            ("VO", self.vo.clone()),
            ("VOGroup", self.vo_group.clone()),
            ("VORole", self.vo_role.clone()),
            ("SubmitHost", self.submit_host.clone()),
            ("Infrastructure", self.infrastructure.clone()),
            (
                "InfrastructureDescription",
                self.infrastructure_description.clone(),
            ),
            ("NodeCount", int(self.node_count)),
            ("Processors", int(self.processors)),
            ("EarliestEndTime", int(Some(self.earliest_end_time))),
            ("LatestEndTime", int(Some(self.latest_end_time))),
            ("WallDuration", int(Some(self.wall_duration))),
            ("CpuDuration", int(Some(self.cpu_duration))),
            (
                "NormalisedWallDuration",
                int(Some(self.normalised_wall_duration)),
            ),
            (
                "NormalisedCpuDuration",
                int(Some(self.normalised_cpu_duration)),
            ),
            ("NumberOfJobs", int(Some(self.number_of_jobs))),
        ]
    }
}

impl SyncRecord {
    /// Sync records of `jobs`: the number of job records per month (of the end time, UTC),
    /// site and submit host.
    pub fn count(jobs: &[JobRecord]) -> Vec<Self> {
        let mut groups: BTreeMap<(i32, u8, String, Option<String>), i64> = BTreeMap::new();
        for j in jobs {
            let (year, month) = year_month(j.end_time);
            *groups
                .entry((year, month, j.site.clone(), j.submit_host.clone()))
                .or_default() += 1;
        }
        groups
            .into_iter()
            .map(|((year, month, site, submit_host), n)| Self {
                site,
                submit_host,
                number_of_jobs: n,
                month,
                year,
            })
            .collect()
    }

    /// APEL's key for the sync record.
    pub fn key(&self) -> String {
        format!(
            "{:04}-{:02}|{}|{}",
            self.year,
            self.month,
            self.site,
            self.submit_host.clone().unwrap_or_default()
        )
    }
}

impl ApelRecord for SyncRecord {
    const KIND: Kind = Kind::Sync;
    fn fields(&self) -> Fields {
        vec![
            ("Site", Some(self.site.clone())),
            ("SubmitHost", self.submit_host.clone()),
            ("NumberOfJobs", int(Some(self.number_of_jobs))),
            ("Month", Some(self.month.to_string())),
            ("Year", Some(self.year.to_string())),
        ]
    }
}

/// The benchmark the record carries (its host's, from `[[accounting.host_benchmarks]]` or the
/// site's when it was recorded), if any.
fn record_benchmark(u: &UsageRecord) -> Option<Benchmark> {
    Some(Benchmark {
        kind: crate::BenchmarkKind::from_name(&u.benchmark_kind)?,
        per_core: u.benchmark_per_core.filter(|p| p.is_finite() && *p > 0.0)?,
    })
}
