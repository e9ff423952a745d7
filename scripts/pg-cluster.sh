#!/usr/bin/env bash
# A private PostgreSQL cluster for the tests (scripts/test.sh starts one per run, shared by the
# tests; wnodes_testkit::postgres::Cluster starts one for a test that restarts it).
#
#   scripts/pg-cluster.sh start DIR    initdb into DIR/data, start it on 127.0.0.1 at a free port
#                                      (and a socket in DIR), wait until it accepts connections,
#                                      print its URL (user `wnodes`, trust auth, database postgres)
#   scripts/pg-cluster.sh stop DIR     stop it (fast shutdown), keeping DIR
#   scripts/pg-cluster.sh resume DIR   start a stopped cluster again, on the same port
#
# PostgreSQL refuses to run as root: as root, DIR is given to the `postgres` user (created by
# Debian's package) and the server runs as that user. Durability settings are the defaults
# (fsync on): the stores refuse a server that would lose acknowledged commits.
set -euo pipefail

die() { printf 'pg-cluster: error: %s\n' "$*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: $0 start|stop|resume DIR"
cmd=$1
dir=$2

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -n "${bin}" && -x "${bin}/pg_ctl" ]] \
    || die "no /usr/lib/postgresql/*/bin/pg_ctl (scripts/install-deps.sh postgres installs it)"

as_pg() {
    if [[ "$(id -u)" -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local port
    port=$(cat "${dir}/port")
    as_pg "${bin}/pg_ctl" -D "${dir}/data" -l "${dir}/server.log" -w -t 60 \
        -o "-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c max_connections=400" \
        start >/dev/null || { tail -20 "${dir}/server.log" >&2; die "the server did not start"; }
    echo "postgres://wnodes@127.0.0.1:${port}/postgres"
}

case "${cmd}" in
    start)
        mkdir -p "${dir}"
        [[ ! -e "${dir}/data" ]] || die "${dir}/data exists (resume it, or remove it)"
        if [[ "$(id -u)" -eq 0 ]]; then chown postgres: "${dir}"; fi
        as_pg "${bin}/initdb" -D "${dir}/data" -U wnodes --auth=trust -E UTF8 --no-sync \
            >"${dir}/initdb.log" 2>&1 || { cat "${dir}/initdb.log" >&2; die "initdb failed"; }
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
            >"${dir}/port"
        start
        ;;
    resume) start ;;
    stop) as_pg "${bin}/pg_ctl" -D "${dir}/data" -m fast -w stop >/dev/null ;;
    *) die "unknown command ${cmd} (start, stop, resume)" ;;
esac
