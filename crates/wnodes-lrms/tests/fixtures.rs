//! Every event of the real (and constructed) LRMS samples in `tests/data/` (see each
//! directory's ORIGIN.txt) is normalised with the right state, time, job id and usage.
//!
//! The expected number of events per state never comes from the parser under test: for the
//! HTCondor logs it is counted here from the event header lines with a plain prefix test, for
//! the line-per-record formats from the record type field, and for the rest it is written by
//! hand next to the data.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{collections::BTreeMap, path::PathBuf};

use jiff::tz::TimeZone;
use wnodes_lrms::{
    Item, LrmsEvent, LrmsKind, ParseOptions, State,
    replay::{ReplayOptions, replay},
};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn text(rel: &str) -> String {
    std::fs::read_to_string(data(rel)).unwrap()
}

/// US Central time as a POSIX TZ rule (the lsst logs were written there: their ToE lines say
/// so), needing no zoneinfo database.
fn chicago() -> TimeZone {
    TimeZone::posix("CST6CDT,M3.2.0,M11.1.0").unwrap()
}

fn run(
    lrms: LrmsKind,
    rel: &str,
    tz: TimeZone,
    year: Option<i16>,
) -> (Vec<LrmsEvent>, wnodes_lrms::Summary) {
    let opts = ReplayOptions {
        tz,
        year,
        ..ReplayOptions::new(lrms)
    };
    let mut events: Vec<LrmsEvent> = Vec::new();
    let summary = replay(&opts, &[data(rel)], &mut events).unwrap();
    (events, summary)
}

fn by_state(events: &[LrmsEvent]) -> BTreeMap<State, u64> {
    let mut m = BTreeMap::new();
    for e in events {
        *m.entry(e.state).or_default() += 1;
    }
    m
}

fn find<'a>(events: &'a [LrmsEvent], job: &str, state: State) -> &'a LrmsEvent {
    events
        .iter()
        .find(|e| e.job_id == job && e.state == state)
        .unwrap_or_else(|| panic!("no {state} event for {job}"))
}

/// Counts HTCondor event headers of real jobs by a plain prefix test: `NNN (` followed by a
/// digit (a placeholder job `(-01.…)` has a minus there).
fn condor_header_counts(log: &str) -> BTreeMap<State, u64> {
    let mut m = BTreeMap::new();
    for line in log.lines() {
        let b = line.as_bytes();
        if b.len() > 6
            && b[..3].iter().all(u8::is_ascii_digit)
            && &line[3..5] == " ("
            && b[5].is_ascii_digit()
        {
            let state = match &line[..3] {
                "000" => State::Queued,
                "001" => State::Started,
                "004" => State::Evicted,
                "005" => State::Finished,
                "009" => State::Cancelled,
                "012" => State::Held,
                "013" => State::Released,
                _ => continue,
            };
            *m.entry(state).or_default() += 1;
        }
    }
    m
}

fn headers(log: &str) -> u64 {
    log.lines()
        .filter(|l| {
            l.len() > 4 && l.as_bytes()[..3].iter().all(u8::is_ascii_digit) && &l[3..5] == " ("
        })
        .count() as u64
}

#[test]
fn htcondor_lsst_iso_log_every_event() {
    let rel = "htcondor/lsst_tiny_success.dag.nodes.log";
    let log = text(rel);
    let (ev, sum) = run(LrmsKind::Htcondor, rel, chicago(), None);
    assert_eq!(by_state(&ev), condor_header_counts(&log));
    assert_eq!(sum.malformed, 0, "{sum}");
    assert_eq!(sum.read, headers(&log), "every record counted once");
    assert_eq!(sum.skipped, 1, "the 016 POST script event");

    let t = find(&ev, "9210.0", State::Finished);
    assert_eq!(t.time.to_string(), "2025-02-13T16:44:58Z");
    assert_eq!(t.usage.exit_code, Some(0));
    assert_eq!(
        (t.usage.cpu_user_s, t.usage.cpu_sys_s),
        (Some(5.0), Some(0.0))
    );
    assert_eq!(t.usage.cores, Some(1));
    assert_eq!(t.usage.disk_bytes, Some(83 * 1024));
    assert_eq!(t.usage.memory_bytes, Some(0));
    assert_eq!(t.usage.memory_request_bytes, Some(2048 << 20));
    assert_eq!(t.usage.wall_s, Some(11));
    let t = find(&ev, "9211.0", State::Finished);
    assert_eq!(
        (t.usage.cpu_user_s, t.usage.cpu_sys_s),
        (Some(27.0), Some(3.0))
    );
    assert_eq!(t.usage.memory_bytes, Some(949 << 20));
    let s = find(&ev, "9210.0", State::Started);
    assert_eq!(s.usage.host.as_deref(), Some("test02"));
    assert_eq!(s.usage.cores, Some(1));
    assert_eq!(s.run_attempt, 1);
    let c = find(&ev, "9209.0", State::Cancelled);
    assert!(
        c.usage
            .reason
            .as_deref()
            .unwrap()
            .starts_with("removed because")
    );
    let q = find(&ev, "9213.0", State::Queued);
    assert_eq!(q.time.to_string(), "2025-02-13T16:46:27Z");

    // Cross-check of the time zone over the whole file: each 005's header time, read in
    // Chicago time, is within 2 s of its own "terminated … at <UTC>" line.
    let mut checked = 0;
    for block in log.split("\n...\n") {
        let Some(toe) = block.lines().find_map(|l| {
            l.trim()
                .strip_prefix("Job terminated of its own accord at ")
        }) else {
            continue;
        };
        let utc: jiff::Timestamp = toe.split_whitespace().next().unwrap().parse().unwrap();
        let id = block.split_once('(').unwrap().1.split_once(')').unwrap().0;
        let job = format!(
            "{}.0",
            id.split('.').next().unwrap().trim_start_matches('0')
        );
        let e = find(&ev, &job, State::Finished);
        assert!(
            (e.time.as_second() - utc.as_second()).abs() <= 2,
            "{job}: {} vs {utc}",
            e.time
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn htcondor_legacy_log_with_placeholders() {
    let rel = "htcondor/htcondor_test_condor.log";
    let log = text(rel);
    let (ev, sum) = run(LrmsKind::Htcondor, rel, TimeZone::UTC, Some(2004));
    assert_eq!(by_state(&ev), condor_header_counts(&log));
    assert_eq!(sum.malformed, 0, "{sum}");
    assert_eq!(sum.read, headers(&log));
    assert_eq!(sum.emitted + sum.skipped, headers(&log));
    let t = find(&ev, "2758.0", State::Finished);
    assert_eq!(t.time.to_string(), "2004-03-20T21:05:32Z");
    assert_eq!(t.usage.exit_code, Some(0));
    assert_eq!(t.usage.cpu_user_s, Some(6.0));
    assert_eq!(
        find(&ev, "2759.0", State::Started).time.to_string(),
        "2004-03-20T21:06:08Z"
    );
}

#[test]
fn htcondor_job_ad_events_enrich_and_are_not_emitted() {
    let rel = "htcondor/htcondor_python_bindings_test_log.txt";
    let log = text(rel);
    let (ev, sum) = run(LrmsKind::Htcondor, rel, TimeZone::UTC, Some(2013));
    assert_eq!(by_state(&ev), condor_header_counts(&log));
    assert_eq!(ev.len(), 2);
    assert_eq!(sum.skipped, 2, "two 028 events");
    assert_eq!(sum.malformed, 0, "{sum}");
    assert_eq!(ev[0].job_id, "236467.0");
    assert_eq!(ev[0].time.to_string(), "2013-11-15T17:05:55Z");
}

#[test]
fn htcondor_constructed_hold_release_evict_abort() {
    let rel = "htcondor/constructed_hold_release.log";
    let log = text(rel);
    let (ev, sum) = run(LrmsKind::Htcondor, rel, TimeZone::UTC, None);
    assert_eq!(by_state(&ev), condor_header_counts(&log));
    assert_eq!(sum.malformed, 0, "{sum}");
    let states: Vec<State> = ev.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            State::Queued,
            State::Held,
            State::Released,
            State::Started,
            State::Evicted,
            State::Held,
            State::Cancelled
        ]
    );
    let holds: Vec<&LrmsEvent> = ev.iter().filter(|e| e.state == State::Held).collect();
    assert_eq!(
        holds[0].usage.reason.as_deref(),
        Some("via condor_hold (by user alice)")
    );
    assert_eq!(
        (holds[0].usage.hold_code, holds[0].usage.hold_subcode),
        (Some(1), Some(0))
    );
    // Two holds of one run: distinct identities, hence distinct event ids.
    assert_eq!(holds[0].run_attempt, holds[1].run_attempt);
    assert_ne!(holds[0].identity, holds[1].identity);
    let ids: Vec<String> = holds
        .iter()
        .map(|h| wnodes_lrms::convert::event_id(h, "INFN-T1"))
        .collect();
    assert_eq!(ids[0], "job.held:INFN-T1/htcondor/1001.0/1#t1740823205");
    assert_eq!(ids[1], "job.held:INFN-T1/htcondor/1001.0/1#t1740823560");
    let evicted = find(&ev, "1001.0", State::Evicted);
    assert_eq!(
        evicted.usage.reason.as_deref(),
        Some("via condor_hold (by user alice)")
    );
    assert_eq!(evicted.usage.hold_code, Some(1));
    assert_eq!(evicted.time.to_string(), "2025-03-01T10:06:00Z");
}

/// The record type of each line (`DATE;T;ID;…`), counted without the parser.
fn pbs_type_counts(log: &str) -> BTreeMap<State, u64> {
    let mut m = BTreeMap::new();
    for line in log.lines() {
        let state = match line.split(';').nth(1) {
            Some("Q") => State::Queued,
            Some("S") => State::Started,
            Some("E") => State::Finished,
            Some("D" | "A") => State::Cancelled,
            _ => continue,
        };
        *m.entry(state).or_default() += 1;
    }
    m
}

#[test]
fn pbs_openpbs_constructed_records() {
    let rel = "pbs/openpbs_records_CONSTRUCTED.log";
    let (ev, sum) = run(LrmsKind::Pbs, rel, TimeZone::UTC, None);
    assert_eq!(by_state(&ev), pbs_type_counts(&text(rel)));
    assert_eq!(sum.malformed, 0, "{sum}");
    let q = find(&ev, "4242.pbsserver", State::Queued);
    assert_eq!(q.time.to_string(), "2025-03-01T10:00:00Z");
    assert_eq!(q.usage.queue.as_deref(), Some("workq"));
    let s = find(&ev, "4242.pbsserver", State::Started);
    assert_eq!(s.usage.host.as_deref(), Some("wn001"));
    assert_eq!(s.usage.cores, Some(8));
    let e = find(&ev, "4242.pbsserver", State::Finished);
    assert_eq!(e.time.to_string(), "2025-03-01T22:05:10Z");
    assert_eq!(e.usage.exit_code, Some(0));
    assert_eq!(e.usage.cpu_total_s, Some(88.0 * 3600.0 + 48.0 * 60.0));
    assert_eq!(e.usage.wall_s, Some(12 * 3600));
    assert_eq!(e.usage.memory_bytes, Some(15_360_000 * 1024));
    assert_eq!(e.usage.virtual_memory_bytes, Some(18_432_000 * 1024));
    assert_eq!(e.usage.cores, Some(8));
    assert_eq!(e.usage.user.as_deref(), Some("pilatl001"));
    assert_eq!(e.run_attempt, 1);
    let d = find(&ev, "4243.pbsserver", State::Cancelled);
    assert_eq!(
        d.usage.reason.as_deref(),
        Some("requestor=alice@ui01.example.org")
    );
}

#[test]
fn pbs_torque_real_records_in_local_time() {
    let rel = "pbs/torque_accounting_E_records.log";
    // RAL is in the UK: British summer time in October 2011.
    let uk = TimeZone::posix("GMT0BST,M3.5.0/1,M10.5.0").unwrap();
    let (ev, sum) = run(LrmsKind::Pbs, rel, uk, None);
    assert_eq!(by_state(&ev), pbs_type_counts(&text(rel)));
    assert_eq!(sum.malformed, 0, "{sum}");
    // Each record's local time, read in the UK zone, is its own `end=` epoch.
    for line in text(rel).lines() {
        let id = line.split(';').nth(2).unwrap();
        let end: i64 = line
            .split("end=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(find(&ev, id, State::Finished).time.as_second(), end, "{id}");
    }
    let e = find(&ev, "21048463.lcgbatch01.gridpp.rl.ac.uk", State::Finished);
    assert_eq!(
        e.usage.cpu_total_s,
        Some(18.0 * 3600.0 + 15.0 * 60.0 + 24.0)
    );
    assert_eq!(
        e.usage.wall_s,
        Some(19 * 3600 + 23 * 60 + 4),
        "walltime=19:23:4"
    );
    assert_eq!(e.usage.memory_bytes, Some(2_031_040 * 1024));
    assert_eq!(e.usage.host.as_deref(), Some("lcg1277.gridpp.rl.ac.uk"));
    assert_eq!(e.usage.queue.as_deref(), Some("grid4000M"));
}

#[test]
fn lsf_acct_real_job_finish_records() {
    let rel = "lsf/lsb.acct.JOB_FINISH.sample";
    let (ev, sum) = run(LrmsKind::Lsf, rel, TimeZone::UTC, None);
    // Written by hand: three JOB_FINISH records, one of them spans two lines.
    assert_eq!(by_state(&ev), BTreeMap::from([(State::Finished, 3)]));
    assert_eq!(sum.malformed, 0, "{sum}");
    let a = find(&ev, "699195", State::Finished);
    assert_eq!(a.time.as_second(), 1_089_407_406);
    assert_eq!(a.usage.user.as_deref(), Some("raortega"));
    assert_eq!(a.usage.queue.as_deref(), Some("8nm"));
    assert_eq!(
        (a.usage.cpu_user_s, a.usage.cpu_sys_s),
        (Some(277.21), Some(17.28))
    );
    assert_eq!(a.usage.memory_bytes, Some(310_424 * 1024));
    assert_eq!(a.usage.virtual_memory_bytes, Some(339_112 * 1024));
    assert_eq!(a.usage.wall_s, Some(1_089_407_406 - 1_089_406_862));
    assert_eq!(a.usage.exit_code, Some(0));
    assert_eq!(a.usage.host.as_deref(), Some("tbed0079"));
    // Element 23 of the job array `imb_sr[1-90]` (idx field 53 + o).
    let b = find(&ev, "436491[23]", State::Finished);
    assert_eq!(b.usage.cores, Some(16));
    assert_eq!(
        b.usage.exit_code,
        Some(255),
        "jStatus EXIT, exitStatus 65280"
    );
    assert_eq!(b.usage.host.as_deref(), Some("comp042"));
    assert_eq!(b.usage.job_name.as_deref(), Some("imb_sr[1-90]"));
    let c = find(&ev, "31255091", State::Finished);
    assert_eq!(c.usage.job_name.as_deref(), Some("cream_123456789"));
    assert_eq!(
        (c.usage.cpu_user_s, c.usage.cpu_sys_s),
        (Some(15.093705), Some(8.511706))
    );
    assert_eq!(c.usage.memory_bytes, Some(1_495_304 * 1024));
}

#[test]
fn lsf_events_constructed_records() {
    let rel = "lsf/lsb.events.CONSTRUCTED";
    let (ev, sum) = run(LrmsKind::Lsf, rel, TimeZone::UTC, None);
    // Written by hand from the records (see the file's comments).
    assert_eq!(
        by_state(&ev),
        BTreeMap::from([
            (State::Queued, 3),
            (State::Started, 2),
            (State::Finished, 2),
            (State::Cancelled, 1),
            (State::Held, 2),
            (State::Released, 1),
        ])
    );
    assert_eq!((sum.skipped, sum.malformed), (2, 0), "{sum}");
    let q = find(&ev, "4242", State::Queued);
    assert_eq!(q.time.as_second(), 1_740_823_200);
    assert_eq!(q.usage.user.as_deref(), Some("pilatl001"));
    assert_eq!(q.usage.queue.as_deref(), Some("grid"));
    assert_eq!(q.usage.cores, Some(8));
    assert_eq!(q.usage.job_name.as_deref(), Some("cream_123456789"));
    assert_eq!(
        find(&ev, "4243", State::Queued).usage.job_name.as_deref(),
        Some("test \"quoted\" name")
    );
    let s = find(&ev, "4242", State::Started);
    assert_eq!(s.usage.host.as_deref(), Some("wn001.example.org"));
    assert_eq!(s.usage.cores, Some(8));
    let f = find(&ev, "4242", State::Finished);
    assert_eq!(f.time.as_second(), 1_740_866_710);
    assert_eq!(
        (f.usage.cpu_user_s, f.usage.cpu_sys_s),
        (Some(2400.25), Some(150.25))
    );
    assert_eq!(f.usage.exit_code, Some(0));
    let holds: Vec<&LrmsEvent> = ev
        .iter()
        .filter(|e| e.job_id == "4243" && e.state == State::Held)
        .collect();
    assert_ne!(holds[0].identity, holds[1].identity);
    let k = find(&ev, "4243", State::Cancelled);
    assert_eq!(k.usage.reason.as_deref(), Some("KILL by alice"));
    let a = find(&ev, "5000[3]", State::Finished);
    assert_eq!(a.usage.exit_code, Some(1));
    assert_eq!(
        find(&ev, "5000[3]", State::Started).usage.host.as_deref(),
        Some("wn002.example.org")
    );
    assert!(
        ev.iter()
            .any(|e| e.job_id == "5000" && e.state == State::Queued)
    );
}

#[test]
fn slurm_sacct_apel_lines() {
    let rel = "slurm/sacct_P_n_apel_format.txt";
    let log = text(rel);
    let (ev, sum) = run(LrmsKind::Slurm, rel, TimeZone::UTC, None);
    // Count by the State column (the last field), without the parser.
    let mut want = BTreeMap::new();
    for line in log.lines().filter(|l| !l.starts_with('#')) {
        let state = match line.rsplit('|').next().unwrap() {
            "COMPLETED" | "FAILED" | "NODE_FAIL" | "TIMEOUT" => State::Finished,
            "CANCELLED" => State::Cancelled,
            "PREEMPTED" => State::Evicted,
            other => panic!("unexpected state {other}"),
        };
        *want.entry(state).or_insert(0u64) += 1;
    }
    assert_eq!(by_state(&ev), want);
    assert_eq!(sum.malformed, 0, "{sum}");
    let j = find(&ev, "1000", State::Finished);
    assert_eq!(j.time.to_string(), "2013-03-27T17:13:26Z");
    assert_eq!(j.usage.user.as_deref(), Some("dteam005"));
    assert_eq!(j.usage.wall_s, Some(2));
    assert_eq!(j.usage.cpu_total_s, None, "CPUTimeRAW is not CPU used");
    let step = find(&ev, "278952", State::Finished);
    assert_eq!(step.identity.as_deref(), Some("step=batch"));
    assert_eq!(step.usage.wall_s, Some(95_053));
    assert_eq!(step.usage.memory_bytes, Some(459_800_576), "438.50M");
    assert_eq!(step.usage.virtual_memory_bytes, Some(1_567_524 * 1024));
    let t = find(&ev, "5979785", State::Finished);
    assert_eq!(t.usage.cpu_total_s, Some(65.753), "TotalCPU 01:05.753");
    assert_eq!(
        find(&ev, "5940815", State::Finished).usage.cpu_total_s,
        Some(747_636.0)
    );
    assert_eq!(find(&ev, "5940815", State::Finished).usage.cores, Some(8));
}

#[test]
fn slurm_jobcomp_json_and_script_environment() {
    for rel in [
        "slurm/jobcomp_kafka_job_finish_CONSTRUCTED.json",
        "slurm/jobcomp_script_env_CONSTRUCTED.env",
    ] {
        let (ev, sum) = run(LrmsKind::Slurm, rel, TimeZone::UTC, None);
        assert_eq!(sum.malformed, 0, "{rel}: {sum}");
        assert_eq!(ev.len(), 1, "{rel}");
        let e = &ev[0];
        assert_eq!(
            (e.job_id.as_str(), e.state),
            ("4242", State::Finished),
            "{rel}"
        );
        assert_eq!(e.time.to_string(), "2025-03-01T22:05:10Z", "{rel}");
        assert_eq!(
            e.usage.start_time.unwrap().to_string(),
            "2025-03-01T10:05:10Z",
            "{rel}"
        );
        assert_eq!(e.usage.wall_s, Some(43_200), "{rel}");
        assert_eq!(e.usage.cores, Some(8), "{rel}");
        assert_eq!(e.usage.user.as_deref(), Some("pilatl001"), "{rel}");
        assert_eq!(e.usage.queue.as_deref(), Some("grid"), "{rel}");
        assert_eq!(e.usage.exit_code, Some(0), "{rel}");
        assert_eq!(e.usage.host.as_deref(), Some("wn001"), "{rel}");
    }
}

/// WNoDeS's jobcomp hook adds the restart count: each record names its run attempt, and a
/// requeue (jobcomp's `PENDING`) is the eviction of the attempt that ended.
#[test]
fn slurm_jobcomp_hook_records_name_their_run_attempt() {
    let rel = "slurm/jobcomp_wnodes_hook_slurm2205.env";
    let (ev, sum) = run(LrmsKind::Slurm, rel, TimeZone::UTC, None);
    assert_eq!(sum.malformed, 0, "{sum}");
    let got: Vec<(&str, State, u32, Option<i32>)> = ev
        .iter()
        .map(|e| (e.job_id.as_str(), e.state, e.run_attempt, e.usage.exit_code))
        .collect();
    assert_eq!(
        got,
        [
            ("28", State::Finished, 1, Some(3)),
            ("29", State::Evicted, 1, Some(0)),
            ("29", State::Cancelled, 2, Some(0)),
            ("30", State::Finished, 1, Some(0)),
        ]
    );
    assert_eq!(ev[1].usage.queue.as_deref(), Some("wnodes"));
    assert_eq!(ev[1].usage.user.as_deref(), Some("nobody"));
}

#[test]
fn jobcomp_start_record_is_started() {
    let rec = r#"{"jobid":77,"username":"u","@start":"2025-03-01T10:05:10","@submit":"2025-03-01T10:00:00","partition":"grid","nodes":"wn[003-004]","total_cpus":4}"#;
    let items = wnodes_lrms::parse::parse_str(
        LrmsKind::Slurm,
        ParseOptions {
            tz: TimeZone::UTC,
            ..Default::default()
        },
        rec,
    );
    let [Item::Event(e)] = items.as_slice() else {
        panic!("{items:?}")
    };
    assert_eq!(e.state, State::Started);
    assert_eq!(e.time.to_string(), "2025-03-01T10:05:10Z");
    assert_eq!(e.usage.host.as_deref(), Some("wn003"));
}
