//! The accounting handler: one effect per event type (see the crate's table), in the same
//! transaction as the message's idempotency key; one record per run. It takes its messages in
//! batches ([`Handler::BATCHED`]): per batch, each statement runs once for all events of its
//! type ([`crate::ingest`]), and every key of the batch commits with the effects; a message
//! alone goes through the same code as a batch of one.

use std::collections::{HashMap, HashSet};

use wnodes_bus::{
    BatchCtx, BatchItem, EventExt as _, Handler, HandlerCtx, HandlerError, db::Db, proto,
    proto::event::Body,
};
use wnodes_proto::time;

use crate::{
    Metrics,
    ingest::{self, Row, Val},
};

/// How many deliveries of a `VmStopped` wait for the run's `JobStarted` before the record is
/// written without the job's identity (filled in when `JobStarted` comes).
pub const WAIT_FOR_JOB_ATTEMPTS: u32 = 3;

/// The accounting handler.
#[derive(Debug, Clone, Default)]
pub struct AccountingHandler {
    /// `"accounting@<host>"`, the source of `UsageRecorded`.
    pub source: String,
    pub metrics: Metrics,
    /// The benchmark each record gets, by its host.
    pub benchmarks: crate::config::Benchmarks,
}

/// `virtio_tap`, `sriov`, `user`; empty when unspecified.
fn network_mode_name(mode: i32) -> &'static str {
    match proto::NetworkMode::try_from(mode) {
        Ok(proto::NetworkMode::VirtioTap) => "virtio_tap",
        Ok(proto::NetworkMode::Sriov) => "sriov",
        Ok(proto::NetworkMode::User) => "user",
        _ => "",
    }
}

/// Phases named in `VmFailed` (anything else is counted as `other`, keeping labels bounded).
const PHASES: [&str; 7] = [
    "policy", "image", "scratch", "network", "storage", "launch", "deadline",
];

fn retry(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HandlerError {
    HandlerError::retry(e)
}

impl Handler for AccountingHandler {
    const BATCHED: bool = true;

    fn name(&self) -> &'static str {
        "accounting.record"
    }

    /// A message alone: a batch of one (the same statements as a batch).
    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        let mut items = [BatchItem::new(ctx.key(), ctx.attempt(), event)];
        let plan = self.plan(&mut items);
        if !plan.is_empty() {
            let mut db = ctx.db().await?;
            self.write(&mut db, plan, &mut items).await.map_err(retry)?;
        }
        let [item] = items;
        for ev in item.into_outcome()? {
            ctx.publish(ev);
        }
        Ok(())
    }

    /// A batch: each statement once for all its events of one type.
    async fn handle_batch(
        &self,
        batch: &mut BatchCtx,
        items: &mut [BatchItem],
    ) -> Result<(), HandlerError> {
        let plan = self.plan(items);
        if !plan.is_empty() {
            let mut db = batch.db().await?;
            self.write(&mut db, plan, items).await.map_err(retry)?;
        }
        Ok(())
    }
}

/// What a batch writes, gathered before anything is: one row per run for each event type
/// (the last event of a type in the batch wins, as it would one at a time), and the
/// `vm.stopped` items in batch order.
#[derive(Debug, Default)]
struct Plan {
    runs: Vec<String>,
    job_started: HashMap<String, Vec<Val>>,
    vm_requested: HashMap<String, Vec<Val>>,
    image_ready: HashMap<String, Vec<Val>>,
    vm_running: HashMap<String, Vec<Val>>,
    job_finished: HashMap<String, Vec<Val>>,
    gateway: HashMap<String, Vec<Val>>,
    /// (item index, run key).
    stopped: Vec<(usize, String)>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// What an event type writes: its `accounting_jobs` columns (in its row's order), and what a
/// record written before the event came gets from them (`SET` from `accounting_jobs AS j`,
/// under a condition; none when `fill` is empty).
struct Kind {
    columns: &'static [&'static str],
    fill: &'static str,
    only_if: &'static str,
}

const JOB_STARTED: Kind = Kind {
    columns: &[
        "user_name",
        "uid",
        "gid",
        "vo",
        "x509_dn",
        "fqans",
        "queue",
        "cores",
        "lrms_started_ms",
        "submitted_ms",
    ],
    fill: "user_name = j.user_name, uid = j.uid, gid = j.gid, vo = j.vo, x509_dn = j.x509_dn,
           fqans = j.fqans, queue = j.queue, submitted_ms = j.submitted_ms",
    only_if: "usage_records.vo = '' AND usage_records.user_name = ''",
};

const VM_REQUESTED: Kind = Kind {
    columns: &["image", "memory_bytes", "scratch_bytes", "network_mode"],
    fill: "image = j.image, memory_bytes = j.memory_bytes, scratch_bytes = j.scratch_bytes,
           network_mode = j.network_mode",
    only_if: "usage_records.image = ''",
};

const IMAGE_READY: Kind = Kind {
    columns: &["image_sha256"],
    fill: "image_sha256 = j.image_sha256",
    only_if: "usage_records.image_sha256 = ''",
};

/// Read by the record when it is written; a record never gets it later.
const VM_RUNNING: Kind = Kind {
    columns: &["vm_started_ms"],
    fill: "",
    only_if: "",
};

const JOB_FINISHED: Kind = Kind {
    columns: &["lrms_exit_code", "finished_ms"],
    fill: "lrms_exit_code = j.lrms_exit_code",
    only_if: "1 = 1",
};

/// `resource.released` of the storage gateway, with what it carried.
const GATEWAY: Kind = Kind {
    columns: &["gateway_bytes_to_vm", "gateway_bytes_from_vm"],
    fill: "gateway_bytes_to_vm = j.gateway_bytes_to_vm,
           gateway_bytes_from_vm = j.gateway_bytes_from_vm",
    only_if: "1 = 1",
};

fn rows(map: HashMap<String, Vec<Val>>) -> Vec<Row> {
    map.into_iter().collect()
}

impl AccountingHandler {
    /// Checks every item (failing those that can never describe a real run, before anything
    /// is written), counts failed VMs, and gathers the rows to write.
    fn plan(&self, items: &mut [BatchItem]) -> Plan {
        let mut plan = Plan::default();
        for (i, item) in items.iter_mut().enumerate() {
            let event = item.event();
            let Some(run) = event.run.as_ref() else {
                let why = format!("event {} has no run", event.id);
                item.fail(HandlerError::reject(why));
                continue;
            };
            if let Some(why) = impossible(run, event.body.as_ref()) {
                let why = format!("impossible usage event {}: {why}", event.id);
                item.fail(HandlerError::reject(why));
                continue;
            }
            let key = wnodes_bus::event::run_key(run);
            let row = match &event.body {
                Some(Body::JobStarted(js)) => Some((&mut plan.job_started, job_started_row(js))),
                Some(Body::VmRequested(r)) => Some((
                    &mut plan.vm_requested,
                    vm_requested_row(&r.spec.clone().unwrap_or_default()),
                )),
                Some(Body::ImageReady(r)) => {
                    Some((&mut plan.image_ready, vec![Val::Text(r.sha256.clone())]))
                }
                Some(Body::VmRunning(r)) => {
                    let started = r
                        .started_at
                        .as_ref()
                        .or(event.time.as_ref())
                        .map(time::timestamp_ms);
                    Some((&mut plan.vm_running, vec![Val::Int(started)]))
                }
                Some(Body::JobFinished(f)) => Some((
                    &mut plan.job_finished,
                    vec![
                        Val::Int(Some(i64::from(f.exit_code))),
                        Val::Int(f.finished_at.as_ref().map(time::timestamp_ms)),
                    ],
                )),
                Some(Body::ResourceReleased(r))
                    if r.kind == proto::ResourceKind::Storage as i32 && r.traffic.is_some() =>
                {
                    let t = r.traffic.unwrap_or_default();
                    let bytes = |b: u64| Val::Int(Some(i64::try_from(b).unwrap_or(i64::MAX)));
                    Some((
                        &mut plan.gateway,
                        vec![bytes(t.to_vm_bytes), bytes(t.from_vm_bytes)],
                    ))
                }
                Some(Body::VmStopped(_)) => {
                    plan.stopped.push((i, key.clone()));
                    plan.runs.push(key);
                    continue;
                }
                Some(Body::VmFailed(f)) => {
                    let phase = PHASES
                        .iter()
                        .find(|p| **p == f.phase)
                        .copied()
                        .unwrap_or("other");
                    tracing::info!(run = %key, phase, reason = %f.reason, "VM failed before it ran: no usage record.");
                    self.metrics
                        .vm_failed
                        .get_or_create(&vec![("phase", phase.to_owned())])
                        .inc();
                    None
                }
                _ => {
                    tracing::debug!(id = %event.id, "Not an accounting event; ignoring.");
                    None
                }
            };
            if let Some((map, vals)) = row {
                map.insert(key.clone(), vals);
                plan.runs.push(key);
            }
        }
        plan
    }

    /// Writes the plan in the transaction `db`: the runs' locks, the per-type upserts, the
    /// fill-ins of records written before their events, then the records of the stopped VMs.
    async fn write(
        &self,
        db: &mut Db<'_>,
        plan: Plan,
        items: &mut [BatchItem],
    ) -> Result<(), sqlx::Error> {
        let Plan {
            runs,
            job_started,
            vm_requested,
            image_ready,
            vm_running,
            job_finished,
            gateway,
            stopped,
        } = plan;
        let runs: Vec<&str> = runs.iter().map(String::as_str).collect();
        ingest::lock_runs(db, &runs).await?;
        let kinds = [
            (job_started, &JOB_STARTED),
            (vm_requested, &VM_REQUESTED),
            (image_ready, &IMAGE_READY),
            (vm_running, &VM_RUNNING),
            (job_finished, &JOB_FINISHED),
            (gateway, &GATEWAY),
        ];
        for (map, kind) in kinds {
            if map.is_empty() {
                continue;
            }
            let rows = rows(map);
            let fill = (!kind.fill.is_empty()).then_some((kind.fill, kind.only_if));
            ingest::upsert_jobs(db, kind.columns, &rows, fill).await?;
        }
        if stopped.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = stopped.iter().map(|(_, k)| k.as_str()).collect();
        let jobs: HashMap<String, ingest::JobRow> = ingest::job_rows(db, &keys)
            .await?
            .into_iter()
            .map(|j| (j.run_key.clone(), j))
            .collect();
        let mut records = Vec::new();
        let mut staged: Vec<(usize, proto::UsageRecorded)> = Vec::new();
        let mut in_batch = HashSet::new();
        // Logged once for the batch at info (a line per record at 10,000 records/s would be
        // the log's bulk, and more events than a span keeps); per record at debug.
        let (mut already, mut written, mut first) = (0usize, 0usize, None);
        let now = time::now_ms();
        for (i, key) in stopped {
            let item = &mut items[i];
            if in_batch.contains(&key) {
                tracing::debug!(run = %key, "Usage of this run already recorded; ignoring.");
                already += 1;
                continue;
            }
            let job = jobs.get(&key);
            let known = job.is_some_and(|j| j.vo.is_some());
            let attempt = item.attempt();
            if !known && attempt < WAIT_FOR_JOB_ATTEMPTS {
                item.fail(retry(format!(
                    "job.started of run {key} not seen yet (attempt {attempt})"
                )));
                continue;
            }
            if !known {
                tracing::warn!(run = %key, "Recording usage without the job's identity: its job.started never came.");
            }
            let event = item.event();
            let (Some(run), Some(Body::VmStopped(s))) = (event.run.as_ref(), event.body.as_ref())
            else {
                continue; // planned as a vm.stopped with a run
            };
            let benchmark = self.benchmarks.of(&event.host);
            let job = job.cloned().unwrap_or_default();
            match usage_record(run, &key, &event.host, s, benchmark, job, now) {
                Err(why) => {
                    // Dead-lettered with the reason; nothing of it is written.
                    let why = format!("impossible usage event {}: {why}", event.id);
                    item.fail(HandlerError::reject(why));
                }
                Ok((vals, recorded)) => {
                    in_batch.insert(key.clone());
                    records.push((key, vals));
                    staged.push((i, recorded));
                }
            }
        }
        let inserted = ingest::insert_records(db, &records).await?;
        for (i, recorded) in staged {
            let item = &mut items[i];
            let key = &recorded.record_id;
            if !inserted.contains(key) {
                tracing::debug!(run = %key, "Usage of this run already recorded; ignoring.");
                already += 1;
                continue;
            }
            tracing::debug!(run = %key, cpu_seconds = recorded.usage.as_ref().map(|u| u.cpu_seconds), "Usage recorded.");
            written += 1;
            first.get_or_insert_with(|| key.clone());
            self.metrics.records.inc();
            let (run, host) = (item.event().run.clone(), item.event().host.clone());
            item.publish(proto::Event::build(
                run.unwrap_or_default(),
                &host,
                &self.source,
                Body::UsageRecorded(recorded),
            ));
        }
        match (written, first) {
            (_, None) if already == 0 => {}
            (_, None) => tracing::info!(already, "Usage of these runs already recorded; ignoring."),
            (1, Some(run)) => tracing::info!(%run, already, "Usage recorded."),
            (records, Some(first)) => {
                tracing::info!(records, already, %first, "Usage recorded.");
            }
        }
        Ok(())
    }
}

/// Why an event cannot describe a real run (checked before anything is written): the event is
/// dead-lettered with this reason.
fn impossible(run: &proto::JobRunRef, body: Option<&Body>) -> Option<String> {
    if run.job_id.is_empty() {
        return Some("its run has no job id".into());
    }
    if run.site.is_empty() {
        return Some("its run has no site".into());
    }
    let Some(Body::VmStopped(s)) = body else {
        return None;
    };
    let usage = s.usage.unwrap_or_default();
    if !usage.cpu_seconds.is_finite() || usage.cpu_seconds < 0.0 {
        return Some(format!("CPU time {} s", usage.cpu_seconds));
    }
    if usage.wall.is_some_and(|w| w.seconds < 0 || w.nanos < 0) {
        return Some(format!(
            "negative wall time {} s",
            time::duration_secs(usage.wall.as_ref())
        ));
    }
    None
}

/// The job's identity, as `accounting_jobs` columns (`user_name` … `submitted_ms`).
fn job_started_row(js: &proto::JobStarted) -> Vec<Val> {
    let job = js.job.clone().unwrap_or_default();
    let owner = job.owner.unwrap_or_default();
    let identity = job.identity.unwrap_or_default();
    let fqans = serde_json::to_string(&identity.voms_fqans).unwrap_or_else(|_| "[]".into());
    let cores = job
        .resources
        .map(|r| i64::from(r.cores))
        .unwrap_or_default();
    vec![
        Val::Text(owner.user),
        Val::Int(Some(i64::from(owner.uid))),
        Val::Int(Some(i64::from(owner.gid))),
        Val::Text(job.vo),
        Val::Text(identity.x509_dn),
        Val::Text(fqans),
        Val::Text(job.queue),
        Val::Int(Some(cores)),
        Val::Int(js.started_at.as_ref().map(time::timestamp_ms)),
        Val::Int(job.submitted_at.as_ref().map(time::timestamp_ms)),
    ]
}

/// What the VM was given, as `accounting_jobs` columns (`image` … `network_mode`).
fn vm_requested_row(spec: &proto::VmSpec) -> Vec<Val> {
    vec![
        Val::Text(spec.image.clone()),
        Val::Int(Some(i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX))),
        Val::Int(Some(i64::try_from(spec.scratch_bytes).unwrap_or(i64::MAX))),
        Val::Text(network_mode_name(spec.network_mode).to_owned()),
    ]
}

/// The record of a stopped VM from its event and what is stored of its run: the values of
/// `usage_records` ([`ingest::RECORD_COLUMNS`]) and the `UsageRecorded` that carries it. `Err`
/// when the event contradicts what is stored (the VM stopped before it started).
fn usage_record(
    run: &proto::JobRunRef,
    key: &str,
    host: &str,
    s: &proto::VmStopped,
    benchmark: Option<wnodes_apel::Benchmark>,
    job: ingest::JobRow,
    now: i64,
) -> Result<(Vec<Val>, proto::UsageRecorded), String> {
    let usage = s.usage.unwrap_or_default();
    let wall = time::duration_secs(usage.wall.as_ref());
    let stopped_ms = s.stopped_at.as_ref().map(time::timestamp_ms);
    if let (Some(started), Some(stopped)) = (job.vm_started_ms, stopped_ms)
        && stopped < started
    {
        return Err(format!(
            "the VM stopped at {stopped} ms, before it started at {started} ms (unix)"
        ));
    }
    let started_ms = job
        .vm_started_ms
        .or_else(|| stopped_ms.map(|t| t - (wall * 1000.0) as i64));
    let (vo, user, dn) = (
        job.vo.unwrap_or_default(),
        job.user_name.unwrap_or_default(),
        job.x509_dn.unwrap_or_default(),
    );
    let fqans = job.fqans.unwrap_or_else(|| "[]".into());
    let queue = job.queue.unwrap_or_default();
    let lrms = wnodes_bus::event::lrms_name(run.lrms);
    let image = job.image.unwrap_or_default();
    let image_sha256 = job.image_sha256.unwrap_or_default();
    let network_mode = job.network_mode.unwrap_or_default();
    let bench_kind = benchmark.map(|b| b.kind.name()).unwrap_or_default();
    let bench_per_core = benchmark.map(|b| b.per_core);
    // Known when the launcher measured them (a split that does not add up is not kept).
    let split = (usage.cpu_user_seconds + usage.cpu_system_seconds > 0.0
        && usage.cpu_user_seconds >= 0.0
        && usage.cpu_system_seconds >= 0.0
        && usage.cpu_user_seconds + usage.cpu_system_seconds <= usage.cpu_seconds * 1.01 + 0.01)
        .then_some((usage.cpu_user_seconds, usage.cpu_system_seconds));
    let (cpu_user, cpu_system) = (split.map(|s| s.0), split.map(|s| s.1));
    let vals = vec![
        Val::Text(run.site.clone()),
        Val::Text(lrms.to_owned()),
        Val::Text(run.job_id.clone()),
        Val::Int(Some(i64::from(run.run_attempt))),
        Val::Text(host.to_owned()),
        Val::Text(s.vm_id.clone()),
        Val::Text(vo.clone()),
        Val::Text(user.clone()),
        Val::Int(job.uid),
        Val::Int(job.gid),
        Val::Text(dn.clone()),
        Val::Text(fqans.clone()),
        Val::Text(queue.clone()),
        Val::Int(Some(i64::from(usage.cores))),
        Val::Real(Some(usage.cpu_seconds)),
        Val::Int(Some(
            i64::try_from(usage.peak_memory_bytes).unwrap_or(i64::MAX),
        )),
        Val::Real(Some(wall)),
        Val::Int(Some(i64::from(s.exit_code))),
        Val::Int(job.lrms_exit_code),
        Val::Text(s.stop_reason.clone()),
        Val::Int(started_ms),
        Val::Int(stopped_ms),
        Val::Int(Some(now)),
        Val::Int(job.submitted_ms),
        Val::Text(image.clone()),
        Val::Text(image_sha256.clone()),
        Val::Int(job.memory_bytes),
        Val::Int(job.scratch_bytes),
        Val::Text(network_mode.clone()),
        Val::Text(bench_kind.to_owned()),
        Val::Real(bench_per_core),
        Val::Real(cpu_user),
        Val::Real(cpu_system),
        Val::Int(job.gateway_bytes_to_vm),
        Val::Int(job.gateway_bytes_from_vm),
    ];
    debug_assert_eq!(vals.len(), ingest::RECORD_COLUMNS.len());
    let voms_fqans: Vec<String> = serde_json::from_str(&fqans).unwrap_or_default();
    let attributes = voms_fqans.first().and_then(|f| wnodes_apel::fqan::parse(f));
    let record = proto::UsageRecord {
        run_key: key.to_owned(),
        site: run.site.clone(),
        lrms: lrms.to_owned(),
        job_id: run.job_id.clone(),
        run_attempt: run.run_attempt,
        host: host.to_owned(),
        vm_id: s.vm_id.clone(),
        vo: vo.clone(),
        vo_group: attributes
            .as_ref()
            .map(|a| a.group.clone())
            .unwrap_or_default(),
        vo_role: attributes.and_then(|a| a.role).unwrap_or_default(),
        user: user.clone(),
        uid: job.uid.and_then(|u| u32::try_from(u).ok()),
        gid: job.gid.and_then(|g| u32::try_from(g).ok()),
        x509_dn: dn.clone(),
        voms_fqans,
        queue,
        cores: usage.cores,
        cpu_seconds: usage.cpu_seconds,
        peak_memory_bytes: usage.peak_memory_bytes,
        wall_seconds: wall,
        exit_code: s.exit_code,
        lrms_exit_code: job.lrms_exit_code.and_then(|c| i32::try_from(c).ok()),
        stop_reason: s.stop_reason.clone(),
        started_at: started_ms.map(time::timestamp_from_ms),
        stopped_at: stopped_ms.map(time::timestamp_from_ms),
        recorded_at: Some(time::timestamp_from_ms(now)),
        submitted_at: job.submitted_ms.map(time::timestamp_from_ms),
        image,
        image_sha256,
        memory_bytes: job
            .memory_bytes
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or_default(),
        scratch_bytes: job
            .scratch_bytes
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or_default(),
        network_mode,
        benchmark_kind: bench_kind.to_owned(),
        benchmark_per_core: bench_per_core.unwrap_or_default(),
        cpu_user_seconds: cpu_user,
        cpu_system_seconds: cpu_system,
        gateway_bytes_to_vm: job.gateway_bytes_to_vm.and_then(|b| u64::try_from(b).ok()),
        gateway_bytes_from_vm: job
            .gateway_bytes_from_vm
            .and_then(|b| u64::try_from(b).ok()),
    };
    Ok((
        vals,
        proto::UsageRecorded {
            record_id: key.to_owned(),
            usage: Some(usage),
            exit_code: s.exit_code,
            vo,
            user,
            x509_dn: dn,
            record: Some(record),
        },
    ))
}
