//! A configurable bus participant for the system tests and the chain demo. Runs on the real
//! service runtime (config, telemetry, health endpoint, signals), so the tests exercise what
//! services run.
//!
//! - `[node] role = "publish"`: publishes `count` `JobStarted` events (runs 1..=count) inside
//!   one root span `demo.publish`, prints `trace_id=<id>` and exits.
//! - `role = "relay"`: consumes `job.started`, publishes the derived `VmRequested`.
//! - `role = "sink"`: consumes `consume` (an event type), applies the effect.
//!
//! Effects (`effect`): `store` inserts a row into table `effects` in the same transaction as the
//! idempotency key; `file` creates `<effect_dir>/<sha of key>` after checking it does not exist
//! and appends the key to `<effect_dir>/effects.log`; `none`.
//! Faults: `fail = "always"` fails every attempt, `fail = "panic"` panics in every attempt; `hang = true` sleeps past any timeout;
//! `reject = true` rejects; `work_ms` sleeps before the effect (SIGTERM-mid-handler test).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tracing::Instrument;
use wnodes_bus::{
    Consumer, EventExt, Handler, HandlerCtx, HandlerError, proto, proto::event::Body, subject,
};
use wnodes_runtime::{NoCommand, NoHandler, Parts, Role, Scope, Service, ServiceCtx, StartError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct NodeConfig {
    role: String,
    count: u32,
    /// Event type consumed by a sink, e.g. "vm.requested".
    consume: String,
    /// Durable consumer name (defaults to `node-<role>`).
    durable: Option<String>,
    effect: String,
    effect_dir: Option<PathBuf>,
    fail: String,
    hang: bool,
    reject: bool,
    work_ms: u64,
    /// Faults (fail, hang, reject) apply only to runs whose job id contains this ("" = all).
    fault_match: String,
    /// Job id prefix for published runs.
    job_prefix: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            role: "sink".into(),
            count: 1,
            consume: "vm.requested".into(),
            durable: None,
            effect: "store".into(),
            effect_dir: None,
            fail: "never".into(),
            hang: false,
            reject: false,
            work_ms: 0,
            fault_match: String::new(),
            job_prefix: "job".into(),
        }
    }
}

fn run_ref(site: &str, prefix: &str, i: u32) -> proto::JobRunRef {
    proto::JobRunRef {
        site: site.into(),
        lrms: proto::Lrms::Htcondor as i32,
        job_id: format!("{prefix}-{i}"),
        run_attempt: 1,
    }
}

fn job_started(site: &str, host: &str, source: &str, prefix: &str, i: u32) -> proto::Event {
    let run = run_ref(site, prefix, i);
    let job = proto::JobDescription {
        run: Some(run.clone()),
        vo: "atlas".into(),
        host: host.into(),
        payload: Some(proto::JobPayload {
            kind: Some(proto::job_payload::Kind::InlineScript(
                b"echo hello".to_vec(),
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    proto::Event::build(
        run,
        host,
        source,
        Body::JobStarted(proto::JobStarted {
            job: Some(job),
            started_at: None,
        }),
    )
}

struct Relay {
    source: String,
}

impl Handler for Relay {
    fn name(&self) -> &'static str {
        "node.relay"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        println!(
            "relay handled {} trace_id={}",
            event.id,
            wnodes_bus::propagation::current_trace_id()
        );
        let run = event.run.clone().unwrap_or_default();
        let spec = proto::VmSpec {
            vm_id: format!("vm-{}", run.job_id),
            ..Default::default()
        };
        ctx.publish(proto::Event::build(
            run,
            &event.host,
            &self.source,
            Body::VmRequested(proto::VmRequested { spec: Some(spec) }),
        ));
        Ok(())
    }
}

struct Sink {
    cfg: NodeConfig,
}

impl Handler for Sink {
    fn name(&self) -> &'static str {
        "node.sink"
    }

    async fn handle(&self, ctx: &mut HandlerCtx, event: proto::Event) -> Result<(), HandlerError> {
        tracing::info!(key = ctx.key(), attempt = ctx.attempt(), "Handling.");
        let faulty = event
            .run
            .as_ref()
            .is_some_and(|r| r.job_id.contains(&self.cfg.fault_match));
        if faulty && self.cfg.hang {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if faulty && self.cfg.reject {
            return Err(HandlerError::reject("this node rejects everything"));
        }
        if faulty && self.cfg.fail == "panic" {
            panic!("simulated panic on attempt {}", ctx.attempt());
        }
        if faulty && self.cfg.fail == "always" {
            return Err(HandlerError::retry(format!(
                "simulated failure on attempt {}",
                ctx.attempt()
            )));
        }
        if self.cfg.work_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cfg.work_ms)).await;
        }
        match self.cfg.effect.as_str() {
            "store" => {
                let key = ctx.key().to_owned();
                let conn = ctx.tx().await?;
                sqlx::query("INSERT INTO effects (key, event_id) VALUES (?, ?)")
                    .bind(key)
                    .bind(&event.id)
                    .execute(&mut *conn)
                    .await
                    .map_err(HandlerError::retry)?;
            }
            "file" => {
                let dir = self
                    .cfg
                    .effect_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("."));
                let marker = dir.join(hex::encode(sha2::Sha256::digest(ctx.key().as_bytes())));
                // Host state is checked by key before the effect is made.
                if !marker.exists() {
                    use std::io::Write;
                    let mut log = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("effects.log"))
                        .map_err(HandlerError::retry)?;
                    writeln!(log, "{}", ctx.key()).map_err(HandlerError::retry)?;
                    std::fs::write(&marker, b"").map_err(HandlerError::retry)?;
                }
            }
            _ => {}
        }
        tracing::info!(key = ctx.key(), "Effect applied.");
        println!(
            "sink handled {} trace_id={}",
            event.id,
            wnodes_bus::propagation::current_trace_id()
        );
        Ok(())
    }
}

/// The bus participant as a service of the runtime. Its consumer depends on its role, so it
/// declares none and runs its own as a task, bound to the durable the test provisioned (it
/// connects as the site's admin: it stands for any service).
struct Node;

/// Not a role of the site: the test provisions its durables and gives it the admin's creds.
const NODE: Role = Role {
    name: "node",
    scope: Scope::PerHost,
    consumes: &[],
    publishes: &[],
    watches_runs: false,
    optional: false,
};

impl Service for Node {
    const ROLE: &'static Role = &NODE;
    const ABOUT: &'static str = "A configurable bus participant (system tests, chain demo)";
    type Config = NodeConfig;
    type Handler = NoHandler;
    type Command = NoCommand;

    async fn build(ctx: &ServiceCtx<NodeConfig>) -> Result<Parts<NoHandler>, StartError> {
        let cfg = ctx.config.clone();
        let host = ctx.common.host.clone();
        let site = ctx.common.site.clone();
        let source = ctx.source();
        let shutdown = ctx.shutdown.clone();
        match cfg.role.as_str() {
            "publish" => {
                let bus = ctx.bus.clone();
                Ok(Parts::tasks_only().task("publish", async move {
                    let span = tracing::info_span!("demo.publish", otel.kind = "producer");
                    async {
                        println!("trace_id={}", wnodes_bus::propagation::current_trace_id());
                        let events: Vec<_> = (1..=cfg.count)
                            .map(|i| job_started(&site, &host, &source, &cfg.job_prefix, i))
                            .collect();
                        bus.publish_pipelined(&events, 64).await
                    }
                    .instrument(span)
                    .await?;
                    println!("published={}", cfg.count);
                    Ok(())
                }))
            }
            "relay" => {
                let spec = ctx.consumer_spec(
                    cfg.durable.clone().unwrap_or_else(|| "node-relay".into()),
                    vec![subject::event_filter(Some(&host), "job.started")?],
                );
                provision(ctx, &spec).await?;
                let consumer =
                    Consumer::bind(ctx.bus.clone(), ctx.store.clone(), spec, Relay { source })
                        .await?;
                println!("ready");
                Ok(Parts::tasks_only().task("relay", async move {
                    consumer.run(shutdown).await?;
                    Ok(())
                }))
            }
            "sink" => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL, event_id TEXT NOT NULL)",
                )
                .execute(ctx.store.pool())
                .await
                .map_err(|e| StartError::failed("create the effects table", e))?;
                let spec = ctx.consumer_spec(
                    cfg.durable.clone().unwrap_or_else(|| "node-sink".into()),
                    vec![subject::event_filter(Some(&host), &cfg.consume)?],
                );
                provision(ctx, &spec).await?;
                let consumer =
                    Consumer::bind(ctx.bus.clone(), ctx.store.clone(), spec, Sink { cfg }).await?;
                println!("ready");
                Ok(Parts::tasks_only().task("sink", async move {
                    consumer.run(shutdown).await?;
                    Ok(())
                }))
            }
            other => Err(StartError::config(
                Self::NAME,
                format!("role: unknown role {other:?} (publish, relay, sink)"),
            )),
        }
    }
}

/// Makes the node's durable as the operator would (`wnodes-site`, the code behind `wnodesctl
/// provision`): the node stands for any service, so no site description names its durable,
/// and it runs with the admin's credentials.
async fn provision(
    ctx: &ServiceCtx<NodeConfig>,
    spec: &wnodes_bus::ConsumerSpec,
) -> Result<(), StartError> {
    wnodes_site::streams::provision_durable(
        ctx.bus.jetstream(),
        spec.expected(),
        wnodes_site::Mode::Apply,
    )
    .await
    .map_err(|e| StartError::failed("provision the node's durable", e))?;
    Ok(())
}

fn main() -> ExitCode {
    wnodes_runtime::main::<Node>()
}
