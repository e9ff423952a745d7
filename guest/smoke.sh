#!/usr/bin/env bash
# Boot the WNoDeS test guest for real under TCG and check the guest contract (guest/README.md).
#   (a) no network: payload writes to ttyS1 and to the scratch disk, exits 3
#   (b) network in a private network namespace (bridge wnbr0 + tap wntap0), storage gateway =
#       socat TCP listener piping into OpenSSH sftp-server; the payload (uid 1000) writes /shared/hello.txt
# Needs root (netns, tap), qemu-system-x86_64, sshfs/sftp-server (scripts/install-vm-deps.sh); installs
# socat with apt when missing. Exits non-zero on the first failed check.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BOOT_TIMEOUT="${WNODES_SMOKE_TIMEOUT:-180}"

log() { printf '[guest/smoke] %s\n' "$*"; }
die() { printf '[guest/smoke] FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespace, tap)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (run scripts/install-vm-deps.sh)"
command -v debugfs >/dev/null || die "debugfs missing (e2fsprogs)"
SFTP_SERVER=/usr/lib/openssh/sftp-server
[ -x "$SFTP_SERVER" ] || die "$SFTP_SERVER missing (openssh-sftp-server; run scripts/install-vm-deps.sh)"
if ! command -v socat >/dev/null; then
    log "installing socat (smoke test only)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat >/dev/null
    }
fi

G="$("$HERE/build.sh" | tail -n1)"
[ -s "$G/manifest.json" ] || die "guest build failed"
log "guest: $G ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["kernel_version"])' "$G/manifest.json"))"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/wnodes-smoke.XXXXXX")"
NS="wnsmoke-$$"
SOCAT_PID=""
cleanup() {
    local rc=$?
    if [ -n "$SOCAT_PID" ]; then kill "$SOCAT_PID" 2>/dev/null || true; wait "$SOCAT_PID" 2>/dev/null || true; fi
    ip netns del "$NS" 2>/dev/null || true
    if [ "$rc" = 0 ] || [ -z "${WNODES_SMOKE_KEEP:-}" ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
    exit "$rc"
}
trap cleanup EXIT INT TERM
export TMPDIR="$WORK"    # qemu -snapshot puts its temporary overlay there

# boot NAME WRAPPER... -- QEMU-ARGS... : run one VM with its state dir $WORK/NAME, print the wall time
boot() {
    local name="$1"; shift
    local wrap=()
    while [ "$1" != "--" ]; do wrap+=("$1"); shift; done
    shift
    local st="$WORK/$name"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    timeout "$BOOT_TIMEOUT" "${wrap[@]}" qemu-system-x86_64 \
        -accel tcg -M pc -m 256 -nodefaults -display none -no-reboot -snapshot \
        -kernel "$G/vmlinux" -initrd "$G/initrd.img" \
        -drive "file=$G/rootfs.ext4,format=raw,if=virtio,readonly=on" \
        -fw_cfg "name=opt/wnodes/job.sh,file=$st/job.sh" \
        -serial "file:$st/console.log" -serial "file:$st/output.log" -serial "file:$st/status.log" \
        "$@" >"$st/qemu.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    log "boot $name: launch -> qemu exit $(python3 -c "print(f'{$t1-$t0:.2f}')") s (qemu rc=$rc)"
    [ "$rc" = 0 ] || { show "$name"; die "$name: qemu exited with $rc (124 = timeout ${BOOT_TIMEOUT}s)"; }
    [ -z "${WNODES_SMOKE_VERBOSE:-}" ] || show "$name"
}
show() {
    local f
    for f in qemu console output status; do
        echo "----- $1/$f.log" >&2
        cat "$WORK/$1/$f.log" >&2 2>/dev/null || true
    done
}
expect() { # name file pattern
    grep -qx -- "$3" "$WORK/$1/$2" || { show "$1"; die "$1: $2 has no line '$3'"; }
}

# ---------------------------------------------------------------------------------------------
# (a) no network, scratch disk
mkdir -p "$WORK/a"
printf 'echo hello; echo data > /scratch/x; exit 3\n' >"$WORK/a/job.sh"
truncate -s 64M "$WORK/a/scratch.ext4"
mkfs.ext4 -q -F "$WORK/a/scratch.ext4"
boot a -- \
    -drive "file=$WORK/a/scratch.ext4,format=raw,if=virtio,snapshot=off" \
    -append "console=ttyS0 root=/dev/vda panic=-1 quiet wnodes.scratch=/dev/vdb"
expect a output.log hello
expect a status.log 'WNODES phase=modules'
expect a status.log 'WNODES phase=scratch'
expect a status.log 'WNODES phase=payload-start'
expect a status.log 'WNODES exit=3'
[ "$(tail -n1 "$WORK/a/status.log")" = "WNODES exit=3" ] || { show a; die "a: exit line is not the last status line"; }
got="$(debugfs -R 'cat /x' "$WORK/a/scratch.ext4" 2>/dev/null)"
[ "$got" = data ] || { show a; die "a: scratch /x is '$got', want 'data'"; }
log "(a) ok: output 'hello', WNODES exit=3, scratch /x = data"

# ---------------------------------------------------------------------------------------------
# (b) network namespace + bridge + tap, sshfs to socat|sftp-server
mkdir -p "$WORK/b" "$WORK/b/export"
PORT=12022
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add wnbr0 type bridge
ip -n "$NS" addr add 10.231.7.1/24 dev wnbr0
ip -n "$NS" link set wnbr0 up
ip netns exec "$NS" ip tuntap add mode tap wntap0
ip -n "$NS" link set wntap0 master wnbr0
ip -n "$NS" link set wntap0 up
(cd "$WORK/b/export" && exec ip netns exec "$NS" socat "TCP-LISTEN:$PORT,bind=10.231.7.1,reuseaddr,fork" "EXEC:$SFTP_SERVER") \
    >"$WORK/b/socat.log" 2>&1 &
SOCAT_PID=$!
for _ in $(seq 100); do
    ip netns exec "$NS" ss -Hltn "sport = :$PORT" | grep -q . && break
    sleep 0.05
done
ip netns exec "$NS" ss -Hltn "sport = :$PORT" | grep -q . || die "b: socat is not listening"
cat >"$WORK/b/job.sh" <<'EOF'
echo "payload as $(id -u):$(id -g) in $(pwd)"
echo hello-from-guest > /shared/hello.txt
ls -l /shared
EOF
boot b ip netns exec "$NS" -- \
    -netdev tap,id=n0,ifname=wntap0,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:e7:00:02 \
    -append "console=ttyS0 root=/dev/vda panic=-1 quiet wnodes.ip=10.231.7.2/24 wnodes.gw=10.231.7.1 wnodes.sshfs=10.231.7.1:$PORT:$WORK/b/export wnodes.uid=1000 wnodes.gid=1000"
expect b status.log 'WNODES phase=network'
expect b status.log 'WNODES phase=shared'
expect b status.log 'WNODES exit=0'
expect b output.log 'payload as 1000:1000 in /shared'
[ "$(cat "$WORK/b/export/hello.txt" 2>/dev/null)" = hello-from-guest ] || { show b; die "b: /shared/hello.txt did not reach the host"; }
log "(b) ok: WNODES exit=0, hello.txt written through sshfs by uid 1000"
log "PASS"
