//! A site's NATS set-up as the operator provisions it (`wnodesctl provision`); the test
//! harness, `wnodes-dev` and the benchmarks provision through the same code.
//!
//! | module | what it holds |
//! |---|---|
//! | [`description`] | the site description (TOML): hosts, stream and consumer settings |
//! | [`identity`] | one identity per role and host, and its NATS permissions |
//! | [`jwt`] | NATS JWTs and `.creds` files, signed with nkeys |
//! | [`auth`] | the keys, nats-server's authorization file and every identity's creds |
//! | [`streams`] | the streams and durable consumers on the server |
//! | [`backlog`] | how far behind each durable is (oldest unprocessed message's age, retention loss) |
//! | [`report`] | what a run did or would do |
//! | [`error`] | [`SiteError`] |
//!
//! Services never create streams or consumers: they check them ([`wnodes_bus::layout`]) and
//! are not ready while they differ.

pub mod auth;
pub mod backlog;
pub mod description;
pub mod error;
#[cfg(test)]
mod error_rule;
pub mod identity;
pub mod jwt;
pub mod report;
pub mod streams;

pub use auth::{AuthDir, Mode};
pub use description::SiteDescription;
pub use error::SiteError;
pub use identity::{Identity, Permissions, Responses};
pub use report::{Action, Change, Report};
