#!/usr/bin/env bash
# Builds the compose stack's base image without a container registry: `debootstrap` a Debian
# bookworm minbase with the packages in packages.txt, then `docker import` it as
# wnodes-compose-base:<key>, where <key> is the first 16 hex digits of the sha256 of
# packages.txt and this script. The root file system is cached as a tarball under
# $WNODES_COMPOSE_CACHE (default /var/cache/wnodes-compose), outside the clone, so a second run
# (or a `docker system prune`) only re-imports it.
#
# The Debian mirror is the one this host's apt already uses for bookworm/main (read from
# `apt-cache policy`), or $WNODES_COMPOSE_MIRROR. Prints the image reference on stdout; progress
# goes to stderr. Needs root, debootstrap and a running dockerd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${WNODES_COMPOSE_CACHE:-/var/cache/wnodes-compose}
suite=bookworm
log() { printf 'compose-base: %s\n' "$*" >&2; }
die() { printf 'compose-base: error: %s\n' "$*" >&2; exit 1; }

key=$(cat "$here/packages.txt" "$here/build-base.sh" | sha256sum | cut -c1-16)
image="wnodes-compose-base:$key"
if docker image inspect "$image" >/dev/null 2>&1; then
    log "$image already present"
    echo "$image"
    exit 0
fi
tarball="$cache/base-$key.tar"
if [[ ! -s $tarball ]]; then
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
    mirror=${WNODES_COMPOSE_MIRROR:-}
    if [[ -z $mirror ]]; then
        mirror=$(apt-cache policy | awk -v s="$suite/main" '$3 == s && $4 == "amd64" { print $2; exit }')
    fi
    [[ -n $mirror ]] || die "no apt source for $suite/main on this host: set WNODES_COMPOSE_MIRROR"
    main_pkgs=() bpo_pkgs=()
    while read -r line; do
        line=${line%%#*}
        line=$(echo "$line" | xargs)
        [[ -z $line ]] && continue
        if [[ $line == bpo:* ]]; then
            bpo_pkgs+=("$(echo "${line#bpo:}" | xargs)")
        else
            main_pkgs+=("$line")
        fi
    done <"$here/packages.txt"
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs-$key.XXXXXX")
    trap 'umount -R "$root/proc" 2>/dev/null || true; rm -rf "$root"' EXIT
    log "debootstrap $suite (minbase) from $mirror into $root"
    t0=$SECONDS
    debootstrap --variant=minbase --include="$(IFS=,; echo "${main_pkgs[*]}")" \
        "$suite" "$root" "$mirror" >&2
    if [[ ${#bpo_pkgs[@]} -gt 0 ]]; then
        log "installing ${bpo_pkgs[*]} from $suite-backports"
        printf 'deb %s %s main\ndeb %s %s-backports main\n' "$mirror" "$suite" "$mirror" "$suite" \
            >"$root/etc/apt/sources.list"
        mount -t proc proc "$root/proc"
        chroot "$root" apt-get update -qq >&2
        chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -t "$suite-backports" "${bpo_pkgs[@]}" >&2
        umount "$root/proc"
    fi
    # The stand-ins start their own daemons: nothing is started at install time in a chroot,
    # and the Debian cluster that postgresql-common made is not used (the postgres stand-in
    # runs initdb into its volume, as the public image does).
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/lib/postgresql/15/main "$root"/etc/postgresql/15/main
    log "packing $tarball"
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    log "root file system built in $((SECONDS - t0)) s"
fi
log "docker import $tarball as $image"
docker import "$tarball" "$image" >/dev/null
echo "$image"
