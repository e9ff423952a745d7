//! The usage totals: the `usage_totals` table (in the consumer's idempotency store), the handler
//! that adds each `usage.recorded` to it with the event's key, and the Prometheus counters brought
//! up to the committed totals.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use sqlx::SqlitePool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wnodes_bus::{Handler, HandlerCtx, HandlerError, proto, proto::event::Body};

/// The totals, one row per (VO, group, role, user); created at start.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS usage_totals (
    vo           TEXT NOT NULL,
    vo_group     TEXT NOT NULL,
    vo_role      TEXT NOT NULL,
    user_name    TEXT NOT NULL,
    jobs         INTEGER NOT NULL,  -- records (count)
    cpu_seconds  REAL NOT NULL,     -- seconds
    wall_seconds REAL NOT NULL,     -- seconds
    core_seconds REAL NOT NULL,     -- wall seconds × cores
    PRIMARY KEY (vo, vo_group, vo_role, user_name)
)";

type Labels = Vec<(&'static str, String)>;
type FloatCounter = Counter<f64, AtomicU64>;

/// The exporter's counters (`wnodes_usage_*_total`); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    jobs: Family<Labels, Counter>,
    cpu: Family<Labels, FloatCounter>,
    wall: Family<Labels, FloatCounter>,
    core: Family<Labels, FloatCounter>,
    per_user: bool,
}

/// One row of totals.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Total {
    pub vo: String,
    pub vo_group: String,
    pub vo_role: String,
    /// Empty unless per user.
    pub user_name: String,
    pub jobs: i64,
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    pub core_seconds: f64,
}

impl Counters {
    /// Registers `wnodes_usage_{jobs,cpu_seconds,wall_seconds,core_seconds}_total`.
    pub fn register(registry: &mut Registry, per_user: bool) -> Self {
        let c = Self {
            per_user,
            ..Self::default()
        };
        let r = registry.sub_registry_with_prefix("wnodes_usage");
        r.register("jobs", "Usage records", c.jobs.clone());
        r.register(
            "cpu_seconds",
            "CPU time (user + system) of the recorded runs, seconds",
            c.cpu.clone(),
        );
        r.register(
            "wall_seconds",
            "Wall time of the recorded runs, seconds",
            c.wall.clone(),
        );
        r.register(
            "core_seconds",
            "Wall time × cores of the recorded runs, seconds",
            c.core.clone(),
        );
        c
    }

    fn labels(&self, t: &Total) -> Labels {
        let mut l = vec![
            ("vo", t.vo.clone()),
            ("group", t.vo_group.clone()),
            ("role", t.vo_role.clone()),
        ];
        if self.per_user {
            l.push(("user", t.user_name.clone()));
        }
        l
    }

    /// Raises each counter to its committed total (counters never go down).
    pub fn bring_up_to(&self, totals: &[Total]) {
        for t in totals {
            let labels = self.labels(t);
            let jobs = self.jobs.get_or_create(&labels);
            let want = u64::try_from(t.jobs).unwrap_or_default();
            if want > jobs.get() {
                jobs.inc_by(want - jobs.get());
            }
            for (family, want) in [
                (&self.cpu, t.cpu_seconds),
                (&self.wall, t.wall_seconds),
                (&self.core, t.core_seconds),
            ] {
                let c = family.get_or_create(&labels);
                let have = c.get();
                if want > have {
                    c.inc_by(want - have);
                }
            }
        }
    }
}

/// The committed totals, per (VO, group, role), and per user too when `per_user`.
pub async fn totals(pool: &SqlitePool, per_user: bool) -> Result<Vec<Total>, sqlx::Error> {
    let q = if per_user {
        "SELECT vo, vo_group, vo_role, user_name, jobs, cpu_seconds, wall_seconds, core_seconds
         FROM usage_totals ORDER BY vo, vo_group, vo_role, user_name"
    } else {
        "SELECT vo, vo_group, vo_role, '' AS user_name, SUM(jobs) AS jobs,
            SUM(cpu_seconds) AS cpu_seconds, SUM(wall_seconds) AS wall_seconds,
            SUM(core_seconds) AS core_seconds
         FROM usage_totals GROUP BY vo, vo_group, vo_role ORDER BY vo, vo_group, vo_role"
    };
    sqlx::query_as(q).fetch_all(pool).await
}

/// Brings the counters up to the totals at start, after each handled event (`handled`) and
/// every `every`, until `shutdown`.
pub async fn run_refresh(
    pool: SqlitePool,
    counters: Counters,
    every: std::time::Duration,
    handled: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<(), sqlx::Error> {
    loop {
        match totals(&pool, counters.per_user).await {
            Ok(t) => counters.bring_up_to(&t),
            Err(e) => {
                tracing::warn!(error = %wnodes_bus::ErrorChain(&e), "Reading the usage totals failed; trying again.");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = handled.notified() => {
                // Let the handler's transaction commit first (it commits after the handler
                // returns); the periodic refresh catches any that were later still.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// The handler: adds each `usage.recorded` to its row, in the transaction its key commits in.
#[derive(Debug, Clone)]
pub struct UsageHandler {
    pub handled: Arc<Notify>,
    /// Events added by this process.
    pub added: Arc<AtomicU64>,
}

/// What one event adds.
struct Addition {
    vo: String,
    group: String,
    role: String,
    user: String,
    cpu: f64,
    wall: f64,
    core: f64,
}

/// The event's usage; `Err` (dead-lettered) when its values are impossible.
fn addition(u: &proto::UsageRecorded) -> Result<Addition, String> {
    let a = match &u.record {
        Some(r) => Addition {
            vo: r.vo.clone(),
            group: r.vo_group.clone(),
            role: r.vo_role.clone(),
            user: r.user.clone(),
            cpu: r.cpu_seconds,
            wall: r.wall_seconds,
            core: r.wall_seconds * f64::from(r.cores),
        },
        // An accounting without the record: its summary (no group or role).
        None => {
            let usage = u.usage.unwrap_or_default();
            let wall = wnodes_proto::time::duration_secs(usage.wall.as_ref());
            Addition {
                vo: u.vo.clone(),
                group: String::new(),
                role: String::new(),
                user: u.user.clone(),
                cpu: usage.cpu_seconds,
                wall,
                core: wall * f64::from(usage.cores),
            }
        }
    };
    for (what, v) in [("CPU", a.cpu), ("wall", a.wall), ("core", a.core)] {
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{what} seconds {v}"));
        }
    }
    Ok(a)
}

impl Handler for UsageHandler {
    fn name(&self) -> &'static str {
        "usage.add"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        let Some(Body::UsageRecorded(u)) = &event.body else {
            tracing::debug!(id = %event.id, "Not a usage event; ignoring.");
            return Ok(());
        };
        let a = addition(u).map_err(|why| {
            HandlerError::reject(format!("impossible usage event {}: {why}", event.id))
        })?;
        let conn = ctx.tx().await?;
        sqlx::query(
            "INSERT INTO usage_totals (vo, vo_group, vo_role, user_name, jobs, cpu_seconds,
                wall_seconds, core_seconds)
             VALUES ($1, $2, $3, $4, 1, $5, $6, $7)
             ON CONFLICT (vo, vo_group, vo_role, user_name) DO UPDATE SET
                jobs = jobs + 1, cpu_seconds = cpu_seconds + excluded.cpu_seconds,
                wall_seconds = wall_seconds + excluded.wall_seconds,
                core_seconds = core_seconds + excluded.core_seconds",
        )
        .bind(&a.vo)
        .bind(&a.group)
        .bind(&a.role)
        .bind(&a.user)
        .bind(a.cpu)
        .bind(a.wall)
        .bind(a.core)
        .execute(&mut *conn)
        .await
        .map_err(HandlerError::retry)?;
        self.added.fetch_add(1, Ordering::Relaxed);
        self.handled.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(user: &str, jobs: i64, cpu: f64) -> Total {
        Total {
            vo: "atlas".into(),
            vo_group: "/atlas".into(),
            vo_role: "Role=production".into(),
            user_name: user.into(),
            jobs,
            cpu_seconds: cpu,
            wall_seconds: 2.0 * cpu,
            core_seconds: 4.0 * cpu,
        }
    }

    fn exposition(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    #[test]
    fn counters_rise_to_the_totals_and_never_fall() {
        let mut registry = Registry::default();
        let c = Counters::register(&mut registry, false);
        c.bring_up_to(&[total("", 2, 10.5)]);
        c.bring_up_to(&[total("", 1, 3.0)]); // an older read: nothing goes down
        c.bring_up_to(&[total("", 3, 12.25)]);
        let text = exposition(&registry);
        let labels = "{vo=\"atlas\",group=\"/atlas\",role=\"Role=production\"}";
        assert!(
            text.contains(&format!("wnodes_usage_jobs_total{labels} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!("wnodes_usage_cpu_seconds_total{labels} 12.25")),
            "{text}"
        );
        assert!(
            text.contains(&format!("wnodes_usage_core_seconds_total{labels} 49")),
            "{text}"
        );
        assert!(!text.contains("user="), "{text}");
    }

    #[test]
    fn the_user_label_is_there_only_when_configured() {
        let mut registry = Registry::default();
        let c = Counters::register(&mut registry, true);
        c.bring_up_to(&[total("alice", 1, 1.0), total("bob", 2, 2.0)]);
        let text = exposition(&registry);
        assert!(text.contains("user=\"alice\"} 1"), "{text}");
        assert!(text.contains("user=\"bob\"} 2"), "{text}");
    }

    #[test]
    fn impossible_usage_is_refused_naming_the_value() {
        let mut u = proto::UsageRecorded {
            record: Some(proto::UsageRecord {
                vo: "atlas".into(),
                cpu_seconds: -1.0,
                wall_seconds: 5.0,
                cores: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(addition(&u).err().as_deref(), Some("CPU seconds -1"));
        if let Some(r) = &mut u.record {
            r.cpu_seconds = 1.0;
        }
        let a = addition(&u).unwrap();
        assert_eq!(
            (a.vo.as_str(), a.cpu, a.wall, a.core),
            ("atlas", 1.0, 5.0, 10.0)
        );
    }
}
