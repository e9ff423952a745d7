//! LRMS records into job events.
//!
//! Sites run HTCondor, Slurm, PBS/Torque/OpenPBS or LSF; WNoDeS reads what they write (job event
//! logs, accounting records, jobcomp output) and turns every state change into one normalised
//! [`LrmsEvent`]: `lrms`, `job_id`, [`State`] (`queued`, `started`, `evicted`, `finished`,
//! `cancelled`, `held`, `released`), `time` in UTC, and the [`Usage`] the record carries. From
//! there [`convert`] builds the `wnodes.v1` events with deterministic ids.
//!
//! Module map:
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | `wnodes-bridge replay` arguments ([`cli::ReplayArgs`]) and its `--dry-run` path |
//! | [`event`] | the normalised event, the state mapping, usage fields, JSON form |
//! | [`parse`] | the streaming [`Parser`] interface, [`Item`]s, [`ParseOptions`], [`parser_for`] |
//! | [`htcondor`] | HTCondor job event log, text (ISO and legacy dates) and JSON |
//! | [`pbs`] | PBS/Torque/OpenPBS accounting logs |
//! | [`lsf`] | LSF `lsb.events` and `lsb.acct` |
//! | [`slurm`] | Slurm jobcomp (kafka/elasticsearch JSON, script environment) and `sacct -P` |
//! | [`slurm_cli`] | what Slurm's clients print: `scontrol pidinfo`, `squeue -O` with `\|` after each field |
//! | [`htcondor_cli`] | what HTCondor's clients print about a running job: the starter's slot, `condor_status -json`, `condor_q -json` |
//! | [`pbs_cli`] | what `qstat -f` prints about a job: OpenPBS JSON (`-F json`) and the one-line text form (`-1`) |
//! | [`lsf_cli`] | a process's LSF job from its cgroup, `bjobs -o ... -json`, the starts in `bhist -l` |
//! | [`time`] | local times in a zone (`$TZ` semantics, via jiff), durations |
//! | [`convert`] | normalised events → `wnodes.v1.Event` with deterministic ids |
//! | [`follow`] | [`Follower`]: a file followed as it grows and across rotation, with a resume [`Cursor`] |
//! | [`mod@replay`] | whole files to a sink: [`replay()`], the `--dry-run` JSON lines, the [`Summary`] |
//! | [`publish`] | [`Publisher`]: normalised events published through `wnodes_bus::Bus` (`publish_pipelined`); the publishing replay [`replay_to_bus`]; [`follow_to_bus`], the follow → publish → store-the-cursor loop |
//! | `fuzzing` | the checks each fuzz target (`fuzz/`, cargo fuzz) and the corpus regression test run |
//!
//! Parsers never panic on input and never stall: a malformed line or record becomes an
//! [`Item::Malformed`] with its line number, and parsing goes on at the next record. Each
//! parser bounds what it buffers ([`parse::MAX_RECORD_BYTES`]) and the per-job state it keeps.

pub mod cli;
pub mod convert;
#[cfg(test)]
mod error_rule;
pub mod event;
pub mod follow;
#[doc(hidden)]
pub mod fuzzing;
pub mod htcondor;
pub mod htcondor_cli;
pub mod lsf;
pub mod lsf_cli;
pub mod parse;
pub mod pbs;
pub mod pbs_cli;
pub mod publish;
pub mod replay;
pub mod slurm;
pub mod slurm_cli;
pub mod time;

pub use event::{ImageHints, LrmsEvent, LrmsKind, State, Usage};

pub use follow::{Batch, Cursor, CursorFile, FollowOptions, Follower};
pub use parse::{Item, Malformed, ParseOptions, Parser, parser_for};
pub use publish::{FollowLoopOptions, Publisher, follow_to_bus, replay_to_bus};
pub use replay::{JsonLines, ReplayOptions, Sink, Summary, replay};
