#!/usr/bin/env bash
# Checks systemd/: every unit passes `systemd-analyze verify` with no message (ExecStart pointed
# at target/debug), after proving the check can fail (a unit with an unknown directive must draw a
# message); then each service's binary tests run once with every service process it starts under
# that service's unit's CapabilityBoundingSet (`setpriv --bounding-set`, through the test kit's
# TESTKIT_BOUNDING_SET), so a capability the unit lacks fails a test.
#
# systemd does not run as PID 1 here: the units are verified and their capability sets
# exercised, never started by systemd. Needs the binaries (`cargo build --workspace --bins`)
# and root. Run by scripts/test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v systemd-analyze >/dev/null || { echo "check-systemd: no systemd-analyze (apt install systemd)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

verify() {
    # systemd-analyze verify warns about bad lines without failing: any message fails here.
    local out
    out=$(systemd-analyze verify "$@" 2>&1) && [[ -z "$out" ]] || { echo "$out"; return 1; }
}

mkdir -p "$tmp/bad"
sed -e 's|/usr/local/bin/|'"$root"'/target/debug/|' -e 's|^ProtectSystem=strict|ProtectSytem=strict|' \
    systemd/wnodes-image.service >"$tmp/bad/wnodes-image.service"
if verify "$tmp/bad/wnodes-image.service" >/dev/null; then
    echo "check-systemd: a unit with an unknown directive passed: the check checks nothing" >&2
    exit 1
fi

units=()
for u in systemd/*.service; do
    sed "s|/usr/local/bin/|$root/target/debug/|" "$u" >"$tmp/$(basename "$u")"
    units+=("$tmp/$(basename "$u")")
done
# Drop-ins: the unit with the drop-in appended (a second [Service] section), as systemd merges
# them.
mkdir -p "$tmp/dropin"
dropins=()
for d in systemd/*-*.conf; do
    base=${d%-*}
    merged="$tmp/dropin/$(basename "$base").service"
    { sed "s|/usr/local/bin/|$root/target/debug/|" "$base.service"; cat "$d"; } >"$merged"
    dropins+=("$merged")
done
verify "${units[@]}"
# Apart: a merged unit has its unit's name.
verify "${dropins[@]}"
echo "check-systemd: ${#units[@]} units and ${#dropins[@]} drop-ins (merged into their unit) pass systemd-analyze verify" >&2

# Each service's tests that start its binary, and the unit's bounding set in setpriv's syntax.
# What the tests exercise: the gateway's test fails with no capability at all (it starts
# sftp-server as the job's uid); the launcher's runs qemu as the VM's own uid (setpriv: CAP_SETUID,
# CAP_SETGID; handing over its files: CAP_CHOWN) with user-mode networking, and shows that SIGTERM
# to the launcher's process alone (what KillMode=process sends) leaves the VM running for the next
# launcher.
# wnodes-network: its binary test runs inside a network namespace of its own (`unshare --net`,
# TESTKIT_NETWORK_IN_PLACE), where the service builds its taps and nft rules in the namespace it
# runs in, as on a hypervisor, without `[network] netns` (whose setns needs CAP_SYS_ADMIN): so
# only the unit's CAP_NET_ADMIN is there, and without it the test fails.
declare -A tests=(
    [image]="package(=wnodes-image) and binary(=binary)"
    [scratch]="package(=wnodes-scratch) and binary(=binary)"
    [gateway]="package(=wnodes-gateway) and binary(=binary)"
    [launcher]="package(=wnodes-launcher) and binary(=binary)"
    [bridge]="package(=wnodes-bridge) and binary(=serve)"
    [accounting]="package(=wnodes-accounting) and binary(=cli)"
    # The usage exporter's system test (it also starts accounting, whose set is the same).
    [usage]="package(=wnodes-integration-tests) and binary(=usage_exporter)"
    [network]="package(=wnodes-network) and binary(=binary)"
    # The host agent: its socket, peer credentials and the starters' runs.
    [agent]="package(=wnodes-agent) and binary(=agent)"
)
for svc in image scratch gateway launcher bridge accounting usage network agent; do
    caps=$(sed -n 's/^CapabilityBoundingSet=//p' "systemd/wnodes-$svc.service")
    set="-all"
    for c in $caps; do set+=",+$(echo "${c#CAP_}" | tr 'A-Z' 'a-z')"; done
    echo "check-systemd: wnodes-$svc's tests under bounding set $set" >&2
    # The whole workspace with a filter, not `-p`: the same feature set as the main test run, so
    # nothing is compiled twice.
    run=(env TESTKIT_BOUNDING_SET="$set" WNODES_HOST_TESTS=required
        cargo nextest run --workspace --locked --profile ci --no-tests=fail
        -E "${tests[$svc]}" --status-level fail --final-status-level fail)
    if [[ $svc == network ]]; then
        unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh \
            env TESTKIT_NETWORK_IN_PLACE=1 "${run[@]}"
    else
        "${run[@]}"
    fi
done
