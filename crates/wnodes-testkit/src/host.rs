//! Host tests: tests that need more of the machine than a `nats-server` (root, qemu,
//! `/dev/fuse`, `sftp-server`, the test guest, ...), run by a [`libtest_mimic`] harness so that a
//! missing precondition is never counted as a pass.
//!
//! A test file whose `[[test]]` entry says `harness = false` lists its tests in `main`:
//!
//! ```ignore
//! use wnodes_testkit::host_test;
//!
//! fn main() -> std::process::ExitCode {
//!     wnodes_testkit::host::main(vec![
//!         host_test!(multi_thread served_as_the_job_user needs [Root, SftpServer, Setpriv]),
//!         host_test!(current_thread user_mode_needs_nothing needs []),
//!     ])
//! }
//! ```
//!
//! A `#[test]` or `#[tokio::test]` in such a file would compile to nothing and never run:
//! `tests/host_harness_files.rs` fails on one. Each test keeps its function name as its test
//! name (so `.config/nextest.toml`'s `vm_*` group still applies). When a [`Precondition`] is missing, the test is listed as *ignored*, which
//! nextest reports as SKIPPED — unless `WNODES_HOST_TESTS=required` (set by `scripts/test.sh`):
//! then it is listed as an ordinary test, runs, and fails with a message naming what is missing.
//! A test that is run checks its preconditions first in either mode (so `--run-ignored` cannot
//! turn a missing precondition into a pass either). A panic in the body is that test's failure.
//!
//! With `HOST_TESTS_LOG=FILE`, every host test (one with at least one precondition) that
//! is run appends `<passed|failed> <test binary> <test name>` to `FILE`, or `missing ...` when it
//! failed on a missing precondition without running; `scripts/test.sh` counts those lines.

#![allow(clippy::expect_used)] // a runtime that cannot be built is the test's failure

use std::{
    fmt,
    future::Future,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use libtest_mimic::{Arguments, Failed, Trial};

/// The environment variable that decides what a missing precondition means.
pub const MODE_VAR: &str = "WNODES_HOST_TESTS";
/// The environment variable naming the file every host test that ran is appended to. Not
/// `WNODES_`-prefixed: the services read every `WNODES_*` variable as configuration, and the
/// system tests' services inherit the test's environment.
pub const LOG_VAR: &str = "HOST_TESTS_LOG";

/// Where the launcher looks for cgroups.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The `sftp-server` the gateway runs by default.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// The `setpriv` the gateway runs `sftp-server` through by default.
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// Something of the host a test needs.
#[derive(Debug, Clone, Copy)]
pub enum Precondition {
    /// Effective uid 0: network namespaces, taps, nftables, cgroups, `setpriv` to the job's uid.
    Root,
    /// `qemu-system-x86_64` on `PATH`.
    Qemu,
    /// `/dev/fuse` (sshfs mounts).
    DevFuse,
    /// [`SFTP_SERVER`].
    SftpServer,
    /// `sshfs` on `PATH`.
    Sshfs,
    /// [`SETPRIV`].
    Setpriv,
    /// `nft` on `PATH` (the network service's filter).
    Nft,
    /// `python3` on `PATH` (a probe client).
    Python3,
    /// `socat` on `PATH` (a stand-in for the gateway's listener).
    Socat,
    /// A cgroup hierarchy this process can create groups in, as the launcher uses it: a
    /// writable cgroup2 mount at [`CGROUP_ROOT`], or writable v1 `cpuacct` and `memory`.
    Cgroups,
    /// The test guest built by `guest/build.sh`, readable, in [`guest_dir`].
    TestGuest,
    /// Loop devices (`/dev/loop-control`) and `losetup` on `PATH`.
    LoopDevices,
    /// Something only one test file needs: its name, and a check that returns what is missing.
    Other(&'static str, fn() -> Result<(), String>),
}

impl Precondition {
    /// `Ok` when the host has it; otherwise what is missing, and how to get it.
    ///
    /// # Errors
    /// A sentence naming the missing precondition.
    pub fn check(self) -> Result<(), String> {
        match self {
            Self::Root => {
                let uid = nix::unistd::geteuid();
                if uid.is_root() {
                    Ok(())
                } else {
                    Err(format!("root (running as uid {uid})"))
                }
            }
            Self::Qemu => on_path("qemu-system-x86_64", "scripts/install-deps.sh vm"),
            Self::DevFuse => {
                if Path::new("/dev/fuse").exists() {
                    Ok(())
                } else {
                    Err("/dev/fuse (not present)".into())
                }
            }
            Self::SftpServer => executable(Path::new(SFTP_SERVER), "scripts/install-deps.sh vm"),
            Self::Sshfs => on_path("sshfs", "scripts/install-deps.sh vm"),
            Self::Setpriv => executable(Path::new(SETPRIV), "util-linux"),
            Self::Nft => on_path("nft", "scripts/install-deps.sh vm"),
            Self::Python3 => on_path("python3", "apt-get install python3"),
            Self::Socat => on_path("socat", "scripts/install-deps.sh vm"),
            Self::Cgroups => cgroups(Path::new(CGROUP_ROOT)),
            Self::TestGuest => {
                let dir = guest_dir();
                let unreadable: Vec<&str> = GUEST_FILES
                    .iter()
                    .copied()
                    .filter(|f| std::fs::File::open(dir.join(f)).is_err())
                    .collect();
                if unreadable.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "the test guest ({} missing or unreadable in {}; run guest/build.sh)",
                        unreadable.join(", "),
                        dir.display()
                    ))
                }
            }
            Self::LoopDevices => {
                if Path::new("/dev/loop-control").exists() {
                    on_path("losetup", "util-linux")
                } else {
                    Err("loop devices (/dev/loop-control is missing)".into())
                }
            }
            Self::Other(_, check) => check(),
        }
    }
}

impl fmt::Display for Precondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Root => "root",
            Self::Qemu => "qemu-system-x86_64",
            Self::DevFuse => "/dev/fuse",
            Self::SftpServer => SFTP_SERVER,
            Self::Sshfs => "sshfs",
            Self::Setpriv => SETPRIV,
            Self::Nft => "nft",
            Self::Python3 => "python3",
            Self::Socat => "socat",
            Self::Cgroups => "writable cgroups",
            Self::TestGuest => "the test guest",
            Self::LoopDevices => "loop devices",
            Self::Other(name, _) => name,
        })
    }
}

/// The files of the test guest every host test boots from.
const GUEST_FILES: [&str; 4] = ["vmlinux", "initrd.img", "rootfs.ext4", "manifest.json"];

/// Where `guest/build.sh` leaves the test guest: `<workspace>/.cache/guest`.
pub fn guest_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    workspace
        .canonicalize()
        .unwrap_or(workspace)
        .join(".cache/guest")
}

fn executable(path: &Path, from: &str) -> Result<(), String> {
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| format!("{} ({e}; install it: {from})", path.display()))
}

pub(crate) fn on_path(program: &str, from: &str) -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| executable(&d.join(program), from).is_ok()) {
        Ok(())
    } else {
        Err(format!("{program} (not found on PATH; install it: {from})"))
    }
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

fn cgroups(root: &Path) -> Result<(), String> {
    let cgroup2 = nix::sys::statfs::statfs(root)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    let usable = if cgroup2 {
        writable(root)
    } else {
        [
            ("cpuacct", "cpuacct.usage"),
            ("memory", "memory.max_usage_in_bytes"),
        ]
        .iter()
        .all(|(dir, marker)| root.join(dir).join(marker).is_file() && writable(&root.join(dir)))
    };
    if usable {
        Ok(())
    } else {
        Err(format!(
            "writable cgroups (neither a writable cgroup2 mount at {0} nor writable v1 \
             {0}/cpuacct and {0}/memory)",
            root.display()
        ))
    }
}

/// What is missing of `needs`, one sentence each.
pub fn missing(needs: &[Precondition]) -> Vec<String> {
    needs.iter().filter_map(|p| p.check().err()).collect()
}

/// What a missing precondition means (`WNODES_HOST_TESTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unset or `skip`: the test is listed as ignored (nextest: SKIPPED).
    Skip,
    /// `required`: the test runs and fails, naming what is missing.
    Required,
}

impl Mode {
    /// Reads [`MODE_VAR`].
    ///
    /// # Errors
    /// A value other than `skip` or `required` (a typo must not silently skip).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(MODE_VAR) {
            Err(std::env::VarError::NotPresent) => Ok(Self::Skip),
            Ok(v) => Self::parse(&v),
            Err(e) => Err(format!("{MODE_VAR}: {e}")),
        }
    }

    /// `""` or `skip`: [`Mode::Skip`]; `required`: [`Mode::Required`].
    ///
    /// # Errors
    /// Any other value, named.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "" | "skip" => Ok(Self::Skip),
            "required" => Ok(Self::Required),
            v => Err(format!(
                "{MODE_VAR}={v:?}: expected \"required\" or \"skip\" (or unset)"
            )),
        }
    }
}

type Body = Box<dyn FnOnce() + Send + 'static>;

/// One test of a host-test harness: a name, what it needs of the host, its body.
pub struct HostTest {
    name: &'static str,
    needs: &'static [Precondition],
    body: Body,
}

impl fmt::Debug for HostTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTest")
            .field("name", &self.name)
            .field("needs", &self.needs)
            .finish_non_exhaustive()
    }
}

impl HostTest {
    /// A synchronous test (like a plain `#[test]`).
    pub fn sync(name: &'static str, needs: &'static [Precondition], body: fn()) -> Self {
        Self {
            name,
            needs,
            body: Box::new(body),
        }
    }

    /// An async test on a multi-thread tokio runtime (`#[tokio::test(flavor = "multi_thread")]`).
    pub fn multi_thread<F>(
        name: &'static str,
        needs: &'static [Precondition],
        body: fn() -> F,
    ) -> Self
    where
        F: Future<Output = ()> + 'static,
    {
        Self::sync_boxed(name, needs, move || {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(body());
        })
    }

    /// An async test on a current-thread tokio runtime (`#[tokio::test]`).
    pub fn current_thread<F>(
        name: &'static str,
        needs: &'static [Precondition],
        body: fn() -> F,
    ) -> Self
    where
        F: Future<Output = ()> + 'static,
    {
        Self::sync_boxed(name, needs, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(body());
        })
    }

    fn sync_boxed(
        name: &'static str,
        needs: &'static [Precondition],
        body: impl FnOnce() + Send + 'static,
    ) -> Self {
        Self {
            name,
            needs,
            body: Box::new(body),
        }
    }

    /// The test's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The libtest-mimic trial: ignored when something is missing and `mode` is
    /// [`Mode::Skip`]; when run, fails first on whatever is missing.
    pub fn trial(self, mode: Mode) -> Trial {
        self.trial_checked(mode, missing, log)
    }

    fn trial_checked(
        self,
        mode: Mode,
        check: fn(&[Precondition]) -> Vec<String>,
        log: fn(Logged, &str),
    ) -> Trial {
        let Self { name, needs, body } = self;
        let ignored = mode == Mode::Skip && !check(needs).is_empty();
        Trial::test(name, move || {
            let gone = check(needs);
            if !gone.is_empty() {
                log(Logged::Missing, name);
                return Err(Failed::from(missing_message(&gone)));
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            if !needs.is_empty() {
                log(
                    if outcome.is_ok() {
                        Logged::Passed
                    } else {
                        Logged::Failed
                    },
                    name,
                );
            }
            outcome.map_err(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(a panic without a message)");
                Failed::from(format!("test panicked: {msg}"))
            })
        })
        .with_ignored_flag(ignored)
    }
}

/// The failure of a test run without what it needs.
fn missing_message(missing: &[String]) -> String {
    format!(
        "missing host precondition: {} (without {MODE_VAR}=required this test is skipped)",
        missing.join("; ")
    )
}

/// What [`log`] records of a host test.
#[derive(Debug, Clone, Copy)]
enum Logged {
    /// It ran and passed.
    Passed,
    /// It ran and failed.
    Failed,
    /// It did not run: a precondition is missing (and it was run anyway: required mode or
    /// `--include-ignored`).
    Missing,
}

/// Appends `<passed|failed|missing> <binary> <name>` to [`LOG_VAR`]'s file, if set. A log that
/// cannot be written is reported, not fatal: the test's own outcome stands.
fn log(what: Logged, name: &str) {
    let Some(file) = std::env::var_os(LOG_VAR) else {
        return;
    };
    let binary = std::env::args()
        .next()
        .map(|a| {
            Path::new(&a)
                .file_name()
                .map_or(a.clone(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let what = match what {
        Logged::Passed => "passed",
        Logged::Failed => "failed",
        Logged::Missing => "missing",
    };
    let line = format!("{what} {binary} {name}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("{LOG_VAR}={}: {e}", Path::new(&file).display());
    }
}

/// The harness's `main`: parses libtest's arguments (as nextest passes them), reads
/// [`MODE_VAR`], runs `tests`.
pub fn main(tests: Vec<HostTest>) -> ExitCode {
    let args = Arguments::from_args();
    let mode = match Mode::from_env() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let trials = tests.into_iter().map(|t| t.trial(mode)).collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// `host_test!(multi_thread name needs [Root, Qemu])`: a [`HostTest`] named after the function
/// `name`, with the flavour `sync`, `multi_thread` or `current_thread`. The preconditions are
/// [`Precondition`] variants in brackets, or the path of a `&'static [Precondition]` constant
/// (`needs jobs::NEEDS`).
#[macro_export]
macro_rules! host_test {
    ($flavor:ident $name:ident needs [$($p:ident),* $(,)?]) => {
        $crate::host::HostTest::$flavor(
            stringify!($name),
            &[$($crate::host::Precondition::$p),*],
            $name,
        )
    };
    ($flavor:ident $name:ident needs $needs:path) => {
        $crate::host::HostTest::$flavor(stringify!($name), $needs, $name)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nothing_missing(_: &[Precondition]) -> Vec<String> {
        Vec::new()
    }

    fn all_missing(needs: &[Precondition]) -> Vec<String> {
        needs.iter().map(|p| format!("{p} (test)")).collect()
    }

    fn passes() {}

    fn panics() {
        panic!("the body failed");
    }

    /// Runs one trial the way nextest runs a listed test: `<name> --exact`.
    fn run(
        body: fn(),
        needs: &'static [Precondition],
        mode: Mode,
        check: fn(&[Precondition]) -> Vec<String>,
    ) -> libtest_mimic::Conclusion {
        let trial = HostTest::sync("t", needs, body).trial_checked(mode, check, |_, _| {});
        let args = Arguments {
            filter: Some("t".into()),
            exact: true,
            test_threads: Some(1),
            ..Arguments::default()
        };
        libtest_mimic::run(&args, vec![trial])
    }

    #[test]
    fn a_missing_precondition_is_skipped_or_fails_but_never_passes() {
        let needs = &[Precondition::Root, Precondition::Qemu];
        let skipped = run(passes, needs, Mode::Skip, all_missing);
        assert_eq!((skipped.num_ignored, skipped.num_passed), (1, 0));
        let required = run(passes, needs, Mode::Required, all_missing);
        assert_eq!((required.num_failed, required.num_passed), (1, 0));
    }

    #[test]
    fn a_present_precondition_runs_the_body_and_a_panic_fails_it() {
        let needs = &[Precondition::Root];
        for mode in [Mode::Skip, Mode::Required] {
            let ok = run(passes, needs, mode, nothing_missing);
            assert_eq!((ok.num_passed, ok.num_ignored), (1, 0), "{mode:?}");
            let failed = run(panics, needs, mode, nothing_missing);
            assert_eq!((failed.num_failed, failed.num_passed), (1, 0), "{mode:?}");
        }
    }

    #[test]
    fn a_listed_trial_is_ignored_only_in_skip_mode() {
        let ignored = |mode, check| {
            HostTest::sync("t", &[Precondition::Qemu], passes)
                .trial_checked(mode, check, |_, _| {})
                .has_ignored_flag()
        };
        assert!(ignored(Mode::Skip, all_missing));
        assert!(!ignored(Mode::Required, all_missing));
        assert!(!ignored(Mode::Skip, nothing_missing));
    }

    #[test]
    fn the_failure_names_what_is_missing() {
        let msg = missing_message(&all_missing(&[Precondition::Root, Precondition::DevFuse]));
        assert!(msg.contains("root (test); /dev/fuse (test)"), "{msg}");
        assert!(msg.contains("WNODES_HOST_TESTS=required"), "{msg}");
    }

    #[test]
    fn the_mode_is_skip_or_required_and_nothing_else() {
        assert_eq!(Mode::parse(""), Ok(Mode::Skip));
        assert_eq!(Mode::parse("skip"), Ok(Mode::Skip));
        assert_eq!(Mode::parse("required"), Ok(Mode::Required));
        let e = Mode::parse("requried").unwrap_err();
        assert!(e.contains("\"requried\""), "{e}");
    }

    #[test]
    fn a_missing_program_is_named() {
        let e = on_path("wnodes-no-such-program", "nowhere").unwrap_err();
        assert!(e.starts_with("wnodes-no-such-program (not found"), "{e}");
        assert!(on_path("sh", "coreutils").is_ok());
    }

    #[test]
    fn root_is_the_effective_uid_and_named_with_it() {
        match Precondition::Root.check() {
            Ok(()) => assert!(nix::unistd::geteuid().is_root()),
            Err(e) => assert_eq!(
                e,
                format!("root (running as uid {})", nix::unistd::geteuid())
            ),
        }
    }
}
