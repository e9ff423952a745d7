//! The system tests: the bus against a real nats-server with `bus-node` processes
//! (`src/bin/bus-node.rs`, on the real service runtime), and whole jobs on a `wnodes-devstack`
//! stack.
//!
//! Tests live in `tests/`: `bus.rs` (trace across processes, idempotency, dead letters, crash
//! and restart, shutdown), `auth.rs` (TLS and credentials), `config.rs` and `service_config.rs`
//! (fail-fast start-up), `http.rs` (health and metrics), `job_flow.rs`, `job_failures.rs` and
//! `demo_trace.rs` (whole jobs into VMs).
//!
//! The scaffolding is `wnodes-testkit`'s; [`jobs`] holds only the checks over a
//! `wnodes_devstack::Stack`, which cannot live in `wnodes-testkit` because `wnodes-devstack`
//! depends on it.

pub mod jobs;
