//! The process entry every service binary shares: the command line, `--check-config`, the
//! configuration, the Tokio runtime, and the exit code.
//!
//! ```text
//! wnodes-<service> [--config FILE] [serve]          run the service (the default)
//! wnodes-<service> --check-config FILE              check FILE (and WNODES_* variables); 0 or 78
//! wnodes-<service> [--config FILE] <command> ...    the service's own subcommands
//! ```

use std::{path::PathBuf, process::ExitCode};

use clap::{Arg, ArgAction, ArgMatches, FromArgMatches, Subcommand};
use wnodes_bus::ErrorChain;

use crate::{
    config::{self, Config, ConfigError},
    exit,
    service::Service,
    start,
};

fn command<S: Service>() -> clap::Command {
    let cmd = clap::Command::new(format!("wnodes-{}", S::NAME))
        .about(S::ABOUT)
        .version(env!("CARGO_PKG_VERSION"))
        .arg(
            Arg::new("config")
                .short('c')
                .long("config")
                .env("WNODES_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .global(true)
                .help("The configuration file (TOML); WNODES_* variables override it"),
        )
        .arg(
            Arg::new("check-config")
                .long("check-config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .action(ArgAction::Set)
                .help(
                    "Check FILE (with the WNODES_* environment) as this service would load it, \
                     and exit: 0 when valid, 78 naming the bad key",
                ),
        )
        .subcommand(clap::Command::new("serve").about("Run the service (the default)"));
    // The subcommands' derive would set the command's about to the enum's doc: set ours last.
    S::Command::augment_subcommands(cmd).about(S::ABOUT)
}

/// Runs service `S` as a process: call it from `main`.
///
/// ```no_run
/// # struct Image;
/// # impl wnodes_runtime::Service for Image {
/// #     const ROLE: &'static wnodes_runtime::Role = &wnodes_bus::roles::IMAGE;
/// #     const ABOUT: &'static str = "";
/// #     type Config = (); type Handler = wnodes_runtime::NoHandler;
/// #     type Command = wnodes_runtime::NoCommand;
/// #     async fn build(_: &wnodes_runtime::ServiceCtx<()>)
/// #         -> Result<wnodes_runtime::Parts<Self::Handler>, wnodes_runtime::StartError> {
/// #         Ok(wnodes_runtime::Parts::tasks_only()) }
/// # }
/// fn main() -> std::process::ExitCode {
///     wnodes_runtime::main::<Image>()
/// }
/// ```
pub fn main<S: Service>() -> ExitCode {
    let matches = command::<S>().get_matches();
    ExitCode::from(dispatch::<S>(&matches))
}

fn dispatch<S: Service>(matches: &ArgMatches) -> u8 {
    let name = S::NAME;
    if let Some(file) = matches.get_one::<PathBuf>("check-config") {
        return check_config::<S>(file);
    }
    let file = matches.get_one::<PathBuf>("config").cloned();
    let cfg = match load::<S>(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wnodes-{name}: configuration error: {}", ErrorChain(&e));
            return exit::CONFIG;
        }
    };
    let serve = matches!(matches.subcommand_name(), None | Some("serve"));
    let command = if serve {
        None
    } else {
        match S::Command::from_arg_matches(matches) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("wnodes-{name}: {e}");
                return exit::USAGE;
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wnodes-{name}: cannot start the async runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    match command {
        None => rt.block_on(start::serve::<S>(cfg)),
        Some(command) => rt.block_on(run_command::<S>(command, cfg)),
    }
}

fn load<S: Service>(file: Option<&std::path::Path>) -> Result<Config<S::Config>, ConfigError> {
    config::load::<S::Config>(S::NAME, file)
}

/// `--check-config FILE`: the common keys and the service's own section with their types and
/// [`Service::validate`], the other registered sections accepted unread.
fn check_config<S: Service>(file: &std::path::Path) -> u8 {
    let name = S::NAME;
    if !file.is_file() {
        eprintln!(
            "wnodes-{name}: configuration error: {} is not a readable file",
            file.display()
        );
        return exit::CONFIG;
    }
    match load::<S>(Some(file)).and_then(|c| S::validate(&c.service)) {
        Ok(()) => {
            println!(
                "wnodes-{name}: {}: valid (common keys and [{name}])",
                file.display()
            );
            exit::OK
        }
        Err(e) => {
            eprintln!("wnodes-{name}: configuration error: {}", ErrorChain(&e));
            exit::CONFIG
        }
    }
}

async fn run_command<S: Service>(command: S::Command, mut cfg: Config<S::Config>) -> u8 {
    if let Some(level) = S::command_log_level(&command) {
        cfg.common.log_level = level;
    }
    let common = cfg.common.clone();
    start::with_telemetry(S::NAME, &common, S::run_command(command, cfg)).await
}
