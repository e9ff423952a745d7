//! The readers of the LRMS clients' answers (`pbs_cli`, `lsf_cli`, `htcondor_cli`) take any
//! bytes without panicking: every prefix of each committed answer, and each answer with bytes
//! overwritten at every position (a deterministic sweep), is read into a job or refused with a
//! reason, the same way twice. An accepted job always has an id.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::path::Path;

use wnodes_lrms::{htcondor_cli, lsf_cli, pbs_cli};

fn fixture(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(path),
    )
    .unwrap()
}

/// Every prefix (at char boundaries) and every one-byte overwrite by each of a few troublesome
/// characters, as text.
fn variants(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in s.char_indices() {
        out.push(s[..i].to_owned());
    }
    let bytes = s.as_bytes();
    for i in 0..bytes.len() {
        for b in [
            b'\n', b'"', b'=', b'#', b'@', b' ', b'9', b'-', b'{', b']', b'|', 0,
        ] {
            let mut v = bytes.to_vec();
            v[i] = b;
            out.push(String::from_utf8_lossy(&v).into_owned());
        }
    }
    out
}

fn sweep<T: PartialEq + std::fmt::Debug>(
    name: &str,
    input: &str,
    read: impl Fn(&str) -> Result<T, String>,
    id: impl Fn(&T) -> String,
) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    for v in variants(input) {
        let a = read(&v);
        assert_eq!(a, read(&v), "{name}: not deterministic on {v:?}");
        match a {
            Ok(job) => {
                assert!(
                    !id(&job).is_empty(),
                    "{name}: a job without an id from {v:?}"
                );
                ok += 1;
            }
            Err(why) => {
                assert!(!why.is_empty(), "{name}: a refusal without a reason");
                refused += 1;
            }
        }
    }
    (ok, refused)
}

#[test]
fn pbs_answers_of_any_shape_are_read_or_refused() {
    let json = fixture("pbs/qstat_f_F_json_CONSTRUCTED.json");
    let (ok, refused) = sweep(
        "qstat json",
        &json,
        |s| pbs_cli::parse_qstat_json(s, "1042"),
        |j| j.job_id.clone(),
    );
    assert!(ok > 0 && refused > 0, "{ok} read, {refused} refused");
    let text = fixture("pbs/qstat_f_1_torque_CONSTRUCTED.txt");
    let (ok, refused) = sweep("qstat text", &text, pbs_cli::parse_qstat_text, |j| {
        j.job_id.clone()
    });
    assert!(ok > 0 && refused > 0, "{ok} read, {refused} refused");
}

#[test]
fn lsf_answers_of_any_shape_are_read_or_refused() {
    let json = fixture("lsf/bjobs_o_json_CONSTRUCTED.json");
    let (ok, refused) = sweep("bjobs", &json, lsf_cli::parse_bjobs_json, |j| {
        j.job_id.clone()
    });
    assert!(ok > 0 && refused > 0, "{ok} read, {refused} refused");
    for v in variants(&fixture("lsf/bhist_l_requeued_CONSTRUCTED.txt")) {
        assert!(lsf_cli::count_starts(&v) <= 3, "{v:?}");
    }
    let cgroup = "12:memory:/lsf/cluster1/job.5821.0.1764668400\n0::/lsf/c/job.5821.0.1\n";
    for v in variants(cgroup) {
        let a = lsf_cli::job_of_cgroup(&v, "lsf");
        assert_eq!(a, lsf_cli::job_of_cgroup(&v, "lsf"));
    }
}

#[test]
fn htcondor_answers_of_any_shape_are_read_or_refused() {
    let job = fixture("htcondor/condor_q_json_CONSTRUCTED.json");
    let (ok, refused) = sweep("condor_q", &job, htcondor_cli::parse_job_json, |j| {
        j.job_id.clone()
    });
    assert!(ok > 0 && refused > 0, "{ok} read, {refused} refused");
    let slot = fixture("htcondor/condor_status_startd_json_CONSTRUCTED.json");
    let (ok, refused) = sweep("condor_status", &slot, htcondor_cli::parse_slot_json, |s| {
        s.name.clone()
    });
    assert!(ok > 0 && refused > 0, "{ok} read, {refused} refused");
    for v in variants("ce01.example.org#4711.0#1764668400") {
        if let Some((schedd, id)) = htcondor_cli::split_global_job_id(&v) {
            assert!(
                htcondor_cli::is_condor_name(&schedd) && id.contains('.'),
                "{v:?}"
            );
        }
    }
}
