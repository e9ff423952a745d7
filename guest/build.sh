#!/usr/bin/env bash
# Build the WNoDeS test guest (kernel + initrd + "VO image" rootfs) under <repo>/.cache/guest/.
#
#   guest/build.sh            build what is missing / stale, print the cache directory on the last line
#   guest/build.sh --force    rebuild everything (the downloaded .debs are reused)
#
# Outputs (see guest/README.md for the guest contract):
#   vmlinux        uncompressed ELF kernel (PVH entry; boots ~2x faster than the bzImage under TCG)
#   initrd.img     gzip'd newc cpio: static busybox + the kernel modules, /init mounts /dev/vda (ext4)
#                  read-only on /newroot and switch_roots to /sbin/wnodes-init
#   rootfs.ext4    ext4 image: busybox (+ applet links), sshfs + its shared libraries, /sbin/wnodes-init
#   manifest.json  {"kernel","initrd","rootfs","kernel_version","sha256":{file: hex}}
#
# Needs: apt-get/apt-cache/dpkg-deb, python3, mkfs.ext4 (e2fsprogs), gzip, sshfs on the host
# (scripts/install-vm-deps.sh installs them). Does not need root except for apt-get update when
# the package lists are missing. Safe to run concurrently (flock).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${WNODES_GUEST_CACHE:-$REPO/.cache/guest}"
SELF="$HERE/build.sh"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

log() { printf '[guest/build] %s\n' "$*" >&2; }
die() { printf '[guest/build] ERROR: %s\n' "$*" >&2; exit 1; }

for t in apt-get apt-cache dpkg-deb python3 mkfs.ext4 gzip sha256sum; do
    command -v "$t" >/dev/null || die "$t not found (run scripts/install-vm-deps.sh)"
done
SSHFS="$(command -v sshfs || true)"
[ -n "$SSHFS" ] || die "sshfs not found on the host (run scripts/install-vm-deps.sh)"

mkdir -p "$CACHE/debs"
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
# 1. resolve versions (cheap), compute the stamp
# apt-cache is slow here (~0.7 s a call): remember the answers for the current package lists.
LISTS_ID="$(ls -l --time-style=+%s /var/lib/apt/lists 2>/dev/null | sha256sum | cut -c1-16)"
resolve() {
    local kpkg=""
    kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')" || true
    if [ -z "$kpkg" ]; then
        log "apt-get update (linux-image-amd64 unknown)"
        apt-get update -qq >/dev/null
        LISTS_ID="$(ls -l --time-style=+%s /var/lib/apt/lists 2>/dev/null | sha256sum | cut -c1-16)"
        kpkg="$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')"
    fi
    [ -n "$kpkg" ] || die "cannot resolve the kernel package linux-image-amd64 depends on"
    apt-cache policy "$kpkg" busybox-static | awk -v k="$kpkg" '
        /^[^ ]/ {pkg=$1; sub(/:$/, "", pkg)}
        /Candidate:/ {if (pkg == k) kv=$2; else bv=$2}
        END {print "KPKG=" k; print "KPKG_VER=" kv; print "BB_VER=" bv; print "LISTS_ID='"$LISTS_ID"'"}'
}
if [ -f "$CACHE/resolved" ] && grep -qx "LISTS_ID=$LISTS_ID" "$CACHE/resolved"; then
    . "$CACHE/resolved"
else
    resolve >"$CACHE/resolved.tmp"
    mv "$CACHE/resolved.tmp" "$CACHE/resolved"
    . "$CACHE/resolved"
fi
[ -n "${KPKG:-}" ] && [ -n "${KPKG_VER:-}" ] && [ -n "${BB_VER:-}" ] && [ "$KPKG_VER" != "(none)" ] \
    || { rm -f "$CACHE/resolved"; die "cannot resolve versions of the kernel / busybox-static packages"; }
KVER="${KPKG#linux-image-}"
SSHFS_LIBS="$(ldd "$SSHFS" | awk '/=>/ {print $3} /^\t\// {print $1}' | sort -u | xargs sha256sum | sha256sum | cut -c1-16)"
STAMP="script=$(cat "$SELF" "$HERE/modules.py" | sha256sum | cut -c1-64) kernel=$KPKG/$KPKG_VER busybox=$BB_VER sshfs=$(sha256sum "$SSHFS" | cut -c1-16)/$SSHFS_LIBS"

OUTS=(vmlinux initrd.img rootfs.ext4 manifest.json)
all_present() { local f; for f in "${OUTS[@]}"; do [ -s "$CACHE/$f" ] || return 1; done; }
if [ "$FORCE" = 0 ] && all_present && [ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$STAMP" ]; then
    log "up to date ($KPKG $KPKG_VER)"
    echo "$CACHE"
    exit 0
fi

T0=$(date +%s.%N)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/wnodes-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------
# 2. download (only what is not already cached)
deb_file() { # pkg version -> cached file name
    local v="${2//:/%3a}"
    echo "$CACHE/debs/${1}_${v}_amd64.deb"
}
KDEB="$(deb_file "$KPKG" "$KPKG_VER")"
BDEB="$(deb_file busybox-static "$BB_VER")"
need=()
[ -s "$KDEB" ] || need+=("$KPKG=$KPKG_VER")
[ -s "$BDEB" ] || need+=("busybox-static=$BB_VER")
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get download ${need[*]}"
    mkdir "$WORK/dl"
    (cd "$WORK/dl" && apt-get download -qq -o APT::Sandbox::User=root "${need[@]}" >/dev/null)
    # keep only the current versions
    find "$CACHE/debs" -name '*.deb' -delete
    mv "$WORK"/dl/*.deb "$CACHE/debs/"
    [ -s "$KDEB" ] && [ -s "$BDEB" ] || die "download did not produce $KDEB / $BDEB"
fi
T1=$(date +%s.%N)

# ---------------------------------------------------------------------------------------------
# 3. extract
log "extracting $KPKG and busybox-static"
dpkg-deb -x "$KDEB" "$WORK/kpkg" &
dpkg-deb -x "$BDEB" "$WORK/bb"
wait $!
BB="$WORK/bb/bin/busybox"
[ -x "$BB" ] || die "busybox not found in busybox-static"
MODDIR="$WORK/kpkg/lib/modules/$KVER"
KCONFIG="$WORK/kpkg/boot/config-$KVER"
[ -d "$MODDIR/kernel" ] && [ -f "$KCONFIG" ] || die "unexpected layout of $KPKG"

# ---------------------------------------------------------------------------------------------
# 4. vmlinux (ELF) out of the bzImage's XZ payload
log "vmlinux"
python3 - "$WORK/kpkg/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'PY'
import lzma, sys
d = open(sys.argv[1], "rb").read()
i = d.find(b"\xfd7zXZ\x00")
if i < 0:
    sys.exit("no XZ stream in the bzImage")
dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
out = dec.decompress(d[i:])
if not out.startswith(b"\x7fELF"):
    sys.exit("decompressed kernel is not an ELF file")
open(sys.argv[2], "wb").write(out)
PY

# ---------------------------------------------------------------------------------------------
# 5. initrd: busybox + modules in dependency order, per group
#    base: needed to mount the root (virtio pci/blk, ext4 + crc32c) and read the payload (qemu_fw_cfg)
#    net:  virtio_net (only loaded when wnodes.ip= is given)
#    fuse: fuse (only loaded when wnodes.sshfs= is given)
#    nfs:  the NFSv4 client, nfsv4 and what it needs (only loaded when wnodes.nfs= is given)
log "initrd"
IR="$WORK/initrd"
mkdir -p "$IR/bin" "$IR/lib/modules" "$IR/proc" "$IR/sys" "$IR/dev" "$IR/newroot" "$IR/run"
cp "$BB" "$IR/bin/busybox"
python3 "$HERE/modules.py" "$MODDIR" "$KCONFIG" "$IR/lib/modules" "[guest/build]" \
    base=virtio_pci:CONFIG_VIRTIO_PCI,virtio_blk:CONFIG_VIRTIO_BLK,crc32c_generic:CONFIG_CRYPTO_CRC32C,ext4:CONFIG_EXT4_FS,qemu_fw_cfg:CONFIG_FW_CFG_SYSFS \
    net=virtio_net:CONFIG_VIRTIO_NET \
    fuse=fuse:CONFIG_FUSE_FS \
    nfs=nfsv4:CONFIG_NFS_V4
cat >"$IR/init" <<'EOF'
#!/bin/busybox sh
# WNoDeS test guest initrd: load modules, mount /dev/vda (ext4) on /newroot, switch_root to /sbin/wnodes-init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "wnodes-initrd: $*" >/dev/console; }
status() { echo "WNODES $*" >/dev/ttyS2 2>/dev/null; }
fail() { # code message
    say "FATAL: $2"
    status "error=$2"
    status "exit=$1"
    sync
    poweroff -f
}
[ -e /dev/ttyS2 ] && stty -F /dev/ttyS2 raw -echo 2>/dev/null
ROOTMODE=ro
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        wnodes.ip=*) NET=1 ;;
        wnodes.sshfs=*) FUSE=1 ;;
        wnodes.nfs=*) NFS=1 ;;
        rw) ROOTMODE=rw ;;
    esac
done
load() {
    for m in $(cat "/lib/modules/$1.order"); do
        insmod "/lib/modules/$m.ko" || fail 121 "insmod $m failed"
    done
}
load base
[ -n "$NET" ] && load net
[ -n "$FUSE" ] && load fuse
[ -n "$NFS" ] && load nfs
status "phase=modules"
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail 120 "root device /dev/vda not found"
    sleep 0.05
done
mount -t ext4 -o "$ROOTMODE" /dev/vda /newroot || fail 120 "cannot mount /dev/vda on /newroot"
[ -x /newroot/sbin/wnodes-init ] || fail 120 "/sbin/wnodes-init missing in the root image"
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /proc /sys
exec switch_root /newroot /sbin/wnodes-init
EOF
chmod 755 "$IR/init"
(cd "$IR" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null | gzip -6 -n >"$WORK/initrd.img")

# ---------------------------------------------------------------------------------------------
# 6. rootfs.ext4: the VO image
log "rootfs"
RF="$WORK/rootfs"
mkdir -p "$RF"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,root,shared,scratch,lib64}
chmod 1777 "$RF/tmp"
chmod 700 "$RF/root"
cp "$BB" "$RF/bin/busybox"
for a in $("$BB" --list-full); do
    [ -e "$RF/$a" ] || ln -s /bin/busybox "$RF/$a"
done
ln -sf busybox "$RF/bin/sh"
# sshfs + every shared library it needs (+ the dynamic loader), at the paths ldd reports
install -D -m 755 "$SSHFS" "$RF/usr/bin/sshfs"
for lib in $(ldd "$SSHFS" | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\// {print $1}'); do
    install -D -m 755 "$(readlink -f "$lib")" "$RF$lib"
done
[ -e "$RF/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader not copied"
cat >"$RF/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
cat >"$RF/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo wnodes-guest >"$RF/etc/hostname"
echo "127.0.0.1 localhost" >"$RF/etc/hosts"
ln -s /proc/self/mounts "$RF/etc/mtab"
echo "user_allow_other" >"$RF/etc/fuse.conf"
cat >"$RF/sbin/wnodes-init" <<'WNODES_INIT'
#!/bin/sh
# /sbin/wnodes-init: PID 1 of the WNoDeS test guest (busybox sh). Contract: guest/README.md.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022
mountpoint() { # -q DIR: is DIR a mount point (busybox has no mountpoint applet)
    awk -v d="$2" '$2 == d {f = 1} END {exit !f}' /proc/mounts 2>/dev/null
}
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755,size=16m tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/wnodes
hostname -F /etc/hostname 2>/dev/null
for t in /dev/ttyS1 /dev/ttyS2; do stty -F "$t" raw -echo 2>/dev/null; done
# status channel = ttyS2, payload output = ttyS1; the console when qemu was given fewer serial ports
uart() { awk -v n="$1:" '$1 == n && $2 != "uart:unknown" {f = 1} END {exit !f}' /proc/tty/driver/serial 2>/dev/null; }
if uart 2; then exec 3>/dev/ttyS2; else exec 3>/dev/console; fi
if uart 1; then exec 4>/dev/ttyS1; else exec 4>/dev/console; fi
exec </dev/null >/dev/console 2>&1

say() { echo "wnodes-init: $*"; }
status() { echo "WNODES $*" >&3; }

finish() { # exit code
    trap '' TERM INT
    say "cleanup"
    sync
    if mountpoint -q /shared; then umount /shared 2>/dev/null || umount -l /shared; fi
    kill -TERM -1 2>/dev/null; sleep 0.2; kill -KILL -1 2>/dev/null
    if mountpoint -q /scratch; then umount /scratch 2>/dev/null || mount -o remount,ro /scratch; fi
    exec 4>&-             # last close of ttyS1: waits until the payload's output is sent
    sync
    status "exit=$1"
    say "exit=$1, powering off"
    exec 3>&-             # same for the status line
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}
fail() { # code message
    say "FATAL: $2"
    status "error=$2"
    finish "$1"
}

IP= GW= SSHFS= NFS= SCRATCH= JUID= JGID=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        wnodes.ip=*) IP="${arg#wnodes.ip=}" ;;
        wnodes.gw=*) GW="${arg#wnodes.gw=}" ;;
        wnodes.sshfs=*) SSHFS="${arg#wnodes.sshfs=}" ;;
        wnodes.nfs=*) NFS="${arg#wnodes.nfs=}" ;;
        wnodes.scratch=*) SCRATCH="${arg#wnodes.scratch=}" ;;
        wnodes.uid=*) JUID="${arg#wnodes.uid=}" ;;
        wnodes.gid=*) JGID="${arg#wnodes.gid=}" ;;
    esac
done
say "started, kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"

# modules: the initrd loaded them (virtio_net only with wnodes.ip=, fuse only with wnodes.sshfs=,
# the NFSv4 client only with wnodes.nfs=)
[ -d /sys/firmware/qemu_fw_cfg ] || fail 121 "qemu_fw_cfg driver not available"
ip link set lo up 2>/dev/null

if [ -n "$IP" ]; then
    status "phase=network"
    i=0; IF=
    while [ -z "$IF" ]; do
        for n in /sys/class/net/*; do
            n="${n##*/}"; [ "$n" = lo ] || { IF="$n"; break; }
        done
        [ -n "$IF" ] && break
        i=$((i + 1)); [ $i -gt 100 ] && fail 122 "no network interface"
        sleep 0.05
    done
    ip link set "$IF" up || fail 122 "ip link set $IF up failed"
    ip addr add "$IP" dev "$IF" || fail 122 "ip addr add $IP dev $IF failed"
    if [ -n "$GW" ]; then
        ip route add default via "$GW" || fail 122 "ip route add default via $GW failed"
    fi
    say "network: $IF $IP gw ${GW:-none}"
fi

if [ -n "$SCRATCH" ]; then
    status "phase=scratch"
    i=0
    while [ ! -b "$SCRATCH" ]; do
        i=$((i + 1)); [ $i -gt 100 ] && fail 123 "scratch device $SCRATCH not found"
        sleep 0.05
    done
    mount -t ext4 "$SCRATCH" /scratch || fail 123 "cannot mount $SCRATCH on /scratch"
    say "scratch: $SCRATCH on /scratch"
fi

if [ -n "$SSHFS" ]; then
    status "phase=shared"
    S_HOST="${SSHFS%%:*}"; rest="${SSHFS#*:}"
    S_PORT="${rest%%:*}"; S_PATH="${rest#*:}"
    [ -n "$S_HOST" ] && [ -n "$S_PORT" ] && [ -n "$S_PATH" ] && [ "$rest" != "$S_PORT" ] \
        || fail 124 "bad wnodes.sshfs=$SSHFS (want host:port:/path)"
    # the host side is a plain TCP listener piping into sftp-server (no ssh): directport
    ok=
    for try in 1 2 3 4 5; do
        if sshfs -o "directport=$S_PORT,reconnect,allow_other" "$S_HOST:$S_PATH" /shared; then
            ok=1; break
        fi
        sleep 1
    done
    [ -n "$ok" ] || fail 124 "sshfs mount of $S_HOST:$S_PORT:$S_PATH failed"
    say "shared: $S_HOST:$S_PATH (port $S_PORT) on /shared"
fi

if [ -n "$NFS" ]; then
    status "phase=shared"
    N_HOST="${NFS%%:*}"; rest="${NFS#*:}"
    N_PORT="${rest%%:*}"; N_PATH="${rest#*:}"
    [ -n "$N_HOST" ] && [ -n "$N_PORT" ] && [ -n "$N_PATH" ] && [ "$rest" != "$N_PORT" ] \
        || fail 124 "bad wnodes.nfs=$NFS (want host:port:/path)"
    [ -n "$IP" ] || fail 124 "wnodes.nfs= needs wnodes.ip= (the export names this VM's address)"
    # NFSv4.1 over TCP, text options straight to the kernel (no mount.nfs, no rpcbind)
    opts="vers=4.1,proto=tcp,port=$N_PORT,addr=$N_HOST,clientaddr=${IP%%/*},hard,timeo=600"
    ok=
    for try in 1 2 3 4 5; do
        if mount -t nfs4 -o "$opts" "$N_HOST:$N_PATH" /shared; then
            ok=1; break
        fi
        sleep 1
    done
    [ -n "$ok" ] || fail 124 "nfs mount of $N_HOST:$N_PORT:$N_PATH failed"
    say "shared: nfs4 $N_HOST:$N_PATH (port $N_PORT) on /shared"
fi

JOB=/sys/firmware/qemu_fw_cfg/by_name/opt/wnodes/job.sh/raw
[ -r "$JOB" ] || fail 125 "no payload (fw_cfg opt/wnodes/job.sh missing)"
cat "$JOB" >/run/wnodes/job.sh || fail 125 "cannot read the payload"
chmod 755 /run/wnodes/job.sh

WD=/
if mountpoint -q /shared; then WD=/shared; elif mountpoint -q /scratch; then WD=/scratch; fi

RUNAS=
if [ -n "$JUID" ] && [ "$JUID" != 0 ]; then
    [ -n "$JGID" ] || JGID="$JUID"
    case "$JUID$JGID" in *[!0-9]*) fail 125 "bad wnodes.uid/gid" ;; esac
    RUNAS=wnjob
    cp /etc/passwd /run/wnodes/passwd
    echo "wnjob:x:$JUID:$JGID:wnodes job:$WD:/bin/sh" >>/run/wnodes/passwd
    mount --bind /run/wnodes/passwd /etc/passwd || fail 125 "cannot install the job user"
    mountpoint -q /scratch && chown "$JUID:$JGID" /scratch
fi

status "phase=payload-start"
say "payload start in $WD${RUNAS:+ as uid $JUID gid $JGID}"
cd "$WD"
if [ -n "$RUNAS" ]; then
    su -s /bin/sh "$RUNAS" -c "cd '$WD' && exec /bin/sh /run/wnodes/job.sh" </dev/null >&4 2>&4 3>&- 4>&-
else
    HOME="$WD" /bin/sh /run/wnodes/job.sh </dev/null >&4 2>&4 3>&- 4>&-
fi
RC=$?
say "payload exited with $RC"
finish "$RC"
WNODES_INIT
chmod 755 "$RF/sbin/wnodes-init"
truncate -s 64M "$WORK/rootfs.ext4"
mkfs.ext4 -q -F -L wnodes-vo -d "$RF" "$WORK/rootfs.ext4"

# ---------------------------------------------------------------------------------------------
# 7. install into the cache, manifest last
for f in vmlinux initrd.img rootfs.ext4; do
    mv -f "$WORK/$f" "$CACHE/$f"
done
python3 - "$CACHE" "$KVER" <<'PY'
import hashlib, json, os, sys
cache, kver = sys.argv[1:3]
files = {"kernel": "vmlinux", "initrd": "initrd.img", "rootfs": "rootfs.ext4"}
sha = {}
for f in files.values():
    h = hashlib.sha256()
    with open(os.path.join(cache, f), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    sha[f] = h.hexdigest()
m = dict(files, kernel_version=kver, sha256=sha)
tmp = os.path.join(cache, "manifest.json.tmp")
with open(tmp, "w") as fh:
    json.dump(m, fh, indent=2, sort_keys=True)
    fh.write("\n")
os.replace(tmp, os.path.join(cache, "manifest.json"))
PY
echo "$STAMP" >"$CACHE/stamp"
T2=$(date +%s.%N)
log "built $KPKG ($KPKG_VER) in $(python3 -c "print(f'{$T2-$T1:.1f}')") s (download $(python3 -c "print(f'{$T1-$T0:.1f}')") s):" \
    "$(cd "$CACHE" && du -h --apparent-size vmlinux initrd.img rootfs.ext4 | tr '\t\n' '= ' )"
echo "$CACHE"
