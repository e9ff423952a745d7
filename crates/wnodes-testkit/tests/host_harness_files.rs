//! A test file with `harness = false` (the `host` harness) runs only what its `main` lists: a
//! `#[test]` or `#[tokio::test]` written there would compile to nothing and never run, silently.
//! This checks every such file of the workspace has none, and that each one calls `host::main`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is a test failure

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The package directories of the workspace (`crates/*`, `services/*`, `integration-tests`).
fn packages(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for group in ["crates", "services"] {
        for entry in std::fs::read_dir(root.join(group)).unwrap() {
            let dir = entry.unwrap().path();
            if dir.join("Cargo.toml").is_file() {
                dirs.push(dir);
            }
        }
    }
    dirs.push(root.join("integration-tests"));
    dirs
}

/// The `path`s of the `[[test]]` entries with `harness = false` in `manifest`.
fn harnessless_tests(manifest: &str) -> Vec<String> {
    let mut found = Vec::new();
    for block in manifest.split("[[test]]").skip(1) {
        // The entry ends where the next table starts.
        let entry = block.split("\n[").next().unwrap_or_default();
        let value = |key: &str| {
            entry.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        if value("harness").as_deref() == Some("false") {
            found.push(value("path").expect("a [[test]] with harness = false names its path"));
        }
    }
    found
}

#[test]
fn harnessless_test_files_declare_every_test_in_main() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in packages(&root) {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        for path in harnessless_tests(&manifest) {
            files.push(dir.join(path));
        }
    }
    assert!(
        files.len() >= 10,
        "the host-test files were not found: {files:?}"
    );
    for file in &files {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for attr in ["#[test]", "#[tokio::test"] {
            assert!(
                !text.contains(attr),
                "{}: `{attr}` in a harness = false file never runs; list the test in main \
                 with host_test!",
                file.display()
            );
        }
        assert!(
            text.contains("host::main("),
            "{}: harness = false without the host harness",
            file.display()
        );
    }
}

#[test]
fn the_manifest_reader_finds_only_harnessless_entries() {
    let manifest = "[package]\nname = \"x\"\n\n[[test]]\nname = \"a\"\npath = \"tests/a.rs\"\n\
                    harness = false\n\n[[test]]\nname = \"b\"\npath = \"tests/b.rs\"\n\n\
                    [dev-dependencies]\nharness = false\n";
    assert_eq!(harnessless_tests(manifest), vec!["tests/a.rs".to_owned()]);
}
