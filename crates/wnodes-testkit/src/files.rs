//! Files as an LRMS writes them: [`append`] to a log the code under test follows.

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
