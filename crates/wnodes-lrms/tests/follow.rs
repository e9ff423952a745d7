//! A followed file, with real files: growth (including half-written records), rotation by
//! rename and by copy-truncate, and restarts from the stored cursor. The invariant in every
//! test: the events published are exactly the events written, each once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
};
use wnodes_testkit::files::append;

use jiff::tz::TimeZone;
use wnodes_lrms::{
    Cursor, CursorFile, FollowOptions, Follower, Item, LrmsKind, ParseOptions, convert::event_id,
};

fn opts() -> FollowOptions {
    FollowOptions::new(
        LrmsKind::Htcondor,
        ParseOptions {
            tz: TimeZone::UTC,
            year: 2025,
            ..Default::default()
        },
    )
}

/// An execute event of job `n` (each one a distinct event id).
fn execute(n: u32) -> String {
    format!(
        "001 ({n:03}.000.000) 2025-03-01 10:{:02}:{:02} Job executing on host: <10.0.0.1:9618?alias=wn{n}>\n\tSlotName: slot1@wn{n}\n...\n",
        (n / 60) % 60,
        n % 60
    )
}

fn ids(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(event_id(e, "S")),
            _ => None,
        })
        .collect()
}

fn expected(jobs: impl IntoIterator<Item = u32>) -> Vec<String> {
    jobs.into_iter()
        .map(|n| format!("job.start_observed:S/htcondor/{n}.0/1"))
        .collect()
}

/// The bridge's loop in miniature: poll, "publish", then store the cursor.
struct Harness {
    follower: Follower,
    store: CursorFile,
    published: Vec<String>,
}

impl Harness {
    fn start(log: &Path, store: &Path) -> Self {
        let store = CursorFile::new(store);
        let resume = store.load().unwrap();
        Self {
            follower: Follower::open(log, opts(), resume).unwrap(),
            store,
            published: Vec::new(),
        }
    }

    fn poll(&mut self) -> Cursor {
        let b = self.follower.poll().unwrap();
        let malformed: Vec<_> = b
            .items
            .iter()
            .filter(|i| matches!(i, Item::Malformed(_)))
            .collect();
        assert!(malformed.is_empty(), "{malformed:?}");
        self.published.extend(ids(&b.items));
        self.store.save(&b.cursor).unwrap();
        b.cursor
    }
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("events.log");
    let store = d.path().join("cursor.json");
    (d, log, store)
}

#[test]
fn growing_file_with_half_written_records() {
    let (_d, log, store) = dirs();
    let mut h = Harness::start(&log, &store);
    assert!(
        h.follower.poll().unwrap().items.is_empty(),
        "missing file is waited for"
    );
    append(&log, &(execute(1) + &execute(2)));
    h.poll();
    // Half a record, then half a line.
    let third = execute(3);
    let (a, b) = third.split_at(third.find('\t').unwrap() + 3);
    append(&log, a);
    let c = h.poll();
    assert_eq!(
        c.offset,
        (execute(1) + &execute(2)).len() as u64,
        "the cursor stays at the start of the unfinished record"
    );
    assert_eq!(c.line, 6);
    append(&log, b);
    h.poll();
    append(&log, &execute(4));
    let c = h.poll();
    assert_eq!(c.offset, fs::metadata(&log).unwrap().len());
    assert_eq!(h.published, expected(1..=4));
}

#[test]
fn rotation_by_rename() {
    let (d, log, store) = dirs();
    let mut h = Harness::start(&log, &store);
    append(&log, &execute(1));
    h.poll();
    append(&log, &execute(2)); // written before the rotation, not yet read
    fs::rename(&log, d.path().join("events.log.1")).unwrap();
    append(&log, &(execute(3) + &execute(4)));
    let c = h.poll();
    let new_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&log).unwrap());
    assert_eq!(c.ino, new_ino, "the cursor moved to the new file");
    append(&log, &execute(5));
    h.poll();
    assert_eq!(h.published, expected(1..=5));
}

#[test]
fn rotation_by_copy_truncate() {
    let (d, log, store) = dirs();
    let mut h = Harness::start(&log, &store);
    append(&log, &(execute(1) + &execute(2)));
    h.poll();
    append(&log, &execute(3)); // only in the copy once the file is truncated
    fs::copy(&log, d.path().join("events.log.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    append(&log, &execute(4));
    h.poll();
    append(&log, &execute(5));
    h.poll();
    assert_eq!(h.published, expected(1..=5));
}

#[test]
fn truncate_and_regrow_past_the_old_offset_is_noticed() {
    let (_d, log, store) = dirs();
    let mut h = Harness::start(&log, &store);
    append(&log, &execute(1));
    h.poll();
    // Replaced in place by a longer file: the fingerprint differs.
    fs::write(&log, execute(7) + &execute(8) + &execute(9)).unwrap();
    h.poll();
    assert_eq!(h.published, expected([1, 7, 8, 9]));
}

#[test]
fn restart_in_the_middle_reads_nothing_twice() {
    let (_d, log, store) = dirs();
    let mut a = Harness::start(&log, &store);
    append(&log, &(execute(1) + &execute(2)));
    a.poll();
    let third = execute(3);
    let (x, y) = third.split_at(10);
    append(&log, x);
    a.poll();
    let before = a.published.clone();
    drop(a);

    append(&log, &(y.to_owned() + &execute(4)));
    let mut b = Harness::start(&log, &store);
    b.poll();
    let mut all = before;
    all.extend(b.published.clone());
    assert_eq!(all, expected(1..=4), "nothing lost, nothing republished");

    // A third start with nothing new publishes nothing.
    let mut c = Harness::start(&log, &store);
    c.poll();
    assert!(c.published.is_empty(), "{:?}", c.published);
}

#[test]
fn crash_before_the_cursor_is_stored_repeats_the_same_ids() {
    let (_d, log, store) = dirs();
    let mut a = Harness::start(&log, &store);
    append(&log, &execute(1));
    a.poll();
    append(&log, &execute(2));
    // Published but the cursor was not stored (crash between the two).
    let lost = ids(&a.follower.poll().unwrap().items);
    drop(a);
    let mut b = Harness::start(&log, &store);
    b.poll();
    assert_eq!(
        b.published, lost,
        "the same event, the same id: JetStream drops it"
    );
}

#[test]
fn rotated_while_stopped() {
    let (d, log, store) = dirs();
    let mut a = Harness::start(&log, &store);
    append(&log, &execute(1));
    a.poll();
    drop(a);
    append(&log, &execute(2));
    fs::rename(&log, d.path().join("events.log-20250301")).unwrap();
    append(&log, &execute(3));
    let mut b = Harness::start(&log, &store);
    b.poll();
    b.poll();
    assert_eq!(b.published, expected(2..=3));
}

#[test]
fn copy_truncated_while_stopped() {
    let (d, log, store) = dirs();
    let mut a = Harness::start(&log, &store);
    append(&log, &(execute(1) + &execute(2)));
    a.poll();
    drop(a);
    append(&log, &execute(3));
    fs::copy(&log, d.path().join("events.log.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    append(&log, &execute(4));
    let mut b = Harness::start(&log, &store);
    b.poll();
    b.poll();
    assert_eq!(b.published, expected(3..=4));
}

#[test]
fn a_held_back_submit_keeps_the_cursor_until_it_is_emitted() {
    let (_d, log, store) = dirs();
    let mut a = Harness::start(&log, &store);
    append(&log, &execute(1));
    let submit = "000 (002.000.000) 2025-03-01 10:00:00 Job submitted from host: <h>\n...\n";
    append(&log, submit);
    let c = a.poll();
    assert_eq!(
        c.offset,
        execute(1).len() as u64,
        "the submit waits for a 028"
    );
    assert_eq!(a.published, expected([1]));
    // Idle: the follower lets it go.
    let b = a.follower.flush_held();
    a.published.extend(ids(&b.items));
    a.store.save(&b.cursor).unwrap();
    assert_eq!(b.cursor.offset, fs::metadata(&log).unwrap().len());
    assert_eq!(a.published.len(), 2);
    drop(a);
    let mut again = Harness::start(&log, &store);
    again.poll();
    assert!(again.published.is_empty());
}

#[test]
fn start_at_end_skips_history() {
    let (_d, log, _store) = dirs();
    append(&log, &execute(1));
    let mut o = opts();
    o.start_at_end = true;
    let mut f = Follower::open(&log, o, None).unwrap();
    assert!(f.poll().unwrap().items.is_empty());
    append(&log, &execute(2));
    assert_eq!(ids(&f.poll().unwrap().items), expected([2]));
}
