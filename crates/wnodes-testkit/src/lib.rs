//! Test harness for the WNoDeS workspace: real infrastructure, started per test, torn down on drop.
//!
//! | Module | What it gives a test |
//! |---|---|
//! | [`error_rule`] | [`error_rule!`]: the test that every variant of a crate's error types keeps its `source()` out of its message (`docs/errors-and-logging.md`). |
//! | [`host`] | Host tests: [`host::Precondition`]s (root, qemu, `/dev/fuse`, `sftp-server`, the test guest, ...) and a libtest-mimic harness ([`host::main`], [`host_test!`]) that lists a test whose precondition is missing as ignored (nextest: SKIPPED), or with `WNODES_HOST_TESTS=required` fails it naming what is missing. |
//! | [`nats`] | [`NatsServer`]: a private `nats-server` (JetStream on, own temp store, port chosen by the server itself and read back from its ports file), with [`NatsServer::kill`] / [`NatsServer::restart`] for crash tests. |
//! | [`nats_auth`] | nats-server config blocks and client credentials for every auth method: user/password ([`user_password_block`]), token ([`token_block`]), NKEY ([`nkey_user`], [`nkey_block`]) and decentralised JWT ([`jwt_auth`]: operator, account with JetStream, user `.creds` file). |
//! | [`pki`] | [`TestPki`]: a throwaway CA with a server certificate (`127.0.0.1`, `localhost`) and a client certificate, as PEM files, plus the matching nats-server `tls { }` block. |
//! | [`otlp`] | [`OtlpCollector`]: an in-process OTLP/gRPC trace collector that records every exported span as a [`CollectedSpan`]. |
//! | [`service`] | `TestBus` (a service's handler on a real consumer, every event recorded), event builders, `Netns` (throwaway network namespaces). |
//! | [`wait`] | [`wait_until`]: poll a condition until it holds or a timeout passes. |
//!
//! The `nats-server` binary (>= 2.10) is looked up in `$NATS_SERVER_BIN`, then
//! `<workspace>/.tools/bin/nats-server` (installed by `scripts/install-deps.sh nats`), then `PATH`.
//!
//! Everything is re-exported at the crate root.

pub mod error_rule;
pub mod host;
pub mod nats;
pub mod nats_auth;
pub mod otlp;
pub mod pki;
pub mod service;
pub mod wait;

pub use nats::NatsServer;
pub use nats_auth::{
    JwtAuth, NkeyUser, jwt_auth, nkey_block, nkey_user, token_block, user_password_block,
};
pub use otlp::{CollectedSpan, OtlpCollector};
pub use pki::TestPki;
pub use wait::wait_until;
