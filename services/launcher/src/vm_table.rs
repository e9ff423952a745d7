//! The per-VM state machine and its table `launcher_vms` (in the service's key store, so a
//! handler's transitions commit with its idempotency key through `ctx.tx()`).
//!
//! ```text
//!             job.started ──policy error──────────────────────────────► failed
//!                  │                                                       ▲
//!                  ▼         any *.failed, job.cancelled, deadline         │
//!              preparing ──────────────────────────────────────────────────┤
//!                  │ all four *.ready                                      │
//!                  ▼                         qemu did not start            │
//!              launching ──────────────────────────────────────────────────┘
//!                  │ qemu runs (vm.running)
//!                  ▼
//!               running ── qemu exited (vm.stopped) ──► stopped
//! ```
//!
//! Results arriving for a VM that is no longer `preparing` are ignored (the preparing service
//! releases on `vm.failed`/`vm.stopped` by itself). An event that must be published by a
//! background task (`vm.running`, `vm.stopped`, a deadline `vm.failed`) is written to the row's
//! `pending` column in the same transaction as the state change, and cleared once JetStream
//! acknowledged it: a crash in between republishes it (same deterministic id) on start.

use std::collections::BTreeMap;

use prost::Message;
use sqlx::{Row, SqliteConnection, SqlitePool, sqlite::SqliteRow};
use wnodes_proto::v1::{
    Event, ImageReady, JobRunRef, NetworkReady, ScratchReady, StorageReady, VmSpec,
};

/// The table.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS launcher_vms (
    vm_id         TEXT    PRIMARY KEY,
    run_key       TEXT    NOT NULL,
    host          TEXT    NOT NULL,
    run           BLOB    NOT NULL,   -- wnodes.v1.JobRunRef
    spec          BLOB    NOT NULL,   -- wnodes.v1.VmSpec
    state         TEXT    NOT NULL,   -- preparing | launching | running | failed | stopped
    requested_at  INTEGER NOT NULL,   -- unix ms
    image         BLOB,               -- wnodes.v1.ImageReady
    scratch       BLOB,               -- wnodes.v1.ScratchReady
    network       BLOB,               -- wnodes.v1.NetworkReady
    storage       BLOB,               -- wnodes.v1.StorageReady
    pid           INTEGER,
    cancel_reason TEXT,
    pending       BLOB,               -- wnodes.v1.Event not yet acknowledged by JetStream
    trace         TEXT    NOT NULL DEFAULT '{}',
    host_cores    TEXT                -- pinned host cores (2,3: vCPU 0 on 2, vCPU 1 on 3); NULL: none
)";

/// Columns added after the table's first release, added to an older table by [`init`]:
/// (name, statement).
const ADDED_COLUMNS: [(&str, &str); 1] = [(
    "host_cores",
    "ALTER TABLE launcher_vms ADD COLUMN host_cores TEXT",
)];

/// A store problem.
#[derive(Debug, thiserror::Error)]
pub enum VmTableError {
    #[error("launcher_vms: cannot {op}")]
    Sql {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("launcher_vms: VM {vm_id}: bad {column}: {detail}")]
    Corrupt {
        vm_id: String,
        column: &'static str,
        detail: String,
    },
}

fn sql(op: &'static str) -> impl FnOnce(sqlx::Error) -> VmTableError {
    move |source| VmTableError::Sql { op, source }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Preparing,
    Launching,
    Running,
    Failed,
    Stopped,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Launching => "launching",
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "preparing" => Self::Preparing,
            "launching" => Self::Launching,
            "running" => Self::Running,
            "failed" => Self::Failed,
            "stopped" => Self::Stopped,
            _ => return None,
        })
    }

    /// `failed` or `stopped`: nothing happens to this VM any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Failed | Self::Stopped)
    }
}

/// The four preparation results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Image,
    Scratch,
    Network,
    Storage,
}

impl Resource {
    pub const ALL: [Resource; 4] = [Self::Image, Self::Scratch, Self::Network, Self::Storage];

    /// Column name, and `VmFailed.phase` when it failed.
    pub fn name(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Scratch => "scratch",
            Self::Network => "network",
            Self::Storage => "storage",
        }
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub vm_id: String,
    pub run_key: String,
    pub host: String,
    pub run: JobRunRef,
    pub spec: VmSpec,
    pub state: VmState,
    pub requested_at_ms: i64,
    pub image: Option<ImageReady>,
    pub scratch: Option<ScratchReady>,
    pub network: Option<NetworkReady>,
    pub storage: Option<StorageReady>,
    pub pid: Option<u32>,
    pub cancel_reason: Option<String>,
    pub pending: Option<Event>,
    pub trace: BTreeMap<String, String>,
    /// The host cores its vCPUs are pinned to (vCPU i → element i); empty: not pinned.
    pub host_cores: Vec<u32>,
}

impl VmRow {
    /// A new row in state `state`.
    pub fn new(
        run: &JobRunRef,
        host: &str,
        spec: VmSpec,
        state: VmState,
        trace: BTreeMap<String, String>,
    ) -> Self {
        Self {
            vm_id: spec.vm_id.clone(),
            run_key: wnodes_bus::event::run_key(run),
            host: host.to_owned(),
            run: run.clone(),
            spec,
            state,
            requested_at_ms: wnodes_proto::time::now_ms(),
            image: None,
            scratch: None,
            network: None,
            storage: None,
            pid: None,
            cancel_reason: None,
            pending: None,
            trace,
            host_cores: Vec::new(),
        }
    }

    /// Which results are in.
    pub fn has(&self, r: Resource) -> bool {
        match r {
            Resource::Image => self.image.is_some(),
            Resource::Scratch => self.scratch.is_some(),
            Resource::Network => self.network.is_some(),
            Resource::Storage => self.storage.is_some(),
        }
    }
}

/// What a preparation result does to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The VM is no longer preparing (or unknown): drop the result.
    Ignore(&'static str),
    /// Recorded; waiting for the others.
    Wait,
    /// All four are in: start qemu.
    Launch,
    /// A preparation failed: the VM fails in this phase.
    Fail { phase: &'static str, reason: String },
}

/// The join, as a pure function of the row (before the result) and the result.
pub fn decide(row: Option<&VmRow>, resource: Resource, failure: Option<&str>) -> Decision {
    let Some(row) = row else {
        return Decision::Ignore("unknown VM");
    };
    if row.state != VmState::Preparing {
        return Decision::Ignore("VM no longer preparing");
    }
    if let Some(reason) = failure {
        return Decision::Fail {
            phase: resource.name(),
            reason: reason.to_owned(),
        };
    }
    let complete = Resource::ALL.iter().all(|r| *r == resource || row.has(*r));
    if complete {
        Decision::Launch
    } else {
        Decision::Wait
    }
}

/// Creates the table, or adds the columns an older launcher's table lacks.
pub async fn init(pool: &SqlitePool) -> Result<(), VmTableError> {
    sqlx::query(SCHEMA)
        .execute(pool)
        .await
        .map_err(sql("create table"))?;
    let columns: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info('launcher_vms')")
            .fetch_all(pool)
            .await
            .map_err(sql("read the table's columns"))?;
    for (name, add) in ADDED_COLUMNS {
        if !columns.iter().any(|c| c == name) {
            sqlx::query(add)
                .execute(pool)
                .await
                .map_err(sql("add a column"))?;
        }
    }
    Ok(())
}

fn trace_json(trace: &BTreeMap<String, String>) -> String {
    serde_json::to_string(trace).unwrap_or_else(|_| "{}".into())
}

/// Inserts a row unless one exists. Returns false when it existed.
pub async fn insert(conn: &mut SqliteConnection, row: &VmRow) -> Result<bool, VmTableError> {
    let res = sqlx::query(
        "INSERT OR IGNORE INTO launcher_vms
         (vm_id, run_key, host, run, spec, state, requested_at, cancel_reason, trace)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&row.vm_id)
    .bind(&row.run_key)
    .bind(&row.host)
    .bind(row.run.encode_to_vec())
    .bind(row.spec.encode_to_vec())
    .bind(row.state.as_str())
    .bind(row.requested_at_ms)
    .bind(&row.cancel_reason)
    .bind(trace_json(&row.trace))
    .execute(conn)
    .await
    .map_err(sql("insert"))?;
    Ok(res.rows_affected() == 1)
}

fn decode<M: Message + Default>(
    row: &SqliteRow,
    vm_id: &str,
    column: &'static str,
) -> Result<Option<M>, VmTableError> {
    let blob: Option<Vec<u8>> = row.try_get(column).map_err(sql("read column"))?;
    blob.map(|b| {
        M::decode(b.as_slice()).map_err(|e| VmTableError::Corrupt {
            vm_id: vm_id.to_owned(),
            column,
            detail: e.to_string(),
        })
    })
    .transpose()
}

fn from_row(r: &SqliteRow) -> Result<VmRow, VmTableError> {
    let vm_id: String = r.try_get("vm_id").map_err(sql("read column"))?;
    let state: String = r.try_get("state").map_err(sql("read column"))?;
    let corrupt = |column, detail: String| VmTableError::Corrupt {
        vm_id: vm_id.clone(),
        column,
        detail,
    };
    let state = VmState::parse(&state).ok_or_else(|| corrupt("state", state.clone()))?;
    let trace: String = r.try_get("trace").map_err(sql("read column"))?;
    let trace = serde_json::from_str(&trace).map_err(|e| corrupt("trace", e.to_string()))?;
    let pid: Option<i64> = r.try_get("pid").map_err(sql("read column"))?;
    let cores: Option<String> = r.try_get("host_cores").map_err(sql("read column"))?;
    let host_cores = match cores {
        None => Vec::new(),
        Some(text) => {
            crate::cores::from_column(&text).ok_or_else(|| corrupt("host_cores", text))?
        }
    };
    Ok(VmRow {
        run_key: r.try_get("run_key").map_err(sql("read column"))?,
        host: r.try_get("host").map_err(sql("read column"))?,
        run: decode(r, &vm_id, "run")?.unwrap_or_default(),
        spec: decode(r, &vm_id, "spec")?.unwrap_or_default(),
        state,
        requested_at_ms: r.try_get("requested_at").map_err(sql("read column"))?,
        image: decode(r, &vm_id, "image")?,
        scratch: decode(r, &vm_id, "scratch")?,
        network: decode(r, &vm_id, "network")?,
        storage: decode(r, &vm_id, "storage")?,
        pid: pid.and_then(|p| u32::try_from(p).ok()),
        cancel_reason: r.try_get("cancel_reason").map_err(sql("read column"))?,
        pending: decode(r, &vm_id, "pending")?,
        trace,
        host_cores,
        vm_id,
    })
}

/// The row of `vm_id`.
pub async fn load(conn: &mut SqliteConnection, vm_id: &str) -> Result<Option<VmRow>, VmTableError> {
    let row = sqlx::query("SELECT * FROM launcher_vms WHERE vm_id = ?")
        .bind(vm_id)
        .fetch_optional(conn)
        .await
        .map_err(sql("load"))?;
    row.as_ref().map(from_row).transpose()
}

/// Rows in any of `states`.
pub async fn list(pool: &SqlitePool, states: &[VmState]) -> Result<Vec<VmRow>, VmTableError> {
    let rows = sqlx::query("SELECT * FROM launcher_vms ORDER BY vm_id")
        .fetch_all(pool)
        .await
        .map_err(sql("list"))?;
    let mut out = Vec::new();
    for r in &rows {
        let row = from_row(r)?;
        if states.is_empty() || states.contains(&row.state) {
            out.push(row);
        }
    }
    Ok(out)
}

/// The VM uids (`VmSpec.vm_user`) held by VMs not yet finished.
pub async fn live_vm_uids(
    conn: &mut SqliteConnection,
) -> Result<std::collections::BTreeSet<u32>, VmTableError> {
    let rows = sqlx::query(
        "SELECT vm_id, spec FROM launcher_vms WHERE state IN ('preparing', 'launching', 'running')",
    )
    .fetch_all(conn)
    .await
    .map_err(sql("list live VM users"))?;
    let mut uids = std::collections::BTreeSet::new();
    for r in &rows {
        let vm_id: String = r.try_get("vm_id").map_err(sql("read column"))?;
        let spec: Option<VmSpec> = decode(r, &vm_id, "spec")?;
        uids.extend(spec.and_then(|s| s.vm_user).map(|u| u.uid));
    }
    Ok(uids)
}

/// Records the host cores `vm_id`'s vCPUs are pinned to, before its qemu starts.
pub async fn set_host_cores(
    conn: &mut SqliteConnection,
    vm_id: &str,
    cores: &[u32],
) -> Result<(), VmTableError> {
    sqlx::query("UPDATE launcher_vms SET host_cores = ? WHERE vm_id = ?")
        .bind(crate::cores::to_column(cores))
        .bind(vm_id)
        .execute(conn)
        .await
        .map_err(sql("store host cores"))?;
    Ok(())
}

/// The pinned cores of every VM that holds some (launching or running), but `except`: what
/// the core allocator starts from, also after a restart.
pub async fn live_core_uses(
    conn: &mut SqliteConnection,
    except: &str,
) -> Result<Vec<crate::cores::CoreUse>, VmTableError> {
    let rows = sqlx::query(
        "SELECT vm_id, spec, host_cores FROM launcher_vms
         WHERE state IN ('launching', 'running') AND host_cores IS NOT NULL AND vm_id != ?
         ORDER BY vm_id",
    )
    .bind(except)
    .fetch_all(conn)
    .await
    .map_err(sql("list pinned cores"))?;
    let mut uses = Vec::new();
    for r in &rows {
        let vm_id: String = r.try_get("vm_id").map_err(sql("read column"))?;
        let spec: Option<VmSpec> = decode(r, &vm_id, "spec")?;
        let text: String = r.try_get("host_cores").map_err(sql("read column"))?;
        let cores = crate::cores::from_column(&text).ok_or_else(|| VmTableError::Corrupt {
            vm_id: vm_id.clone(),
            column: "host_cores",
            detail: text.clone(),
        })?;
        uses.push(crate::cores::CoreUse {
            vo: spec.map(|s| s.vo).unwrap_or_default(),
            cores,
        });
    }
    Ok(uses)
}

/// Rows with an event waiting to be published.
pub async fn list_pending(pool: &SqlitePool) -> Result<Vec<VmRow>, VmTableError> {
    let rows = sqlx::query("SELECT * FROM launcher_vms WHERE pending IS NOT NULL ORDER BY vm_id")
        .fetch_all(pool)
        .await
        .map_err(sql("list pending"))?;
    rows.iter().map(from_row).collect()
}

/// Stores a ready result.
pub async fn store_result(
    conn: &mut SqliteConnection,
    vm_id: &str,
    resource: Resource,
    encoded: Vec<u8>,
) -> Result<(), VmTableError> {
    let q = match resource {
        Resource::Image => "UPDATE launcher_vms SET image = ? WHERE vm_id = ?",
        Resource::Scratch => "UPDATE launcher_vms SET scratch = ? WHERE vm_id = ?",
        Resource::Network => "UPDATE launcher_vms SET network = ? WHERE vm_id = ?",
        Resource::Storage => "UPDATE launcher_vms SET storage = ? WHERE vm_id = ?",
    };
    sqlx::query(q)
        .bind(encoded)
        .bind(vm_id)
        .execute(conn)
        .await
        .map_err(sql("store result"))?;
    Ok(())
}

/// Moves `vm_id` from `from` to `to` (with an optional pending event and pid). Returns false
/// when the VM was not in state `from`.
pub async fn transition(
    conn: &mut SqliteConnection,
    vm_id: &str,
    from: VmState,
    to: VmState,
    pending: Option<&Event>,
    pid: Option<u32>,
) -> Result<bool, VmTableError> {
    let res = sqlx::query(
        "UPDATE launcher_vms SET state = ?, pending = COALESCE(?, pending), pid = COALESCE(?, pid)
         WHERE vm_id = ? AND state = ?",
    )
    .bind(to.as_str())
    .bind(pending.map(|e| e.encode_to_vec()))
    .bind(pid.map(i64::from))
    .bind(vm_id)
    .bind(from.as_str())
    .execute(conn)
    .await
    .map_err(sql("transition"))?;
    Ok(res.rows_affected() == 1)
}

/// Records a cancellation request.
pub async fn set_cancel_reason(
    conn: &mut SqliteConnection,
    vm_id: &str,
    reason: &str,
) -> Result<(), VmTableError> {
    sqlx::query(
        "UPDATE launcher_vms SET cancel_reason = ? WHERE vm_id = ? AND cancel_reason IS NULL",
    )
    .bind(reason)
    .bind(vm_id)
    .execute(conn)
    .await
    .map_err(sql("cancel"))?;
    Ok(())
}

/// Clears the pending event once JetStream acknowledged it (only if it is still that event).
pub async fn clear_pending(
    conn: &mut SqliteConnection,
    vm_id: &str,
    event_id: &str,
) -> Result<(), VmTableError> {
    let Some(row) = load(&mut *conn, vm_id).await? else {
        return Ok(());
    };
    if row.pending.as_ref().is_some_and(|p| p.id == event_id) {
        sqlx::query("UPDATE launcher_vms SET pending = NULL WHERE vm_id = ?")
            .bind(vm_id)
            .execute(conn)
            .await
            .map_err(sql("clear pending"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: VmState) -> VmRow {
        let run = JobRunRef {
            job_id: "1".into(),
            ..Default::default()
        };
        let spec = VmSpec {
            vm_id: crate::policy::vm_id(&run),
            ..Default::default()
        };
        VmRow::new(&run, "hv1", spec, state, BTreeMap::new())
    }

    #[test]
    fn the_join_waits_for_all_four_and_fails_on_any_failure() {
        let mut r = row(VmState::Preparing);
        assert_eq!(decide(Some(&r), Resource::Image, None), Decision::Wait);
        r.image = Some(ImageReady::default());
        r.scratch = Some(ScratchReady::default());
        assert_eq!(decide(Some(&r), Resource::Network, None), Decision::Wait);
        r.network = Some(NetworkReady::default());
        assert_eq!(decide(Some(&r), Resource::Storage, None), Decision::Launch);
        assert_eq!(
            decide(Some(&r), Resource::Scratch, Some("disk full")),
            Decision::Fail {
                phase: "scratch",
                reason: "disk full".into()
            }
        );
        assert!(matches!(
            decide(None, Resource::Image, None),
            Decision::Ignore(_)
        ));
        for s in [
            VmState::Launching,
            VmState::Running,
            VmState::Failed,
            VmState::Stopped,
        ] {
            assert!(matches!(
                decide(Some(&row(s)), Resource::Image, Some("x")),
                Decision::Ignore(_)
            ));
        }
    }

    #[tokio::test]
    async fn rows_round_trip_and_transitions_are_conditional() {
        let dir = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&dir.path().join("k.db"))
            .await
            .unwrap();
        init(store.pool()).await.unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let mut r = row(VmState::Preparing);
        r.trace.insert("traceparent".into(), "00-abc-def-01".into());
        assert!(insert(&mut conn, &r).await.unwrap());
        assert!(!insert(&mut conn, &r).await.unwrap());
        let img = ImageReady {
            path: "/x".into(),
            ..Default::default()
        };
        store_result(&mut conn, &r.vm_id, Resource::Image, img.encode_to_vec())
            .await
            .unwrap();
        let back = load(&mut conn, &r.vm_id).await.unwrap().unwrap();
        assert_eq!(back.image, Some(img));
        assert_eq!(back.trace, r.trace);
        let ev = Event {
            id: "vm.running:x".into(),
            ..Default::default()
        };
        assert!(
            !transition(
                &mut conn,
                &r.vm_id,
                VmState::Launching,
                VmState::Running,
                Some(&ev),
                Some(7)
            )
            .await
            .unwrap()
        );
        assert!(
            transition(
                &mut conn,
                &r.vm_id,
                VmState::Preparing,
                VmState::Running,
                Some(&ev),
                Some(7)
            )
            .await
            .unwrap()
        );
        let back = load(&mut conn, &r.vm_id).await.unwrap().unwrap();
        assert_eq!((back.state, back.pid), (VmState::Running, Some(7)));
        assert_eq!(
            back.pending.as_ref().map(|e| e.id.as_str()),
            Some("vm.running:x")
        );
        drop(conn);
        assert_eq!(list_pending(store.pool()).await.unwrap().len(), 1);
        let mut conn = store.pool().acquire().await.unwrap();
        clear_pending(&mut conn, &r.vm_id, "other").await.unwrap();
        assert!(
            load(&mut conn, &r.vm_id)
                .await
                .unwrap()
                .unwrap()
                .pending
                .is_some()
        );
        clear_pending(&mut conn, &r.vm_id, "vm.running:x")
            .await
            .unwrap();
        assert!(
            load(&mut conn, &r.vm_id)
                .await
                .unwrap()
                .unwrap()
                .pending
                .is_none()
        );
    }

    #[tokio::test]
    async fn pinned_cores_are_rebuilt_from_live_rows_and_old_tables_get_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let store = wnodes_bus::KeyStore::open(&dir.path().join("k.db"))
            .await
            .unwrap();
        // A table as an older launcher made it (no host_cores column), with a row.
        let old_schema = SCHEMA.replace(
            ",\n    host_cores    TEXT                -- pinned host cores (2,3: vCPU 0 on 2, vCPU 1 on 3); NULL: none",
            "",
        );
        assert!(!old_schema.contains("host_cores"), "{old_schema}");
        sqlx::query(sqlx::AssertSqlSafe(old_schema))
            .execute(store.pool())
            .await
            .unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let old = row(VmState::Running);
        sqlx::query("INSERT INTO launcher_vms (vm_id, run_key, host, run, spec, state, requested_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(&old.vm_id).bind(&old.run_key).bind(&old.host).bind(old.run.encode_to_vec()).bind(old.spec.encode_to_vec()).bind("running").bind(0_i64)
            .execute(&mut *conn).await.unwrap();
        drop(conn);
        init(store.pool()).await.unwrap();
        init(store.pool()).await.unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        assert!(
            load(&mut conn, &old.vm_id)
                .await
                .unwrap()
                .unwrap()
                .host_cores
                .is_empty()
        );

        let with = |job: &str, vo: &str, state: VmState| {
            let run = JobRunRef {
                job_id: job.into(),
                ..Default::default()
            };
            let spec = VmSpec {
                vm_id: crate::policy::vm_id(&run),
                vo: vo.into(),
                ..Default::default()
            };
            VmRow::new(&run, "hv1", spec, state, BTreeMap::new())
        };
        let a = with("a", "atlas", VmState::Running);
        let b = with("b", "cms", VmState::Launching);
        let c = with("c", "cms", VmState::Stopped);
        for (r, cores) in [(&a, vec![0, 1]), (&b, vec![2]), (&c, vec![3])] {
            insert(&mut conn, r).await.unwrap();
            set_host_cores(&mut conn, &r.vm_id, &cores).await.unwrap();
        }
        assert_eq!(
            load(&mut conn, &a.vm_id).await.unwrap().unwrap().host_cores,
            vec![0, 1]
        );
        let mut live = live_core_uses(&mut conn, "").await.unwrap();
        live.sort_by(|x, y| x.vo.cmp(&y.vo));
        assert_eq!(
            live,
            vec![
                crate::cores::CoreUse {
                    vo: "atlas".into(),
                    cores: vec![0, 1]
                },
                crate::cores::CoreUse {
                    vo: "cms".into(),
                    cores: vec![2]
                },
            ],
            "the stopped VM's core is free"
        );
        assert_eq!(live_core_uses(&mut conn, &b.vm_id).await.unwrap().len(), 1);
        // The launching VM finishes: its cores are free for the next allocation.
        assert!(
            transition(
                &mut conn,
                &b.vm_id,
                VmState::Launching,
                VmState::Failed,
                None,
                None
            )
            .await
            .unwrap()
        );
        assert_eq!(live_core_uses(&mut conn, "").await.unwrap().len(), 1);
    }
}
