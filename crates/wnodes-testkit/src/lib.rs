//! Test harness for the WNoDeS workspace: real infrastructure, started per test, torn down on drop.
//!
//! | Module | What it gives a test |
//! |---|---|
//! | [`bus`] | A test's own `Bus` on a [`NatsServer`] ([`bus::connect`], [`bus::BusClient`] for TLS, credentials, no streams), events on a subscription ([`bus::subscribe`]), the last event of a type ([`bus::last_event`], [`bus::wait_event`]), the stream's size ([`bus::stored_events`]) a durable consumer's state ([`bus::consumer_state`]) and one message pulled from a durable as some identity ([`bus::pull_one`]). |
//! | [`events`] | Builders for runs ([`events::run`], [`events::RunRefExt`]) and events ([`events::Events`], payload builders), typed payloads ([`events::Payload`]) and [`events::RunEvents`]: the questions a test asks of a run's events (has, count, position, the one `VmStopped`, releases by kind, ...). |
//! | [`error_rule`] | [`error_rule!`]: the test that every variant of a crate's error types keeps its `source()` out of its message (`docs/errors-and-logging.md`). |
//! | [`files`] | [`files::append`]: a record appended to a followed log, as an LRMS writes it. |
//! | [`guest_run`] | The project's code in a TCG guest with an `igb` SR-IOV NIC, `8021q`, `bridge`, `tun` and nftables: [`guest_run::run_in_igb_guest`] runs a script there with the static `wnodes-guest-probe` and returns its stdout, stderr and exit status ([`guest_run::GuestOutput`]), [`guest_run::run_in_igb_guest_ok`] for a script that must succeed; [`guest_run::IgbGuest`] for other files; [`guest_run::IGB_GUEST_NEEDS`]. |
//! | [`host`] | Host tests: [`host::Precondition`]s (root, qemu, `/dev/fuse`, `sftp-server`, the test guest, ...) and a libtest-mimic harness ([`host::main`], [`host_test!`]) that lists a test whose precondition is missing as ignored (nextest: SKIPPED), or with `WNODES_HOST_TESTS=required` fails it naming what is missing. |
//! | [`http`] | A loopback HTTP server with a counted, delayed download, a 404 and a 503 ([`http::serve`]); a plain `GET` of a service's `/readyz` or `/metrics` ([`http::get`]). |
//! | [`nats`] | [`NatsServer`]: a private `nats-server` (JetStream on, own temp store, port chosen by the server itself and read back from its ports file), with [`NatsServer::kill`] / [`NatsServer::restart`] for crash tests; authorization on unless started with [`NatsServer::start_open`]. |
//! | [`site`] | [`site::TestSite`]: the server's site provisioned through `wnodes-site` (as `wnodesctl provision`): the admin's, the monitor's and each (role, host)'s connection settings ([`NatsServer::admin`], [`NatsServer::identity`]), durables made on demand. |
//! | [`nats_auth`] | nats-server config blocks and client credentials for every auth method: user/password ([`user_password_block`]), token ([`token_block`]), NKEY ([`nkey_user`], [`nkey_block`]) and decentralised JWT ([`jwt_auth`]: operator, account with JetStream, user `.creds` file). |
//! | [`pki`] | [`TestPki`]: a throwaway CA with a server certificate (`127.0.0.1`, `localhost`) and a client certificate, as PEM files, plus the matching nats-server `tls { }` block. |
//! | [`otlp`] | [`OtlpCollector`]: an in-process OTLP/gRPC trace collector that records every exported span as a [`CollectedSpan`]; a job's trace id from its output ([`otlp::trace_id_in`]) and the check that its spans are one tree ([`otlp::one_trace`]). |
//! | [`postgres`] | A fresh PostgreSQL database per test on the run's shared cluster ([`postgres::database`], `TESTKIT_POSTGRES_URL`, started by `scripts/test.sh`), and a private [`postgres::Cluster`] a test can stop and resume; [`on_both_stores!`] runs a test on SQLite and on PostgreSQL. |
//! | [`process`] | A service binary as a child process: [`process::ServiceConfig`] (its TOML file), [`process::ServiceProcess::builder`] (config, environment, stderr file), start, wait for a stdout or stderr line, terminate, kill, or run a one-shot command to its end; [`process::bus_node`] for the system tests' `bus-node`. |
//! | [`service`] | `TestBus` (a service's handler on a real consumer, every event recorded and waited for), `Netns` (throwaway network namespaces). |
//! | [`vm`] | What tests that boot VMs share: [`vm::JOB_NEEDS`], [`vm::vm_lock`], [`vm::mem_total_bytes`]. |
//! | [`wait`] | [`wait_until`]: poll a condition until it holds or a timeout passes. |
//!
//! The `nats-server` binary (>= 2.10) is looked up in `$NATS_SERVER_BIN`, then
//! `<workspace>/.tools/bin/nats-server` (installed by `scripts/install-deps.sh nats`), then `PATH`.
//!
//! The types most tests use are re-exported at the crate root.

pub mod bus;
pub mod error_rule;
pub mod events;
pub mod files;
pub mod guest_run;
pub mod host;
pub mod http;
pub mod nats;
pub mod nats_auth;
pub mod otlp;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod service;
pub mod site;
pub mod vm;
pub mod wait;

pub use nats::NatsServer;
pub use nats_auth::{
    JwtAuth, NkeyUser, jwt_auth, nkey_block, nkey_user, token_block, user_password_block,
};
pub use otlp::{CollectedSpan, OtlpCollector};
pub use pki::TestPki;
pub use process::{ServiceConfig, ServiceProcess};
pub use wait::wait_until;
