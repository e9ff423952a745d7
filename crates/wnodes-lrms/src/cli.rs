//! The arguments and the `--dry-run` path of `wnodes-bridge replay`, so that the bridge's CLI
//! only adds a subcommand (`Replay(wnodes_lrms::cli::ReplayArgs)`) and dispatches:
//! [`dry_run`] prints one JSON object per event and returns the [`Summary`] (print it on
//! stderr); without `--dry-run`, [`crate::publish::replay_to_bus`] with
//! [`ReplayArgs::options`], `window` and `batch` publishes through the bus.

use std::{io::Write, path::PathBuf};

use jiff::tz::TimeZone;

use crate::{
    event::LrmsKind,
    parse::DEFAULT_IMAGE_ATTRIBUTE,
    replay::{JsonLines, ReplayError, ReplayOptions, Summary, replay},
};

/// `replay --lrms <htcondor|slurm|pbs|lsf> [--dry-run] [--year Y] FILE…`
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Which batch system wrote the files: htcondor, slurm, pbs or lsf.
    #[arg(long)]
    pub lrms: LrmsKind,
    /// Publish nothing: print one JSON object per normalised event on stdout.
    #[arg(long)]
    pub dry_run: bool,
    /// Year of legacy HTCondor dates (MM/DD); default: each file's modification year.
    #[arg(long)]
    pub year: Option<i16>,
    /// HTCondor job attribute holding the image hint.
    #[arg(long, default_value = DEFAULT_IMAGE_ATTRIBUTE)]
    pub image_attribute: String,
    /// Publish acknowledgements in flight.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Events per publish call.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Files, read whole and in order. Local times are read in `$TZ`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

impl ReplayArgs {
    /// The replay options: `$TZ` for local times.
    pub fn options(&self) -> ReplayOptions {
        ReplayOptions {
            lrms: self.lrms,
            tz: TimeZone::system(),
            year: self.year,
            image_attribute: self.image_attribute.clone(),
            image_hints: Default::default(),
        }
    }
}

/// The `--dry-run` replay of `args.files` with `opts` (from [`ReplayArgs::options`], plus the
/// site's image hints): JSON lines on `out`; the caller prints the summary on stderr.
pub fn dry_run(
    args: &ReplayArgs,
    opts: &ReplayOptions,
    out: impl Write,
) -> Result<Summary, ReplayError> {
    let mut sink = JsonLines(out);
    let summary = replay(opts, &args.files, &mut sink)?;
    sink.0
        .flush()
        .map_err(|source| ReplayError::Write { source })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Cmd {
        Replay(ReplayArgs),
    }

    #[test]
    fn arguments_parse_as_the_issue_writes_them() {
        let Cmd::Replay(a) = Cli::try_parse_from([
            "wnodes-bridge",
            "replay",
            "--lrms",
            "pbs",
            "--dry-run",
            "--year",
            "2011",
            "a",
            "b",
        ])
        .unwrap()
        .cmd;
        assert_eq!(a.lrms, LrmsKind::Pbs);
        assert!(a.dry_run);
        assert_eq!(a.year, Some(2011));
        assert_eq!(a.files, [PathBuf::from("a"), PathBuf::from("b")]);
        assert!(Cli::try_parse_from(["x", "replay", "--lrms", "sge", "f"]).is_err());
        assert!(
            Cli::try_parse_from(["x", "replay", "--lrms", "lsf"]).is_err(),
            "no files"
        );
    }
}
