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
# is nft_meta_bridge's).
WANTED="igb:CONFIG_IGB igbvf:CONFIG_IGBVF 8021q:CONFIG_VLAN_8021Q bridge:CONFIG_BRIDGE veth:CONFIG_VETH tun:CONFIG_TUN nf_tables:CONFIG_NF_TABLES nft_meta_bridge:CONFIG_NFT_BRIDGE_META"

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
STAMP="script=$(sha256sum "$SELF" | cut -c1-64) kernel=$KPKG/$KPKG_VER iproute2=$(cat "$IPR" "$BRG" "$NFT" | sha256sum | cut -c1-16)/$LIBS_ID"
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

# modules in dependency order (depends= and softdep pre: from each .ko, as guest/build.sh)
python3 - "$MODDIR" "$KCONFIG" "$LAB/modules" "$WANTED" <<'PY'
import os, re, shutil, sys
moddir, kconfig, out, wanted = sys.argv[1:5]
config = {}
for line in open(kconfig):
    m = re.match(r"(CONFIG_\w+)=(.*)", line)
    if m:
        config[m.group(1)] = m.group(2)
builtin = {os.path.basename(l.strip())[:-3].replace("-", "_")
           for l in open(os.path.join(moddir, "modules.builtin"))}
path = {}
for root, _, files in os.walk(os.path.join(moddir, "kernel")):
    for f in files:
        if f.endswith(".ko"):
            path[f[:-3].replace("-", "_")] = os.path.join(root, f)
def info(name):
    d = open(path[name], "rb").read()
    dep = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", d)
    soft = re.search(rb"(?:^|\x00)softdep=([^\x00]*)\x00", d)
    deps = [x.replace("-", "_") for x in (dep.group(1).decode().split(",") if dep else []) if x]
    pre = []
    if soft:
        mode = None
        for tok in soft.group(1).decode().split():
            if tok.endswith(":"):
                mode = tok[:-1]
            elif mode == "pre" and tok.replace("-", "_") in path:
                pre.append(tok.replace("-", "_"))
    return pre + deps
order = []
def visit(n, stack=()):
    if n in order or n in builtin:
        return
    if n not in path:
        sys.exit(f"module {n} not found in the kernel package")
    if n in stack:
        sys.exit(f"dependency cycle at {n}")
    for d in info(n):
        visit(d, stack + (n,))
    order.append(n)
for item in wanted.split():
    name, cfg = item.split(":")
    val = config.get(cfg)
    if val == "y":
        continue
    if val != "m":
        sys.exit(f"{cfg} is neither built in nor a module ({val!r})")
    visit(name)
for n in order:
    shutil.copy(path[n], os.path.join(out, n + ".ko"))
open(os.path.join(out, "order"), "w").write("".join(n + "\n" for n in order))
print(f"[guest/build-igb]   modules: {' '.join(order)}", file=sys.stderr)
PY

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
