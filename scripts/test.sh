#!/usr/bin/env bash
# The project's test command (README "Quick start", .ci/run): installs what the tests need when
# missing (nats-server, kubectl and the Kubernetes schemas into .tools/, qemu/sshfs/nftables
# through apt, the test guest and the igb guest's disk into .cache/; the static guest probe into
# target/guest-probe), then checks formatting, lints, the Kubernetes manifests
# (scripts/check-k8s.sh), the systemd units (scripts/check-systemd.sh), the alert rules
# (scripts/check-monitoring.sh), the dashboard's expressions against a real Prometheus scraping
# `wnodes-dev up` during three jobs (scripts/check-dashboard.sh: root, qemu), starts one private
# PostgreSQL cluster for the run (scripts/pg-cluster.sh; its URL in TESTKIT_POSTGRES_URL, each
# test making its own database; it is stopped and removed at the end), and runs every test with
# nextest. Just before nextest a private one-node Slurm cluster starts (scripts/slurm-cluster.sh:
# munge, MariaDB, slurmdbd, slurmctld, slurmd, WNoDeS's job_submit.lua), its SLURM_CONF exported
# for integration-tests/tests/slurm.rs; it is stopped and removed at the end.
#
# Host tests (wnodes_testkit::host: root, qemu, /dev/fuse, sftp-server, the test guest, ...) run
# with WNODES_HOST_TESTS=required: a missing precondition fails them, naming it, instead of
# skipping them. At the end (also after a failure) it prints how many host tests ran and how long
# each phase took.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

phases=()
phase_start=
phase_name=
begin() {
    end_phase
    phase_name=$1
    phase_start=$EPOCHREALTIME
}
end_phase() {
    if [ -n "$phase_name" ]; then
        phases+=("$phase_name $(awk -v a="$phase_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }')")
        phase_name=
    fi
}
# Every host test that ran appends a line here (wnodes_testkit::host, HOST_TESTS_LOG).
host_log="$root/target/host-tests.log"
rm -f "$host_log"
pg_dir=
slurm_dir=
report() {
    local rc=$?
    end_phase
    if [ -n "$pg_dir" ]; then
        scripts/pg-cluster.sh stop "$pg_dir" || true
        rm -rf "$pg_dir"
    fi
    if [ -n "$slurm_dir" ]; then
        begin slurm-stop
        scripts/slurm-cluster.sh stop "$slurm_dir" || true
        rm -rf "$slurm_dir"
        end_phase
    fi
    if [ -f "$host_log" ]; then
        local passed failed missing
        passed=$(grep -c '^passed ' "$host_log" || true)
        failed=$(grep -c '^failed ' "$host_log" || true)
        missing=$(grep -c '^missing ' "$host_log" || true)
        echo "== host tests: $((passed + failed)) ran ($passed passed, $failed failed);" \
            "$missing failed without running (a missing precondition)" >&2
    fi
    local joined
    joined=$(printf '%s, ' "${phases[@]}")
    echo "== phase times: ${joined%, }" >&2
    exit "$rc"
}
trap report EXIT

begin install
scripts/install-deps.sh all
if [ -x guest/build.sh ]; then guest/build.sh >/dev/null; fi
# The igb guest's disk (SR-IOV/VLAN modules, iproute2) for wnodes_testkit::guest_run: ~7 s
# cold, 0.2 s cached.
if [ -x guest/build-igb.sh ]; then guest/build-igb.sh >/dev/null; fi

begin lint
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

begin build
echo "== cargo build (the service binaries the system tests start)" >&2
cargo build --workspace --bins --locked
# A few minutes cold on 2 cores (wnodes-network and its dependencies, statically, in its own
# target directory: other RUSTFLAGS), 0.3 s when up to date
echo "== the static wnodes-guest-probe (the igb guest's tests)" >&2
scripts/build-guest-probe.sh >/dev/null

# Before the systemd phase: the services' tests it runs include PostgreSQL ones.
begin postgres
echo "== PostgreSQL: one private cluster for the run" >&2
pg_dir=$(mktemp -d /tmp/wnodes-test-pg.XXXXXX)
TESTKIT_POSTGRES_URL=$(scripts/pg-cluster.sh start "$pg_dir")
export TESTKIT_POSTGRES_URL
echo "== PostgreSQL at $TESTKIT_POSTGRES_URL" >&2

begin k8s
echo "== k8s manifests (kubectl kustomize, kubernetes-validate, --check-config)" >&2
scripts/check-k8s.sh

begin systemd
echo "== systemd units (systemd-analyze verify, tests under each unit's capability set)" >&2
scripts/check-systemd.sh

begin monitoring
echo "== alert rules (promtool check rules, promtool test rules)" >&2
scripts/check-monitoring.sh

begin dashboard
echo "== dashboard (every expression against Prometheus scraping wnodes-dev up during 3 jobs)" >&2
scripts/check-dashboard.sh

# Just before the tests, its only users (integration-tests/tests/slurm.rs): its daemons do not
# idle through the other phases.
begin slurm
echo "== Slurm: one private one-node cluster for the run (munge, MariaDB, slurmdbd, slurmctld, slurmd)" >&2
slurm_dir=$(mktemp -d /tmp/wnodes-test-slurm.XXXXXX)
scripts/slurm-cluster.sh start "$slurm_dir"
eval "$(scripts/slurm-cluster.sh env "$slurm_dir")"
echo "== Slurm: SLURM_CONF=$SLURM_CONF" >&2

begin tests
echo "== cargo nextest" >&2
mkdir -p "$(dirname "$host_log")"
touch "$host_log"
WNODES_HOST_TESTS=required HOST_TESTS_LOG="$host_log" \
    cargo nextest run --workspace --locked --profile ci "$@"
