//! [`Usage`]: the service as the runtime runs it.

use std::sync::{Arc, atomic::AtomicU64};

use tokio::sync::Notify;
use wnodes_runtime::{NoCommand, Parts, Service, ServiceCtx, StartError};

use crate::{
    Config,
    totals::{self, Counters, UsageHandler},
};

/// The usage exporter: one central consumer of every host's `usage.recorded`.
#[derive(Debug)]
pub struct Usage;

impl Service for Usage {
    const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::USAGE;
    const ABOUT: &'static str =
        "WNoDeS usage exporter: usage counters on Prometheus from every host's usage.recorded";
    type Config = Config;
    type Handler = UsageHandler;
    type Command = NoCommand;

    /// Creates the totals table in the consumer's store and starts the counters' refresh.
    async fn build(ctx: &ServiceCtx<Config>) -> Result<Parts<UsageHandler>, StartError> {
        let pool = ctx.store.pool().clone();
        sqlx::query(totals::SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| StartError::failed("create the usage totals table", e))?;
        let counters = Counters::register(&mut ctx.registry.lock(), ctx.config.per_user);
        let handled = Arc::new(Notify::new());
        let handler = UsageHandler {
            handled: handled.clone(),
            added: Arc::new(AtomicU64::new(0)),
        };
        tracing::info!(per_user = ctx.config.per_user, "Usage exporter ready.");
        let (every, shutdown) = (ctx.config.refresh, ctx.shutdown.clone());
        Ok(Parts::consumer(handler).task("refresh", async move {
            totals::run_refresh(pool, counters, every, handled, shutdown)
                .await
                .map_err(Into::into)
        }))
    }
}
