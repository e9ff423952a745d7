//! Malformed input: counted, reported with file and line, skipped; the good records around it
//! still come out, and nothing panics or stalls (binary noise, huge records, unterminated
//! strings).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::{io::Write, path::PathBuf};

use jiff::tz::TimeZone;
use wnodes_lrms::{
    JsonLines, LrmsEvent, LrmsKind, State,
    replay::{ReplayOptions, replay},
};

fn file(dir: &tempfile::TempDir, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().write_all(body).unwrap();
    p
}

fn opts(lrms: LrmsKind) -> ReplayOptions {
    ReplayOptions {
        tz: TimeZone::UTC,
        year: Some(2025),
        ..ReplayOptions::new(lrms)
    }
}

#[test]
fn each_lrms_reports_bad_records_by_line_and_keeps_the_good_ones() {
    let d = tempfile::tempdir().unwrap();
    // (LRMS, file name, content, malformed lines, good events)
    type Case<'a> = (LrmsKind, &'a str, &'a [u8], &'a [u64], usize);
    let cases: [Case; 4] = [
        (
            LrmsKind::Htcondor,
            "condor.log",
            b"000 (1.0.0) 2025-03-01 10:00:00 Job submitted from host: <h>\n...\n\
              001 (x.0.0) 2025-03-01 10:00:00 Job executing\n...\n\
              hello\n\
              005 (1.0.0) 2025-03-01 10:09:00 Job terminated.\n\t(1) Normal termination (return value 2)\n...\n",
            &[3, 5],
            2,
        ),
        (
            LrmsKind::Pbs,
            "pbs.log",
            b"03/01/2025 10:00:00;Q;1.srv;queue=a\n\
              03/01/2025 25:00:00;S;1.srv;user=u\n\
              no semicolons here\n\
              03/01/2025 10:00:00;E;1.srv;resources_used.cput=ab:cd Exit_status=0\n\
              03/01/2025 10:00:00;E;1.srv;account=\"open quote\n\
              03/01/2025 11:00:00;E;1.srv;Exit_status=3\n",
            &[2, 3, 4, 5],
            2,
        ),
        (
            LrmsKind::Lsf,
            "lsb.events",
            b"\"JOB_SIGNAL\" \"10.1\" 1740823450 4243 1 0 \"KILL\" 0 \"a\"\n\
              \"JOB_START\" \"10.1\" notatime 4243\n\
              JOB_NEW 1 2 3\n\
              \"JOB_STATUS\" \"10.1\" 1740823450 4243 64 0 0 0 0 0 0 0 0\n\
              \"JOB_NEW\" \"10.1\" 1740823450 4244 \"never closed\n",
            &[2, 3, 5],
            2,
        ),
        (
            LrmsKind::Slurm,
            "slurm.txt",
            b"1|n|u|g|2025-03-01T10:00:00|2025-03-01T11:00:00|01:00:00|1|p|1|1|wn1|||COMPLETED\n\
              2|n|u|g|2025-03-01T10:00:00\n\
              {\"jobid\": \"x\"}\n\
              3|n|u|g|2025-03-01T10:00:00|not-a-time|01:00:00|1|p|1|1|wn1|||FAILED\n\
              just words\n\
              4|n|u|g|2025-03-01T10:00:00|2025-03-01T11:00:00|01:00:00|1|p|1|1|wn1|||CANCELLED by 0\n",
            &[2, 3, 4, 5],
            2,
        ),
    ];
    for (lrms, name, body, bad_lines, good) in cases {
        let path = file(&d, name, body);
        let mut events: Vec<LrmsEvent> = Vec::new();
        let s = replay(&opts(lrms), std::slice::from_ref(&path), &mut events).unwrap();
        let lines: Vec<u64> = s.malformed_examples.iter().map(|m| m.line).collect();
        assert_eq!(lines, bad_lines, "{lrms}: {s}");
        assert_eq!(s.malformed, bad_lines.len() as u64, "{lrms}");
        assert!(s.malformed_examples.iter().all(|m| m.file == path));
        assert_eq!(events.len(), good, "{lrms}: {events:?}");
        assert_eq!(s.emitted, good as u64);
        // The report names file and line.
        let report = s.to_string();
        assert!(
            report.contains(&format!("{}:{}:", path.display(), bad_lines[0])),
            "{report}"
        );
    }
}

#[test]
fn binary_noise_and_huge_records_do_not_stall() {
    let d = tempfile::tempdir().unwrap();
    let mut noise = b"001 (5.0.0) 2025-03-01 10:00:00 Job executing on host: <h>\n...\n".to_vec();
    noise.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    // An HTCondor record that never closes and grows past the record limit.
    let mut huge = b"000 (6.0.0) 2025-03-01 10:00:00 Job submitted from host: <h>\n".to_vec();
    for _ in 0..40_000 {
        huge.extend_from_slice(b"\tnote line that goes on and on\n");
    }
    huge.extend_from_slice(
        b"...\n001 (7.0.0) 2025-03-01 10:00:00 Job executing on host: <h>\n...\n",
    );
    for lrms in [
        LrmsKind::Htcondor,
        LrmsKind::Pbs,
        LrmsKind::Lsf,
        LrmsKind::Slurm,
    ] {
        let a = file(&d, "noise", &noise);
        let b = file(&d, "huge", &huge);
        let mut events: Vec<LrmsEvent> = Vec::new();
        let s = replay(&opts(lrms), &[a, b], &mut events).unwrap();
        assert!(s.malformed > 0, "{lrms}: {s}");
        if lrms == LrmsKind::Htcondor {
            let jobs: Vec<&str> = events.iter().map(|e| e.job_id.as_str()).collect();
            assert_eq!(jobs, ["5.0", "7.0"], "{s}");
            assert!(events.iter().all(|e| e.state == State::Started));
        }
    }
}

#[test]
fn dry_run_lines_are_one_json_object_per_event() {
    let d = tempfile::tempdir().unwrap();
    let p = file(
        &d,
        "c.log",
        b"012 (1001.000.000) 2025-03-01 10:00:05 Job was held.\n\tvia condor_hold (by user alice)\n\tCode 1 Subcode 0\n...\n\
          028 (1001.000.000) 2025-03-01 10:00:05 Job ad information event triggered.\nProc = 0\n...\n",
    );
    let mut out = JsonLines(Vec::new());
    let s = replay(&opts(LrmsKind::Htcondor), &[p], &mut out).unwrap();
    let text = String::from_utf8(out.0).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "the 028 only enriches: {text}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["lrms"], "htcondor");
    assert_eq!(v["job_id"], "1001.0");
    assert_eq!(v["state"], "held");
    assert_eq!(v["time"], "2025-03-01T10:00:05Z");
    assert_eq!(v["reason"], "via condor_hold (by user alice)");
    assert_eq!(v["hold_code"], 1);
    assert_eq!(v["hold_subcode"], 0);
    assert_eq!((s.read, s.emitted, s.skipped, s.malformed), (2, 1, 1, 0));
    assert_eq!(
        s.to_string(),
        "read 2, emitted 1, skipped 1, malformed 0 (held 1)"
    );
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let mut events: Vec<LrmsEvent> = Vec::new();
    let err = replay(
        &opts(LrmsKind::Pbs),
        &[PathBuf::from("/nonexistent/acct/20250301")],
        &mut events,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "cannot open /nonexistent/acct/20250301");
}
