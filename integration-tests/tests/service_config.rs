//! Every service binary loads the one configuration file the same way: a typo in a top-level
//! key or a bad value in its own section exits 78 naming the key, and `--check-config` passes
//! on the demo's configuration file and fails (78, naming the key) on a typo.
//!
//! The binaries are those `cargo build --workspace --bins` put in `target/debug` (the test
//! command builds them before the tests).

// Test helpers outside #[test] functions panic on failure too: that is the point of a test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use wnodes_devstack::{
    NetworkChoice, SERVICES, StackOptions,
    stack::{ConfigInputs, render_config},
};

/// The demo's configuration file, as `wnodes-dev demo` writes it (user-mode networking; a
/// NATS URL nothing listens on: nothing here connects).
fn demo_config(dir: &Path) -> String {
    let digests: BTreeMap<String, String> = ["rootfs.ext4", "vmlinux", "initrd.img"]
        .into_iter()
        .map(|f| (f.to_owned(), "ab".repeat(32)))
        .collect();
    let mut opts = StackOptions::new(dir);
    opts.network = NetworkChoice::User;
    render_config(
        &opts,
        &ConfigInputs {
            network: NetworkChoice::User,
            nats_url: "nats://127.0.0.1:1".into(),
            creds_dir: Some("/etc/wnodes/nats/creds".into()),
            grpc_addr: "127.0.0.1:9650".parse().unwrap(),
            otlp_endpoint: None,
            image_base: format!("file://{}", dir.display()),
            digests: &digests,
            work: dir,
            export: &dir.join("export"),
        },
    )
}

fn bin(service: &str) -> PathBuf {
    let dir = wnodes_devstack::options::default_bin_dir()
        .expect("the service binaries (cargo build --workspace --bins)");
    dir.join(format!("wnodes-{service}"))
}

/// Runs `wnodes-<service> ARGS` with a clean environment; returns (exit code, stdout+stderr).
fn run(service: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin(service))
        .env_clear()
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A value of the service's own section that it cannot use, and the key its message must name.
fn bad_own_value(service: &str) -> (&'static str, &'static str) {
    match service {
        "bridge" => ("[bridge]\ngrpc_addr = \"not-an-address\"\n", "grpc_addr"),
        "launcher" => ("[launcher]\naccel = \"warp\"\n", "accel"),
        "image" => (
            "[image.catalog.el9]\nurl = \"file:///x\"\nsha256 = \"xyz\"\n",
            "sha256",
        ),
        "scratch" => ("[scratch]\nmax_bytes = 0\n", "max_bytes"),
        // The example: a bad pool used to exit 70.
        "network" => (
            "[network]\nmode = \"tap\"\npool = \"10.0.0.0/33\"\n",
            "pool",
        ),
        "gateway" => ("[gateway]\nport_range = \"9-1\"\n", "port_range"),
        "accounting" => ("[accounting]\ndatabse = \"x.db\"\n", "databse"),
        other => panic!("no bad value for {other}"),
    }
}

const BASE: &str = "site = \"T1\"\nhost = \"hv1.example.org\"\nstate_dir = \"/nonexistent/wnodes\"\n\
                    [nats]\nurl = \"nats://127.0.0.1:1\"\nconnect_timeout = \"1s\"\n";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_service_exits_78_naming_a_bad_top_level_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "typo.toml",
        &format!("{BASE}[lancher]\naccel = \"tcg\"\n"),
    );
    for service in SERVICES {
        let (code, out) = run(service, &["--config", file.to_str().unwrap()]);
        assert_eq!(code, 78, "wnodes-{service}: {out}");
        assert!(out.contains("`lancher`"), "wnodes-{service}: {out}");
        assert!(
            out.contains(file.to_str().unwrap()),
            "wnodes-{service} must say where the key came from: {out}"
        );
    }
}

#[test]
fn every_service_exits_78_naming_a_bad_value_in_its_own_section() {
    let dir = tempfile::tempdir().unwrap();
    for service in SERVICES {
        let (section, key) = bad_own_value(service);
        let file = write(dir.path(), service, &format!("{BASE}{section}"));
        let (code, out) = run(service, &["--config", file.to_str().unwrap()]);
        assert_eq!(code, 78, "wnodes-{service}: {out}");
        assert!(out.contains(key), "wnodes-{service} must name {key}: {out}");
        // The same value in another service's section is not this service's business.
        let other = if service == "bridge" {
            "gateway"
        } else {
            "bridge"
        };
        let (code, out) = run(other, &["--check-config", file.to_str().unwrap()]);
        assert_eq!(code, 0, "wnodes-{other} checks only its own section: {out}");
    }
}

#[test]
fn check_config_passes_on_the_demo_config_and_fails_on_typos() {
    let dir = tempfile::tempdir().unwrap();
    let demo = demo_config(dir.path());
    let good = write(dir.path(), "demo.toml", &demo);
    let top_typo = write(
        dir.path(),
        "top.toml",
        &demo.replacen("log_level =", "log_levle =", 1),
    );
    assert_ne!(demo, std::fs::read_to_string(&top_typo).unwrap());
    for service in SERVICES {
        let (code, out) = run(service, &["--check-config", good.to_str().unwrap()]);
        assert_eq!(code, 0, "wnodes-{service} on the demo's config: {out}");
        assert!(out.contains("valid"), "{out}");

        let (code, out) = run(service, &["--check-config", top_typo.to_str().unwrap()]);
        assert_eq!(code, 78, "wnodes-{service}: {out}");
        assert!(out.contains("log_levle"), "wnodes-{service}: {out}");

        // A typo in the service's own section: the demo's first key of `[<service>]` (or, for
        // a section the demo does not write, an unknown key added to it).
        let header = format!("\n[{service}]\n");
        let (own_typo, typo) = match demo.find(&header) {
            Some(at) => {
                let key_at = at + header.len();
                let key: String = demo[key_at..]
                    .chars()
                    .take_while(|c| *c != ' ' && *c != '=')
                    .collect();
                let mut t = demo.clone();
                t.insert(key_at, 'x');
                (t, format!("x{key}"))
            }
            None => (format!("{demo}{header}xbogus = 1\n"), "xbogus".to_owned()),
        };
        let own = write(dir.path(), &format!("own-{service}.toml"), &own_typo);
        let (code, out) = run(service, &["--check-config", own.to_str().unwrap()]);
        assert_eq!(code, 78, "wnodes-{service}: {out}");
        assert!(
            out.contains("unknown field") && out.contains(&format!("`{typo}`")),
            "wnodes-{service} must name the mistyped key {typo}: {out}"
        );
        assert!(out.contains(own.to_str().unwrap()), "{out}");
    }
}

#[test]
fn check_config_on_a_missing_file_exits_78() {
    for service in SERVICES {
        let (code, out) = run(service, &["--check-config", "/nonexistent/wnodes.toml"]);
        assert_eq!(code, 78, "wnodes-{service}: {out}");
        assert!(out.contains("/nonexistent/wnodes.toml"), "{out}");
    }
}
