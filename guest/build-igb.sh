#!/usr/bin/env bash
# Build the igb guest's extra disk (guest/README.md, "The igb guest") under <repo>/.cache/guest-igb/:
# the kernel modules for an SR-IOV NIC and VLANs that the test guest's initrd does not carry, and
# iproute2's `ip` and `bridge` with their libraries. The test guest itself (guest/build.sh, run
# first) is unchanged: this disk is mounted by the payload wnodes_testkit::guest_run writes.
#
#   guest/build-igb.sh            build what is missing / stale, print the cache directory on the last line
#   guest/build-igb.sh --force    rebuild
#
# Outputs:
#   lab.ext4       ext4 image (label wnodes-lab): modules/<name>.ko + modules/order (insmod order,
#                  dependencies first), lib/ (the loader and every library ldd reports),
#                  libexec/{ip,bridge,nft} (iproute2, nftables, from the build host), bin/{ip,bridge,nft} (wrappers
#                  that run them through lib/'s loader)
#   manifest.json  {"disk", "kernel_version", "modules", "sha256"}
#
# Rebuilt when this script, the test guest's kernel or the host's iproute2 change. Needs what
# guest/build.sh needs, and iproute2 on the host. Safe to run concurrently (flock).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${WNODES_GUEST_IGB_CACHE:-$REPO/.cache/guest-igb}"
SELF="$HERE/build-igb.sh"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
# The modules the igb guest adds (their dependencies are resolved from each .ko's modinfo):
# the 82576 PF and VF drivers, 802.1Q VLAN devices, the bridge (vlan_filtering), and veth (the
# network-namespace "VMs" of the VLAN tests), tun and nf_tables (the network service's tap path:
# `ip tuntap add`, and its per-VM filter through `nft`, whose `meta iifname` in the bridge family
# is nft_meta_bridge's; the VLANs' layer-3 separation uses fib).
WANTED="igb:CONFIG_IGB igbvf:CONFIG_IGBVF 8021q:CONFIG_VLAN_8021Q bridge:CONFIG_BRIDGE veth:CONFIG_VETH tun:CONFIG_TUN nf_tables:CONFIG_NF_TABLES nft_meta_bridge:CONFIG_NFT_BRIDGE_META nft_fib_inet:CONFIG_NFT_FIB_INET"

log() { printf '[guest/build-igb] %s\n' "$*" >&2; }
die() { printf '[guest/build-igb] ERROR: %s\n' "$*" >&2; exit 1; }

GUEST="$("$HERE/build.sh" | tail -n1)"
[ -f "$GUEST/resolved" ] || die "guest/build.sh left no $GUEST/resolved"
. "$GUEST/resolved"
KVER="${KPKG#linux-image-}"
KDEB="$GUEST/debs/${KPKG}_${KPKG_VER//:/%3a}_amd64.deb"
[ -s "$KDEB" ] || die "kernel package $KDEB missing (guest/build.sh keeps it)"
IPR="$(command -v ip || true)"; BRG="$(command -v bridge || true)"; NFT="$(command -v nft || true)"
[ -n "$IPR" ] && [ -n "$BRG" ] || die "iproute2's ip and bridge not found on the host (apt-get install iproute2)"
[ -n "$NFT" ] || die "nft not found on the host (apt-get install nftables)"
IPR="$(readlink -f "$IPR")"; BRG="$(readlink -f "$BRG")"; NFT="$(readlink -f "$NFT")"
for t in mkfs.ext4 python3 ldd sha256sum; do
    command -v "$t" >/dev/null || die "$t not found (run scripts/install-vm-deps.sh)"
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
LIBS_ID="$(ldd "$IPR" "$BRG" "$NFT" | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\// {print $1}' | sort -u | xargs sha256sum | sha256sum | cut -c1-16)"
STAMP="script=$(cat "$SELF" "$HERE/modules.py" | sha256sum | cut -c1-64) kernel=$KPKG/$KPKG_VER iproute2=$(cat "$IPR" "$BRG" "$NFT" | sha256sum | cut -c1-16)/$LIBS_ID"
if [ "$FORCE" = 0 ] && [ -s "$CACHE/lab.ext4" ] && [ -s "$CACHE/manifest.json" ] \
    && [ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$STAMP" ]; then
    log "up to date ($KPKG $KPKG_VER)"
    echo "$CACHE"
    exit 0
fi

T0=$(date +%s.%N)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wnodes-guest-igb.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "extracting the modules of $KPKG"
mkdir "$WORK/kpkg"
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$WORK/kpkg" --wildcards \
    "./lib/modules/$KVER/kernel/*" "./lib/modules/$KVER/modules.builtin" "./boot/config-$KVER"
MODDIR="$WORK/kpkg/lib/modules/$KVER"
KCONFIG="$WORK/kpkg/boot/config-$KVER"
LAB="$WORK/lab"
mkdir -p "$LAB/modules" "$LAB/lib" "$LAB/libexec" "$LAB/bin"

# modules in dependency order (guest/modules.py, as guest/build.sh), into modules/order
python3 "$HERE/modules.py" "$MODDIR" "$KCONFIG" "$LAB/modules" "[guest/build-igb]" \
    "lab=$(echo $WANTED | tr ' ' ',')"
mv "$LAB/modules/lab.order" "$LAB/modules/order"

# iproute2: the binaries keep the name `ip` (iproute2 reads a longer argv[0] as `ip <rest>`:
# `ipr` is `ip r`), their libraries and the loader go to lib/, and bin/ wraps them
cp "$IPR" "$LAB/libexec/ip"; cp "$BRG" "$LAB/libexec/bridge"; cp "$NFT" "$LAB/libexec/nft"
for lib in $(ldd "$IPR" "$BRG" "$NFT" | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\// {print $1}' | sort -u); do
    cp "$(readlink -f "$lib")" "$LAB/lib/$(basename "$lib")"
done
LOADER="$(ldd "$IPR" | awk '/^\t\// {print $1}' | xargs basename)"
[ -s "$LAB/lib/$LOADER" ] || die "the dynamic loader was not copied"
for b in ip bridge nft; do
    cat >"$LAB/bin/$b" <<W
#!/bin/sh
# $b (iproute2, nftables) from the build host, run through the loader it was linked for
d=\${0%/bin/*}
exec "\$d/lib/$LOADER" --library-path "\$d/lib" "\$d/libexec/$b" "\$@"
W
done
chmod 755 "$LAB"/bin/* "$LAB"/libexec/* "$LAB"/lib/*
truncate -s 32M "$WORK/lab.ext4"
mkfs.ext4 -q -F -L wnodes-lab -d "$LAB" "$WORK/lab.ext4"
mv -f "$WORK/lab.ext4" "$CACHE/lab.ext4"
python3 - "$CACHE" "$KVER" "$LAB/modules/order" <<'PY'
import hashlib, json, os, sys
cache, kver, order = sys.argv[1:4]
h = hashlib.sha256()
with open(os.path.join(cache, "lab.ext4"), "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
m = {"disk": "lab.ext4", "kernel_version": kver,
     "modules": open(order).read().split(), "sha256": {"lab.ext4": h.hexdigest()}}
tmp = os.path.join(cache, "manifest.json.tmp")
with open(tmp, "w") as fh:
    json.dump(m, fh, indent=2, sort_keys=True)
    fh.write("\n")
os.replace(tmp, os.path.join(cache, "manifest.json"))
PY
echo "$STAMP" >"$CACHE/stamp"
T1=$(date +%s.%N)
log "built in $(python3 -c "print(f'{$T1-$T0:.1f}')") s: lab.ext4 $(du -h "$CACHE/lab.ext4" | cut -f1) used"
echo "$CACHE"
