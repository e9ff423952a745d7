//! `wnodes-bridge replay` (the real binary): LRMS files into job events, printed with
//! `--dry-run` or published to a real nats-server, where a second replay adds nothing.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use wnodes_testkit::{
    NatsServer,
    bus::{BusClient, stored_events},
};

/// A hold/release/evict/abort sequence of one HTCondor job (CONSTRUCTED from the HTCondor
/// manual's event formats; the same file as wnodes-lrms's test data).
fn htcondor_log() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/wnodes-lrms/tests/data/htcondor/constructed_hold_release.log")
}

/// The states of the file's events in order, read by hand from the file (000, 012, 013, 001,
/// 004, 012, 009).
const STATES: [&str; 7] = [
    "queued",
    "held",
    "released",
    "started",
    "evicted",
    "held",
    "cancelled",
];

/// The bridge's connection settings on `nats`.
fn bridge(nats: &NatsServer) -> wnodes_bus::NatsConfig {
    nats.creds(&wnodes_bus::roles::BRIDGE, "ce01.example.org")
        .unwrap()
}

/// A server nobody listens on.
fn unreachable() -> wnodes_bus::NatsConfig {
    wnodes_bus::NatsConfig {
        url: "nats://127.0.0.1:1".into(),
        ..Default::default()
    }
}

fn replay(bridge: &wnodes_bus::NatsConfig, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnodes-bridge"))
        .env_clear()
        .env("WNODES_NATS__URL", &bridge.url)
        .env(
            "WNODES_NATS__CREDS_FILE",
            bridge.creds_file.clone().unwrap_or_default(),
        )
        .env("WNODES_HOST", "ce01.example.org")
        .env("WNODES_SITE", "INFN-T1")
        .env("TZ", "UTC")
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn dry_run_prints_one_json_object_per_event_and_a_summary() {
    let log = htcondor_log();
    let (code, stdout, stderr) = replay(
        &unreachable(),
        &["--lrms", "htcondor", "--dry-run", log.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, STATES);
    for e in &events {
        assert_eq!(e["lrms"], "htcondor");
        assert_eq!(e["job_id"], "1001.0");
        let t = e["time"].as_str().unwrap();
        assert!(t.starts_with("2025-03-01T10:") && t.ends_with('Z'), "{t}");
    }
    assert_eq!(events[0]["time"], "2025-03-01T10:00:00Z");
    assert!(stderr.contains("emitted 7"), "{stderr}");
    assert!(stderr.contains("malformed 0"), "{stderr}");
}

#[test]
fn a_malformed_record_is_counted_named_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(htcondor_log()).unwrap();
    let bad = dir.path().join("bad.log");
    // A garbled header between two good events.
    let at = text.find("012 (").unwrap();
    std::fs::write(
        &bad,
        format!(
            "{}0x2 (garbage) not a date\n...\n{}",
            &text[..at],
            &text[at..]
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = replay(
        &unreachable(),
        &["--lrms", "htcondor", "--dry-run", bad.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), STATES.len(), "{stdout}");
    assert!(stderr.contains("malformed 1"), "{stderr}");
    assert!(
        stderr.contains("bad.log:3"),
        "file and line named: {stderr}"
    );
}

#[test]
fn a_missing_file_fails_naming_it() {
    let (code, _, stderr) = replay(
        &unreachable(),
        &["--lrms", "pbs", "--dry-run", "/nonexistent/20260101"],
    );
    assert_eq!(code, 66, "{stderr}");
    assert!(stderr.contains("/nonexistent/20260101"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_publishes_each_event_once_even_when_replayed_twice() {
    let nats = NatsServer::start().await.unwrap();
    let log = htcondor_log();
    let args = ["--lrms", "htcondor", log.to_str().unwrap()];
    let (code, stdout, stderr) = replay(&bridge(&nats), &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    // The replay made the streams: only connect.
    let bus = BusClient::new(&nats.admin())
        .without_streams()
        .connect()
        .await
        .unwrap();
    let count = || async { stored_events(&bus).await.unwrap() };
    assert_eq!(count().await, STATES.len() as u64);

    // The same file again: the event ids are the same, JetStream drops every one.
    let (code, _, stderr) = replay(&bridge(&nats), &args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count().await, STATES.len() as u64);
}

#[test]
fn unreachable_nats_exits_69() {
    let log = htcondor_log();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnodes-bridge"))
        .env_clear()
        .env("WNODES_NATS__URL", "nats://127.0.0.1:1")
        .env("WNODES_NATS__CONNECT_TIMEOUT", "1s")
        .env("WNODES_HOST", "ce01.example.org")
        .args(["replay", "--lrms", "htcondor", log.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("nats://127.0.0.1:1"), "{stderr}");
}

/// PBS accounting records (CONSTRUCTED from OpenPBS's accounting log format; wnodes-lrms's test
/// data): a Q record in queue `workq` (no image named), then S, E and a D of another job.
fn pbs_log() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/wnodes-lrms/tests/data/pbs/openpbs_records_CONSTRUCTED.log")
}

#[test]
fn the_sites_image_hints_name_the_image_of_a_queued_job_whose_record_names_none() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("wnodes.toml");
    std::fs::write(
        &conf,
        "site = \"INFN-T1\"\nhost = \"ce01.example.org\"\n\
         [bridge.image_hints.by_queue]\nworkq = \"el9-workq\"\n\
         [bridge.image_hints.by_group]\natlas = \"atlas-el9\"\n",
    )
    .unwrap();
    let log = pbs_log();
    let (code, stdout, stderr) = replay(
        &unreachable(),
        &[
            "--config",
            conf.to_str().unwrap(),
            "--lrms",
            "pbs",
            "--dry-run",
            log.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let hints: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e["state"].as_str().unwrap(), e["image_hint"].as_str()))
        .collect();
    // Only the queued event gets a hint, and the queue's wins over the group's.
    assert_eq!(
        hints,
        [
            ("queued", Some("el9-workq")),
            ("started", None),
            ("finished", None),
            ("cancelled", None),
        ]
    );

    // Without the section, the same record carries no hint.
    let (code, stdout, stderr) = replay(
        &unreachable(),
        &["--lrms", "pbs", "--dry-run", log.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("image_hint"), "{stdout}");
}
