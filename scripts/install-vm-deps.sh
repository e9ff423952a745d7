#!/usr/bin/env bash
# Install (through apt) what the VM path of WNoDeS needs, when it is missing.
#
#   * qemu-system-x86 10.0.x from bookworm-backports, through a SIDE apt configuration kept under
#     <repo>/.tools/apt-bpo/ (git-ignored). The machine image already carries qemu-utils 10.0.2 from
#     backports; installing qemu-system-x86 from plain bookworm (7.2) would REMOVE it, so we never do that.
#     The mirror URIs are derived from the machine's own apt sources (no host name is written here).
#   * plain bookworm packages: sshfs fuse3 openssh-sftp-server nftables iproute2 e2fsprogs cpio python3
#     (python3 is used by guest/build.sh to unpack the kernel).
#
# Idempotent; when everything is present it only runs dpkg queries (well under a second).
# Must run as root. Prints one line per step.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BPO_DIR="$REPO/.tools/apt-bpo"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-vm-deps] %s\n' "$*"; }
die() { printf '[install-vm-deps] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get install)"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"

# installed <pkg>: true when dpkg reports the package fully installed.
installed() {
    dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

# installed_version <pkg>
installed_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

APT_UPDATED=0
# ensure_apt pkg...: install the missing ones from the machine's normal apt sources;
# `apt-get update` only runs when something has to be installed (once per invocation).
ensure_apt() {
    local missing=() p
    for p in "$@"; do
        installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "ok: $* already installed"
        return 0
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update (needed for: ${missing[*]})"
        apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2> >(grep -v "^debconf: delaying" >&2)
    for p in "${missing[@]}"; do
        installed "$p" || die "$p still not installed after apt-get install"
    done
    log "installed: ${missing[*]}"
}

# ---------------------------------------------------------------------------------------------
# Side apt configuration for bookworm-backports.
# Writes $BPO_DIR/sources.list from the machine's sources (deb822 *.sources files and one-line
# *.list / sources.list), adding <codename>-backports next to every URI that carries <codename>.
write_bpo_sources() {
    local codename out
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || die "cannot read VERSION_CODENAME from /etc/os-release"
    out="$BPO_DIR/sources.list.new"
    mkdir -p "$BPO_DIR/lists/partial" "$BPO_DIR/archives/partial"
    python3 - "$codename" "$out" <<'PY' 2>/dev/null || write_bpo_sources_sh "$codename" "$out"
import glob, re, sys
codename, out = sys.argv[1], sys.argv[2]
default_key = "/usr/share/keyrings/debian-archive-keyring.gpg"
entries = []  # (uri, suite, components, signed_by)
def add(uris, suites, comps, key):
    for u in uris:
        for s in suites:
            entries.append((u.rstrip("/"), s, comps, key or default_key))
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(f).read()):
        fields, last = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and last:
                fields[last] += " " + line.strip(); continue
            k, _, v = line.partition(":"); last = k.strip().lower(); fields[last] = v.strip()
        if fields.get("enabled", "yes").lower() == "no": continue
        if "deb" not in fields.get("types", "").split(): continue
        add(fields.get("uris", "").split(), fields.get("suites", "").split(),
            fields.get("components", "main").split(), fields.get("signed-by", ""))
for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try: lines = open(f).read().splitlines()
    except OSError: continue
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "): continue
        opts = ""
        m = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        if m: opts, rest = m.group(1), m.group(2)
        else: rest = line[4:]
        parts = rest.split()
        if len(parts) < 2: continue
        key = ""
        for o in opts.split():
            if o.startswith("signed-by="): key = o.split("=", 1)[1]
        add([parts[0]], [parts[1]], parts[2:] or ["main"], key)
# keep only Debian-archive-like entries for our codename family
entries = [e for e in entries if e[1] == codename or e[1].startswith(codename + "-") or e[1].startswith(codename + "/")]
if not entries: sys.exit(1)
seen, lines = set(), []
for u, s, comps, key in entries:
    if "main" not in comps: comps = ["main"] + comps
    if (u, s) in seen: continue
    seen.add((u, s)); lines.append(f"deb [signed-by={key}] {u} {s} main")
for u, s, comps, key in list(entries):
    if s == codename and (u, codename + "-backports") not in seen:
        seen.add((u, codename + "-backports"))
        lines.append(f"deb [signed-by={key}] {u} {codename}-backports main")
if not any(l.split()[-2] == codename + "-backports" for l in lines): sys.exit(1)
open(out, "w").write("\n".join(lines) + "\n")
PY
    [ -s "$out" ] || die "could not derive the Debian mirror from /etc/apt/sources*"
    if [ -f "$BPO_DIR/sources.list" ] && cmp -s "$out" "$BPO_DIR/sources.list"; then
        rm -f "$out"
    else
        mv "$out" "$BPO_DIR/sources.list"
        rm -f "$BPO_DIR/.updated"
    fi
}

# Fallback without python3 (only deb822 debian.sources, the Debian image default).
write_bpo_sources_sh() {
    local codename="$1" out="$2" f uris suites key
    f=/etc/apt/sources.list.d/debian.sources
    [ -f "$f" ] || return 1
    : >"$out"
    awk -v RS= -F'\n' -v cn="$codename" '
        {
          uris=""; suites=""; key="/usr/share/keyrings/debian-archive-keyring.gpg"; types=""
          for (i=1;i<=NF;i++) {
            if ($i ~ /^Types:/)     { types=$i;  sub(/^Types:[ \t]*/, "", types) }
            if ($i ~ /^URIs:/)      { uris=$i;   sub(/^URIs:[ \t]*/, "", uris) }
            if ($i ~ /^Suites:/)    { suites=$i; sub(/^Suites:[ \t]*/, "", suites) }
            if ($i ~ /^Signed-By:/) { key=$i;    sub(/^Signed-By:[ \t]*/, "", key) }
          }
          if (types !~ /(^| )deb( |$)/) next
          nu=split(uris, U, " "); ns=split(suites, S, " ")
          for (a=1;a<=nu;a++) { bpo=0
            for (b=1;b<=ns;b++) { print "deb [signed-by=" key "] " U[a] " " S[b] " main"; if (S[b]==cn) bpo=1 }
            if (bpo) print "deb [signed-by=" key "] " U[a] " " cn "-backports main"
          }
        }' "$f" >"$out"
    grep -q -- "-backports main" "$out"
}

bpo_apt() {
    apt-get \
        -o Dir::Etc::sourcelist="$BPO_DIR/sources.list" \
        -o Dir::Etc::sourceparts=- \
        -o Dir::State::lists="$BPO_DIR/lists" \
        -o Dir::Cache::archives="$BPO_DIR/archives" \
        -o APT::Sandbox::User=root \
        "$@"
}

# ensure_bpo pkg version-prefix: install <pkg> from <codename>-backports with the side config
# unless a version starting with <version-prefix> (epoch included) is installed.
ensure_bpo() {
    local pkg="$1" want="$2" have codename
    have="$(installed_version "$pkg")"
    if installed "$pkg" && [[ "$have" == "$want"* ]]; then
        log "ok: $pkg $have already installed"
        return 0
    fi
    if installed "$pkg"; then
        log "note: $pkg $have installed, want ${want}*: upgrading from backports"
    fi
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    write_bpo_sources
    log "side apt config: $BPO_DIR/sources.list ($(grep -c . "$BPO_DIR/sources.list") entries)"
    log "apt-get update (side config, backports)"
    bpo_apt update -qq >/dev/null
    touch "$BPO_DIR/.updated"
    # Dry run first: never remove anything (in particular the image's qemu-utils 10.0.2).
    if bpo_apt install -s --no-install-recommends -t "$codename-backports" "$pkg" | grep -q '^Remv '; then
        bpo_apt install -s --no-install-recommends -t "$codename-backports" "$pkg" | grep '^Remv ' >&2
        die "installing $pkg from $codename-backports would remove packages; refusing"
    fi
    log "apt-get install -t $codename-backports $pkg (side config)"
    bpo_apt install -y -qq --no-install-recommends -t "$codename-backports" "$pkg" >/dev/null 2> >(grep -v "^debconf: delaying" >&2)
    have="$(installed_version "$pkg")"
    [[ "$have" == "$want"* ]] || die "$pkg installed as '$have', expected ${want}*"
    log "installed: $pkg $have"
}

# ---------------------------------------------------------------------------------------------
# python3 first: the side-config writer and guest/build.sh use it.
ensure_apt python3
ensure_bpo qemu-system-x86 "1:10.0."
# qemu-img: the launcher inspects qcow2 images with it before starting them.
ensure_bpo qemu-utils "1:10.0."
ensure_apt sshfs fuse3 openssh-sftp-server
ensure_apt nftables iproute2
ensure_apt e2fsprogs cpio
# socat: the launcher's user-mode storage test pipes a port to sftp-server with it.
# util-linux: setpriv (the gateway drops to the job's uid), unshare.
ensure_apt socat util-linux
# lvm2: the scratch service's LVM backend (its tests run lvm in metadata-only mode on a loop
# device: docs/scratch-and-image-cache.md).
ensure_apt lvm2
# The gateway's NFS backends (docs/storage-gateway-nfs.md): nfs-ganesha (userspace, FSAL VFS) and
# the private dbus-daemon its export manager talks on; nfs-kernel-server for `exportfs` (its
# tests keep the export table in a private mount namespace; no nfsd runs on these hosts).
ensure_apt nfs-ganesha nfs-ganesha-vfs dbus-daemon dbus-bin nfs-kernel-server
# openssl and voms-clients: the host agent's X.509 proxy test makes its PKI with openssl and its
# proxies with Debian's voms-proxy-fake (services/agent/tests/proxy.rs).
ensure_apt openssl voms-clients
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not on PATH after install"
command -v qemu-img >/dev/null || die "qemu-img not on PATH after install"
log "done: $(qemu-system-x86_64 --version | head -n1)"
