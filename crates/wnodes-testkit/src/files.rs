//! Files: [`append`] to a log the code under test follows, as an LRMS writes it; the committed
//! fuzz inputs a replay test reads ([`fuzz_inputs`]).

use std::{io::Write, path::Path};

/// Appends `text` to `path` (created if missing) and syncs it, as an LRMS appends a record.
///
/// # Panics
/// When the file cannot be opened, written or synced: the test fails.
#[allow(clippy::expect_used)] // a test helper: failing is its job
pub fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("opening the log to append to");
    f.write_all(text.as_bytes()).expect("appending to the log");
    f.sync_all().expect("syncing the log");
}

/// The files in `<crate>/fuzz/<dir>/<target>/` (`dir`: `seeds`, `corpus` or `artifacts`), as a
/// crate's fuzz-corpus replay test reads them; none when the directory is missing.
///
/// # Panics
/// When a directory entry cannot be read: the test fails.
#[allow(clippy::expect_used)] // a test helper: failing is its job
pub fn fuzz_inputs(crate_dir: &Path, dir: &str, target: &str) -> Vec<std::path::PathBuf> {
    let d = crate_dir.join("fuzz").join(dir).join(target);
    match std::fs::read_dir(&d) {
        Ok(entries) => entries
            .map(|e| e.expect("reading a fuzz input's directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    }
}
