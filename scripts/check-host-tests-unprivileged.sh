#!/usr/bin/env bash
# Shows that a host test (wnodes_testkit::host) cannot pass without running. Builds the tests
# once as root into a nextest archive, then runs that archive as uid 65534 (nobody, no groups)
# twice, with the same nextest arguments:
#   1. as is: each host test whose precondition is missing there (root, writable cgroups, ...) is
#      reported SKIPPED;
#   2. with WNODES_HOST_TESTS=required: the same tests fail, each naming what is missing.
# It then checks that run 1 passed (every test that ran there passed), that run 2 failed on a
# missing precondition exactly the tests run 1 skipped, and that none of those ran in run 1.
#
#   scripts/check-host-tests-unprivileged.sh [NEXTEST-RUN-ARGS...]   e.g. -E 'package(wnodes-network)'
#
# Needs root (setpriv) and a workspace that uid 65534 can read (its path is the
# --workspace-remap). Not part of scripts/test.sh: it builds every test binary again for the
# archive and runs the suite twice as nobody (the launcher's VM tests run there too: they need no
# root). Each run's full output stays in the printed work directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
uid=65534
die() { echo "check-host-tests-unprivileged: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it builds as root, then drops to uid $uid)"
nextest=$(command -v cargo-nextest) || die "cargo-nextest not found"
as_nobody() {
    setpriv --reuid="$uid" --regid="$uid" --clear-groups \
        env -u WNODES_HOST_TESTS -u HOST_TESTS_LOG HOME="$work/home" "$@"
}

work=$(mktemp -d /tmp/wnodes-unprivileged.XXXXXX)
chmod 755 "$work"
# Keeps the outputs and logs; the archive and its two extractions are large.
trap 'rm -rf "$work/tests.tar.zst" "$work/run1" "$work/run2" "$work/home"' EXIT
as_nobody_check() { setpriv --reuid="$uid" --regid="$uid" --clear-groups "$@"; }
as_nobody_check test -r "$root/Cargo.toml" ||
    die "uid $uid cannot read $root (the workspace-remap W must be readable)"

echo "== as root: cargo build (the service binaries the system tests start) and nextest archive" >&2
cargo build --workspace --bins --locked
archive="$work/tests.tar.zst"
cargo nextest archive --workspace --locked --archive-file "$archive"
install -m 755 "$nextest" "$work/cargo-nextest"
chmod 644 "$archive"
install -d -o "$uid" -g "$uid" "$work/home" "$work/run1" "$work/run2" "$work/logs"

summary() { grep -E '^ *Summary \[' "$1" | tail -1; }

run() { # N [ENV...]: one run as nobody; its output in $work/runN.out
    local n=$1
    shift
    echo "== as uid $uid, run $n${*:+ with $*}" >&2
    set +e
    as_nobody "$@" HOST_TESTS_LOG="$work/logs/run$n.log" \
        "$work/cargo-nextest" nextest run --archive-file "$archive" \
        --extract-to "$work/run$n" --workspace-remap "$root" --no-fail-fast --status-level skip \
        "${nextest_args[@]}" >"$work/run$n.out" 2>&1
    status[$n]=$?
    set -e
    echo "   exit status ${status[$n]}; $(summary "$work/run$n.out")" >&2
}
status=()
nextest_args=("$@")
run 1
run 2 WNODES_HOST_TESTS=required

# Tests that ran (a final status with a time: PASS, FAIL, SIGSEGV, ...; not SKIP, not SLOW).
ran() { grep -E '^ +[A-Z-]+ +\[ *[0-9.]+s\] ' "$1" | awk '{print $NF}' | sort -u; }
# Skipped in run 1 because a precondition was missing: run in run 2, not in run 1 (a test left
# out by a filter runs in neither; nextest calls both kinds "skipped").
skipped_names=$(comm -13 <(ran "$work/run1.out") <(ran "$work/run2.out"))
# The host-test log of run N (none when no host test ran).
log_of() { cat "$work/logs/run$1.log" 2>/dev/null || true; }
missing_names=$(log_of 2 | awk '$1 == "missing" {print $3}' | sort -u)
skipped=$(printf '%s' "$skipped_names" | grep -c . || true)
missing=$(printf '%s' "$missing_names" | grep -c . || true)
echo "== run 1 (WNODES_HOST_TESTS unset): $skipped skipped for a missing host precondition" >&2
echo "== run 2 (WNODES_HOST_TESTS=required): $missing failed on a missing host precondition:" >&2
grep -oE 'missing host precondition: .*' "$work/run2.out" | sort | uniq -c | sed -E 's/^ */     /' >&2 || true
echo "== outputs: $work/run1.out, $work/run2.out; host tests run: $work/logs/" >&2
[ "${status[1]}" = 0 ] || die "run 1 failed: a test that ran as uid $uid failed (see $work/run1.out)"
[ "$skipped" -gt 0 ] || die "run 1 skipped nothing"
# The same tests, by name.
diff <(printf '%s\n' "$skipped_names") <(printf '%s\n' "$missing_names") >&2 ||
    die "the tests skipped in run 1 are not those failed on a missing precondition in run 2"
# And none of them ran in run 1 (the host log of run 1 names every host test that ran there).
while read -r what bin name; do
    [ "$what" = missing ] || continue
    if log_of 1 | grep -qE "^(passed|failed) $bin $name\$"; then
        die "$bin $name ran in run 1 although a precondition is missing"
    fi
done < <(log_of 2)
echo "== ok: every host test whose precondition is missing for uid $uid was skipped, and fails when required" >&2
