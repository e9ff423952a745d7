//! The launcher's bus handler: `job.started` (policy → `vm.requested`), `job.cancelled`, and
//! the four preparation results (the join). Every state change goes through `ctx.tx()`, so it
//! commits with the message's idempotency key; events go through `ctx.publish`.

use std::sync::Arc;

use prost::Message;
use wnodes_bus::{Handler, HandlerCtx, HandlerError, proto::event::Body};
use wnodes_proto::v1::{Event, HostUser, JobCancelled, JobStarted, VmFailed, VmRequested, VmSpec};

use crate::{
    confine::{self, ConfineError, ConfinementConfig},
    policy,
    state::LauncherState,
    vm_dir::{JobRecord, StateError, VmDir},
    vm_table::{self, Decision, Resource, VmRow, VmState},
};

/// The handler.
#[derive(Debug, Clone)]
pub struct LauncherHandler {
    launcher: Arc<LauncherState>,
}

impl LauncherHandler {
    pub fn new(launcher: Arc<LauncherState>) -> Self {
        Self { launcher }
    }
}

fn retry(e: impl std::error::Error + Send + Sync + 'static) -> HandlerError {
    HandlerError::retry(Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
}

fn failed(l: &LauncherState, row: &VmRow, phase: &str, reason: String) -> Event {
    l.event(
        row,
        Body::VmFailed(VmFailed {
            vm_id: row.vm_id.clone(),
            reason,
            phase: phase.into(),
        }),
    )
}

/// Picks the VM's host user (uid = gid) within the configured range: the lowest uid no live
/// VM of this host holds (in the handler's transaction) and no process runs as.
async fn allocate_vm_user(
    confinement: &ConfinementConfig,
    conn: &mut sqlx::SqliteConnection,
) -> Result<Result<HostUser, ConfineError>, HandlerError> {
    let range = match confinement.range() {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let taken = vm_table::live_vm_uids(conn).await.map_err(retry)?;
    let busy = confine::process_uids();
    Ok(confine::pick_uid(range, &taken, &busy).map(|uid| HostUser { uid, gid: uid }))
}

impl Handler for LauncherHandler {
    fn name(&self) -> &'static str {
        "launcher.handle"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: Event) -> Result<(), HandlerError> {
        let Some(body) = event.body.clone() else {
            return Err(HandlerError::reject("event without a body"));
        };
        match body {
            Body::JobStarted(js) => self.job_started(ctx, &event, js).await,
            Body::JobCancelled(jc) => self.job_cancelled(ctx, &event, jc).await,
            other => match preparation_result(&other) {
                Some((vm_id, resource, result)) => self.result(ctx, vm_id, resource, result).await,
                None => {
                    tracing::debug!(event = %wnodes_bus::EventType::of(&other), "Not for the launcher; skipped.");
                    Ok(())
                }
            },
        }
    }
}

/// A preparation result: the ready body (encoded, to store in the VM's row) or the failure's
/// reason.
type Outcome = Result<Vec<u8>, String>;

/// One of the four preparation results: the VM, which resource, and its outcome.
fn preparation_result(body: &Body) -> Option<(&str, Resource, Outcome)> {
    fn ready(m: &impl Message) -> Outcome {
        Ok(m.encode_to_vec())
    }
    Some(match body {
        Body::ImageReady(r) => (r.vm_id.as_str(), Resource::Image, ready(r)),
        Body::ScratchReady(r) => (r.vm_id.as_str(), Resource::Scratch, ready(r)),
        Body::NetworkReady(r) => (r.vm_id.as_str(), Resource::Network, ready(r)),
        Body::StorageReady(r) => (r.vm_id.as_str(), Resource::Storage, ready(r)),
        Body::ImageFailed(f) => (f.vm_id.as_str(), Resource::Image, Err(f.reason.clone())),
        Body::ScratchFailed(f) => (f.vm_id.as_str(), Resource::Scratch, Err(f.reason.clone())),
        Body::NetworkFailed(f) => (f.vm_id.as_str(), Resource::Network, Err(f.reason.clone())),
        Body::StorageFailed(f) => (f.vm_id.as_str(), Resource::Storage, Err(f.reason.clone())),
        _ => return None,
    })
}

impl LauncherHandler {
    async fn job_started(
        &self,
        ctx: &mut HandlerCtx,
        event: &Event,
        js: JobStarted,
    ) -> Result<(), HandlerError> {
        let l = &self.launcher;
        let job = js
            .job
            .ok_or_else(|| HandlerError::reject("job.started without a job"))?;
        let run = event
            .run
            .clone()
            .or_else(|| job.run.clone())
            .ok_or_else(|| HandlerError::reject("job.started without a run"))?;
        let vm_id = policy::vm_id(&run);
        let trace = wnodes_bus::propagation::current_context_map();
        let host = if event.host.is_empty() {
            l.host.clone()
        } else {
            event.host.clone()
        };
        match l.config.policy.apply(&job) {
            Ok(mut spec) => {
                // Host effect, named after the VM and checked before it is made.
                let vm = VmDir::new(&l.vms_dir, &spec.vm_id).map_err(HandlerError::reject)?;
                vm.create().map_err(retry)?;
                if !vm.job_json().exists() {
                    vm.write_job(&JobRecord::new(&run, &host, &spec, trace.clone()))
                        .map_err(retry)?;
                }
                let conn = ctx.tx().await?;
                match vm_table::load(&mut *conn, &vm_id).await.map_err(retry)? {
                    Some(existing) if existing.state.is_final() => {
                        tracing::info!(
                            vm_id,
                            state = existing.state.as_str(),
                            "Job started for a VM already finished (cancelled first?); ignored."
                        );
                        return Ok(());
                    }
                    // A redelivery: the same request again, with the user already chosen.
                    Some(existing) => spec = existing.spec,
                    None if l.config.confinement.vm_users => {
                        match allocate_vm_user(&l.config.confinement, &mut *conn).await? {
                            Ok(user) => spec.vm_user = Some(user),
                            Err(e) => {
                                tracing::error!(vm_id, error = %e, "No VM user for the job.");
                                let spec = VmSpec {
                                    vm_id: vm_id.clone(),
                                    vo: job.vo.clone(),
                                    ..Default::default()
                                };
                                let row = VmRow::new(&run, &host, spec, VmState::Failed, trace);
                                vm_table::insert(&mut *conn, &row).await.map_err(retry)?;
                                ctx.publish(failed(l, &row, "policy", e.to_string()));
                                return Ok(());
                            }
                        }
                    }
                    None => {}
                }
                let row = VmRow::new(&run, &host, spec.clone(), VmState::Preparing, trace);
                vm_table::insert(&mut *conn, &row).await.map_err(retry)?;
                tracing::info!(vm_id, image = %spec.image, cores = spec.cores, memory = spec.memory_bytes, "VM requested.");
                ctx.publish(l.event(&row, Body::VmRequested(VmRequested { spec: Some(spec) })));
            }
            Err(e) => {
                tracing::info!(vm_id, error = %e, "Job refused by policy.");
                let spec = VmSpec {
                    vm_id: vm_id.clone(),
                    vo: job.vo.clone(),
                    ..Default::default()
                };
                let row = VmRow::new(&run, &host, spec, VmState::Failed, trace);
                let conn = ctx.tx().await?;
                if vm_table::load(&mut *conn, &vm_id)
                    .await
                    .map_err(retry)?
                    .is_some()
                {
                    return Ok(());
                }
                vm_table::insert(&mut *conn, &row).await.map_err(retry)?;
                ctx.publish(failed(l, &row, "policy", e.to_string()));
            }
        }
        Ok(())
    }

    async fn job_cancelled(
        &self,
        ctx: &mut HandlerCtx,
        event: &Event,
        jc: JobCancelled,
    ) -> Result<(), HandlerError> {
        let l = &self.launcher;
        let run = event
            .run
            .clone()
            .or_else(|| jc.run.clone())
            .ok_or_else(|| HandlerError::reject("job.cancelled without a run"))?;
        let vm_id = policy::vm_id(&run);
        let reason = if jc.reason.is_empty() {
            "cancelled".to_owned()
        } else {
            jc.reason.clone()
        };
        let conn = ctx.tx().await?;
        let row = vm_table::load(&mut *conn, &vm_id).await.map_err(retry)?;
        match row {
            None => {
                // Cancelled before it started here: a tombstone refuses a late job.started.
                let host = if event.host.is_empty() {
                    l.host.clone()
                } else {
                    event.host.clone()
                };
                let spec = VmSpec {
                    vm_id: vm_id.clone(),
                    ..Default::default()
                };
                let mut row = VmRow::new(
                    &run,
                    &host,
                    spec,
                    VmState::Failed,
                    wnodes_bus::propagation::current_context_map(),
                );
                row.cancel_reason = Some(reason.clone());
                vm_table::insert(&mut *conn, &row).await.map_err(retry)?;
                ctx.publish(failed(l, &row, "cancelled", reason));
            }
            Some(row) if row.state == VmState::Preparing => {
                vm_table::transition(
                    &mut *conn,
                    &vm_id,
                    VmState::Preparing,
                    VmState::Failed,
                    None,
                    None,
                )
                .await
                .map_err(retry)?;
                vm_table::set_cancel_reason(&mut *conn, &vm_id, &reason)
                    .await
                    .map_err(retry)?;
                tracing::info!(vm_id, reason, "Cancelled while preparing.");
                ctx.publish(failed(l, &row, "cancelled", reason));
            }
            Some(row) if matches!(row.state, VmState::Launching | VmState::Running) => {
                vm_table::set_cancel_reason(&mut *conn, &vm_id, &reason)
                    .await
                    .map_err(retry)?;
                tracing::info!(
                    vm_id,
                    reason,
                    state = row.state.as_str(),
                    "Cancelling the VM."
                );
                if row.state == VmState::Running {
                    // Runs once this transaction has committed (single write connection).
                    l.spawn_stop(vm_id);
                }
                // Launching: the starter sees the reason before or right after qemu starts.
            }
            Some(_) => tracing::debug!(vm_id, "Cancel for a finished VM; ignored."),
        }
        Ok(())
    }

    async fn result(
        &self,
        ctx: &mut HandlerCtx,
        vm_id: &str,
        resource: Resource,
        outcome: Outcome,
    ) -> Result<(), HandlerError> {
        let l = &self.launcher;
        if !policy::is_valid_vm_id(vm_id) {
            return Err(HandlerError::reject(StateError::InvalidVmId(
                vm_id.to_owned(),
            )));
        }
        let conn = ctx.tx().await?;
        let row = vm_table::load(&mut *conn, vm_id).await.map_err(retry)?;
        let failure = outcome.as_ref().err().map(String::as_str);
        let decision = vm_table::decide(row.as_ref(), resource, failure);
        if let (Some(row), Decision::Wait | Decision::Launch, Ok(_)) = (&row, &decision, &outcome)
            && !row.has(resource)
        {
            let ms = wnodes_proto::time::now_ms().saturating_sub(row.requested_at_ms);
            l.observe_phase(resource.name(), ms as f64 / 1000.0);
        }
        match decision {
            Decision::Ignore(why) => {
                tracing::info!(vm_id, resource = resource.name(), why, "Result ignored.");
            }
            Decision::Wait => {
                if let Ok(bytes) = outcome {
                    vm_table::store_result(&mut *conn, vm_id, resource, bytes)
                        .await
                        .map_err(retry)?;
                }
                tracing::info!(
                    vm_id,
                    resource = resource.name(),
                    "Result recorded; waiting for the others."
                );
            }
            Decision::Launch => {
                if let Ok(bytes) = outcome {
                    vm_table::store_result(&mut *conn, vm_id, resource, bytes)
                        .await
                        .map_err(retry)?;
                }
                vm_table::transition(
                    &mut *conn,
                    vm_id,
                    VmState::Preparing,
                    VmState::Launching,
                    None,
                    None,
                )
                .await
                .map_err(retry)?;
                tracing::info!(vm_id, "All four results in; starting the VM.");
                l.request_start(vm_id);
            }
            Decision::Fail { phase, reason } => {
                vm_table::transition(
                    &mut *conn,
                    vm_id,
                    VmState::Preparing,
                    VmState::Failed,
                    None,
                    None,
                )
                .await
                .map_err(retry)?;
                if let Some(row) = row {
                    tracing::info!(vm_id, phase, reason, "Preparation failed.");
                    ctx.publish(failed(l, &row, phase, reason));
                }
            }
        }
        Ok(())
    }
}
