//! Bad configuration fails fast, with a message naming the problem and a non-zero exit code.

// Test helpers outside #[test] functions panic on failure too: that is the point of a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::Command,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_bus-node");

fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("WNODES_HOST", "hv1.example")
        .env("WNODES_STATE_DIR", dir.path())
        .env("WNODES_HTTP_ADDR", "127.0.0.1:0")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn unknown_environment_key_is_named() {
    let (code, err, _) = run(&[("WNODES_NATS__URLL", "nats://x")], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("urll") || err.contains("URLL"), "{err}");
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wnodes.toml");
    std::fs::write(
        &file,
        "site = \"T1\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\nretries = 3\n",
    )
    .unwrap();
    let (code, err, _) = run(&[], &["--config", file.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("retries"), "{err}");
}

#[test]
fn malformed_value_is_named() {
    let (code, err, _) = run(&[("WNODES_NATS__CONNECT_TIMEOUT", "soon")], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.to_lowercase().contains("connect_timeout"), "{err}");
    let (code, err, _) = run(&[("WNODES_CONSUMER__MAX_ATTEMPTS", "-2")], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.to_lowercase().contains("max_attempts"), "{err}");
}

#[test]
fn invalid_host_name_is_refused() {
    let (code, err, _) = run(&[("WNODES_HOST", "Not_A_Host")], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("host"), "{err}");
}

#[test]
fn unreachable_nats_fails_fast_naming_the_url() {
    let (code, err, took) = run(
        &[
            ("WNODES_NATS__URL", "nats://127.0.0.1:1"),
            ("WNODES_NATS__CONNECT_TIMEOUT", "2s"),
        ],
        &[],
    );
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("nats://127.0.0.1:1"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}
