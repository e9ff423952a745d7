//! Crash injection for tests (feature `failpoints`): with `WNODES_FAILPOINT=<name>` in the
//! environment the process aborts (as a crash would) when it reaches `<name>`, once: the marker
//! file `WNODES_FAILPOINT_MARKER` is created first and, if it exists, the point is skipped.
//! Points: `before-handler` (a crash during handling: no verdict), `after-commit` (key stored,
//! message not acked), `skip-ack` (the ack is withheld once; no abort).

/// True when failpoint `name` fires now (at most once per marker file).
#[cfg(feature = "failpoints")]
pub(crate) fn fires(name: &str) -> bool {
    if std::env::var("WNODES_FAILPOINT").ok().as_deref() != Some(name) {
        return false;
    }
    match std::env::var_os("WNODES_FAILPOINT_MARKER") {
        Some(marker) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(marker)
            .is_ok(),
        None => true,
    }
}

#[cfg(not(feature = "failpoints"))]
pub(crate) fn fires(_name: &str) -> bool {
    false
}

/// Aborts the process at `name` if it fires.
pub(crate) fn crash_at(name: &str) {
    if fires(name) {
        tracing::error!(failpoint = name, "Failpoint reached: aborting the process.");
        std::process::abort();
    }
}
