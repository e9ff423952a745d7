//! Replays the committed fuzz seeds and corpus and every crash input ever found
//! (`fuzz/{seeds,corpus,artifacts}/gateway/`) through the fuzz target's checks
//! (`wnodes_gateway::fuzzing`). No fuzzing happens here: campaigns run by hand with
//! `scripts/fuzz.sh gateway`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::path::{Path, PathBuf};

use wnodes_gateway::fuzzing::{Verdict, exercise_gateway, tree};

fn target_inputs(dir: &str) -> Vec<PathBuf> {
    wnodes_testkit::files::fuzz_inputs(Path::new(env!("CARGO_MANIFEST_DIR")), dir, "gateway")
}

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/gateway")
            .join(name),
    )
    .unwrap()
}

#[test]
fn committed_gateway_corpus_and_crash_inputs_pass_the_checks() {
    assert!(tree().is_some(), "the directory tree cannot be built");
    let seeds = target_inputs("seeds");
    assert!(seeds.len() >= 5, "the seeds are missing ({})", seeds.len());
    let corpus = target_inputs("corpus");
    assert!(
        corpus.len() >= 5,
        "the committed corpus is missing ({} files)",
        corpus.len()
    );
    let verdicts: Vec<Verdict> = seeds
        .iter()
        .chain(&corpus)
        .chain(&target_inputs("artifacts"))
        .map(|p| exercise_gateway(&std::fs::read(p).unwrap()))
        .collect();
    assert!(verdicts.contains(&Verdict::Nfs), "no NFS export planned");
    assert!(
        verdicts.iter().any(|v| matches!(v, Verdict::Refused(_))),
        "no plan refused"
    );
    assert!(verdicts.iter().any(|v| v.accepted()), "nothing accepted");
}

/// What an sshfs plan of uid 65534 comes to here: served by root or by 65534 itself (when it
/// has a passwd entry), else not served.
fn sshfs_as_nobody() -> Verdict {
    let me = nix::unistd::geteuid();
    let nobody = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(65534));
    if (me.is_root() || me.as_raw() == 65534) && matches!(nobody, Ok(Some(_))) {
        Verdict::Sshfs
    } else {
        Verdict::Cannot
    }
}

#[test]
fn the_seeded_plans_are_judged_as_the_host_policy_says() {
    for ok in [
        "plan-sshfs-tap-ok",
        "plan-sshfs-user-ok",
        "plan-sshfs-bind-ok",
        "plan-sshfs-odd-vm-id-ok",
    ] {
        assert_eq!(exercise_gateway(&seed(ok)), sshfs_as_nobody(), "{ok}");
    }
    for ok in [
        "plan-nfs-ok",
        "plan-nfs-ro-link-into-other-root-ok",
        "plan-nfs-link-inside-ok",
        "plan-nfs-dotdot-inside-ok",
        "plan-nfs-own-ranges-ok",
    ] {
        assert_eq!(exercise_gateway(&seed(ok)), Verdict::Nfs, "{ok}");
    }
    assert_eq!(exercise_gateway(&seed("plan-no-exports")), Verdict::Nothing);
    for (name, rule) in [
        ("plan-exports-roots-outside", "exports.roots"),
        ("plan-exports-roots-symlink-escape", "exports.roots"),
        ("plan-exports-roots-symlink-etc", "exports.roots"),
        ("plan-exports-roots-dotdot", "exports.roots"),
        ("plan-exports-roots-no-root", "exports.roots"),
        // export_roots = a symlink to `/` is refused: the default roots, /etc outside them.
        ("plan-root-symlink-refused-config", "exports.roots"),
        ("plan-exports-absolute", "exports.absolute"),
        ("plan-exports-directory-file", "exports.directory"),
        ("plan-exports-directory-missing", "exports.directory"),
        ("plan-exports-count", "exports.count"),
        ("plan-owner-required", "owner.required"),
        ("plan-owner-job-uids-root", "owner.job_uids"),
        ("plan-owner-job-uids-system", "owner.job_uids"),
        ("plan-owner-job-uids-range-with-root", "owner.job_uids"),
        ("plan-owner-job-gids-root", "owner.job_gids"),
        ("plan-storage-nfs-user-mode", "storage.nfs_user_mode"),
        ("plan-exports-path-chars-space", "exports.path_chars"),
        ("plan-exports-path-chars-quote", "exports.path_chars"),
        ("plan-exports-path-chars-backslash", "exports.path_chars"),
        ("plan-exports-path-chars-tab", "exports.path_chars"),
        ("plan-storage-nfs-vm-id-quote", "storage.nfs_vm_id"),
        ("plan-storage-nfs-vm-id-dotdot", "storage.nfs_vm_id"),
        ("plan-storage-nfs-vm-id-slash", "storage.nfs_vm_id"),
        ("plan-storage-nfs", "storage.nfs"),
    ] {
        assert_eq!(
            exercise_gateway(&seed(name)),
            Verdict::Refused(rule),
            "{name}"
        );
    }
    assert_eq!(
        exercise_gateway(&seed("plan-nfs-address-not-ip")),
        Verdict::Cannot
    );
}

#[test]
fn the_seeded_configurations_and_paths_are_judged() {
    for ok in ["config-defaults-ok", "config-no-nfs-ok"] {
        assert_eq!(exercise_gateway(&seed(ok)), Verdict::Accepted, "{ok}");
    }
    for bad in [
        "config-job-uids-with-root",
        "config-ports-reversed",
        "config-ports-too-high",
        "config-root-export",
        "config-root-dotdot",
        "config-root-symlink",
        "config-relative-root",
        "config-export-ids-too-high",
        "config-export-ids-zero",
        "config-nfs-port-zero",
        "config-pseudo-root-dotdot",
    ] {
        assert_eq!(exercise_gateway(&seed(bad)), Verdict::Invalid, "{bad}");
    }
    for ok in ["path-ok", "path-long-parens-ok"] {
        assert_eq!(exercise_gateway(&seed(ok)), Verdict::Accepted, "{ok}");
    }
    for bad in ["path-space", "path-quote", "path-backslash", "path-nbsp"] {
        assert_eq!(exercise_gateway(&seed(bad)), Verdict::Invalid, "{bad}");
    }
}

#[test]
fn the_seeded_program_outputs_are_parsed() {
    assert_eq!(exercise_gateway(&seed("exportfs-v")), Verdict::Parsed(3));
    assert_eq!(exercise_gateway(&seed("tcp")), Verdict::Parsed(1));
    assert_eq!(exercise_gateway(&seed("tcp6")), Verdict::Parsed(1));
    assert_eq!(exercise_gateway(&seed("ldd")), Verdict::Parsed(2));
    assert_eq!(exercise_gateway(&seed("ldd-not-found")), Verdict::Parsed(0));
    for name in [
        "ganesha-show-exports",
        "ganesha-display-export",
        "fixture-exportfs-v",
        "fixture-ganesha-show-exports",
    ] {
        assert!(exercise_gateway(&seed(name)).accepted(), "{name}");
    }
}
