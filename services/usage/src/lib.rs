//! WNoDeS usage exporter: an example, for sites, of a consumer of usage events. It keeps usage
//! totals per (VO, VO group, VO role[, user]) and serves them on `/metrics`:
//!
//! | metric | what |
//! |---|---|
//! | `wnodes_usage_jobs_total{vo,group,role[,user]}` | usage records |
//! | `wnodes_usage_cpu_seconds_total{…}` | CPU time (user + system), seconds |
//! | `wnodes_usage_wall_seconds_total{…}` | wall time, seconds |
//! | `wnodes_usage_core_seconds_total{…}` | wall time × cores, seconds |
//!
//! The `user` label is off by default (one series per user can be many series) and on with
//! `[usage] per_user = true`.
//!
//! **Exact under redelivery and restarts.** Each `usage.recorded` adds to its row of
//! `usage_totals` in the consumer's idempotency store, in the transaction its key commits in
//! ([`wnodes_bus::HandlerCtx::tx`]): a redelivered event is skipped by its key, so the totals count
//! each record once, across kills and restarts. The counters are not incremented by the handler
//! (its transaction may still roll back): a task brings them up to the committed totals, at
//! start, after each handled event, and every `[usage] refresh` (default 5 s).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | the `[usage]` section |
//! | [`totals`] | the `usage_totals` table, the handler, the counters and their refresh |
//! | `service` | [`Usage`], the service as the runtime runs it |

pub mod config;
mod service;
pub mod totals;

pub use config::Config;
pub use service::Usage;
