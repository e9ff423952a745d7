# shellcheck shell=bash disable=SC2154  # $root comes from the caller
# Shared by scripts/compose-demo.sh and scripts/compose-nats-loss.sh (sourced, not run):
# Docker from Debian's packages, the images (base from debootstrap, stand-ins, the project's
# image from host-built release binaries), the stack up and down, one job submitted through a
# hypervisor's job starter, and the questions asked of the stack afterwards.
# Expects $root (the repository) and `set -euo pipefail` from the caller.

COMPOSE_DIR="$root/compose"
COMPOSE_PROJECT=${WNODES_COMPOSE_PROJECT:-wnodes}
# The release binaries the images carry.
WNODES_BINS=(wnodes-bridge wnodes-accounting wnodes-image wnodes-scratch wnodes-network
    wnodes-gateway wnodes-launcher wnodesctl)
# What a VM job's payload is given (as wnodes-dev demo).
JOB_USER=nobody
JOB_UID=65534
JOB_GID=65534

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# docker-compose (v1) or `docker compose`, with the build override unless WNODES_COMPOSE_PUBLIC=1
# (then the public images of docker-compose.yml are used as they are).
# Where root's capability bounding set is not full, docker-compose.caps.yml replaces the
# hypervisors' `privileged: true` (which would fail) by the capabilities they use.
dc() {
    local files=(-f "$COMPOSE_DIR/docker-compose.yml")
    [[ ${WNODES_COMPOSE_PUBLIC:-0} == 1 ]] || files+=(-f "$COMPOSE_DIR/docker-compose.build.yml")
    full_caps || files+=(-f "$COMPOSE_DIR/docker-compose.caps.yml")
    if [[ -n ${DC_V2:-} ]]; then
        docker compose -p "$COMPOSE_PROJECT" "${files[@]}" "$@"
    else
        docker-compose -p "$COMPOSE_PROJECT" "${files[@]}" "$@"
    fi
}

# Whether this process holds every capability the kernel knows (CapBnd = 2^(last+1) - 1).
full_caps() {
    local bnd last
    bnd=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
    last=$(cat /proc/sys/kernel/cap_last_cap)
    [[ $((16#$bnd)) == $(((1 << (last + 1)) - 1)) ]]
}

# The compose command line dc runs, for the user (relative to the repository).
dc_hint() {
    local cmd="docker-compose"
    [[ -n ${DC_V2:-} ]] && cmd="docker compose"
    cmd+=" -p $COMPOSE_PROJECT -f compose/docker-compose.yml"
    [[ ${WNODES_COMPOSE_PUBLIC:-0} == 1 ]] || cmd+=" -f compose/docker-compose.build.yml"
    full_caps || cmd+=" -f compose/docker-compose.caps.yml"
    echo "$cmd"
}

# Docker Engine and Compose from Debian's packages when missing; dockerd started when not
# running (its log: /var/log/wnodes-compose-dockerd.log).
ensure_docker() {
    [[ $(id -u) -eq 0 ]] || die "run as root (dockerd, privileged hypervisor containers)"
    local missing=() p
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! command -v docker-compose >/dev/null && docker compose version >/dev/null 2>&1; then
        DC_V2=1
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: /var/log/wnodes-compose-dockerd.log)"
        setsid dockerd >/var/log/wnodes-compose-dockerd.log 2>&1 </dev/null &
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
        docker info >/dev/null 2>&1 || die "dockerd did not start: /var/log/wnodes-compose-dockerd.log"
    fi
}

# The pinned nats-server, the test guest, the release binaries (built on the host, never in
# docker), staged into the image contexts; the base image; every image of the stack.
build_images() {
    "$root/scripts/install-deps.sh" nats >&2
    "$root/guest/build.sh" >&2
    log "cargo build --release (the services, wnodesctl, wnodes-trace-sink)"
    (cd "$root" && cargo build -q --release -p wnodes-bridge -p wnodes-accounting -p wnodes-image \
        -p wnodes-scratch -p wnodes-network -p wnodes-gateway -p wnodes-launcher -p wnodesctl \
        -p wnodes-devstack --bin wnodes-bridge --bin wnodes-accounting --bin wnodes-image \
        --bin wnodes-scratch --bin wnodes-network --bin wnodes-gateway --bin wnodes-launcher \
        --bin wnodesctl --bin wnodes-trace-sink)
    local rel="$root/target/release" images="$COMPOSE_DIR/images" b
    mkdir -p "$images/wnodes/bin" "$images/nats/bin" "$images/trace-sink/bin"
    for b in "${WNODES_BINS[@]}"; do
        cp -f "$rel/$b" "$images/wnodes/bin/$b"
    done
    cp -f "$rel/wnodes-trace-sink" "$images/trace-sink/bin/"
    cp -f "$root/.tools/bin/nats-server" "$images/nats/bin/"
    WNODES_COMPOSE_BASE=$("$images/base/build-base.sh")
    export WNODES_COMPOSE_BASE
    log "docker-compose build (on $WNODES_COMPOSE_BASE)"
    dc build -q >&2
}

# Removes the stack: containers, networks, volumes, and compose/run (keys, creds).
stack_down() {
    dc --profile tools down -v --remove-orphans >/dev/null 2>&1 || dc down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$COMPOSE_DIR/run"
}

# The scripts' EXIT trap: takes the stack down unless $keep is 1 (then says how), removes the
# script's scratch directory $work when it made one, and exits with the script's status.
finish() {
    local rc=$?
    if [[ ${keep:-0} == 1 ]]; then
        echo "== stack kept; to remove it: $(dc_hint) down -v; rm -rf compose/run"
    else
        stack_down
        echo "== stack down"
    fi
    [[ -n ${work:-} ]] && rm -rf "$work"
    exit "$rc"
}

# `up -d`, then waits until every service answers /readyz with 200 (at most $1 seconds).
stack_up() {
    local limit=${1:-300} t0=$SECONDS
    stack_down
    mkdir -p "$COMPOSE_DIR/run"
    dc up -d >&2 || {
        dc logs --tail 40 init streams >&2 || true
        die "docker-compose up failed"
    }
    local pending
    while :; do
        pending=$(not_ready)
        [[ -z $pending ]] && break
        if ((SECONDS - t0 > limit)); then
            dc ps >&2 || true
            dc logs --tail 30 >&2 || true
            die "not ready after ${limit} s:${pending}"
        fi
        sleep 2
    done
}

# The services not answering /readyz with 200 yet (" hv1/launcher bridge …").
not_ready() {
    local out="" c p s
    for c in bridge:9600 accounting:9610; do
        dc exec -T "${c%%:*}" curl -fsS -o /dev/null "http://127.0.0.1:${c#*:}/readyz" >/dev/null 2>&1 ||
            out+=" ${c%%:*}"
    done
    for h in hv1 hv2; do
        p=9601
        for s in image scratch network gateway launcher; do
            dc exec -T "$h" curl -fsS -o /dev/null "http://127.0.0.1:$p/readyz" >/dev/null 2>&1 ||
                out+=" $h/$s"
            p=$((p + 1))
        done
    done
    echo "$out"
}

# submit HOST JOB_ID SCRIPT_TEXT OUTDIR: the job starter (`wnodes-bridge submit`) on that
# hypervisor, as an LRMS would run it there. Writes OUTDIR/{stdout,stderr,rc,wall}.
submit() {
    local host=$1 job=$2 script=$3 out=$4 t0 rc
    mkdir -p "$out"
    printf '%s' "$script" | dc exec -T "$host" sh -c "cat > /tmp/job-$job.sh"
    t0=$(date +%s.%N)
    set +e
    dc exec -T "$host" wnodes-bridge submit --vo demo --user "$JOB_USER" --uid "$JOB_UID" \
        --gid "$JOB_GID" --job-id "$job" --script "/tmp/job-$job.sh" \
        >"$out/stdout" 2>"$out/stderr"
    rc=$?
    set -e
    echo "$rc" >"$out/rc"
    python3 -c 'import sys,time; print(f"{time.time()-float(sys.argv[1]):.1f}")' "$t0" >"$out/wall"
}

# The run key of a job id (LRMS unspecified, attempt 1).
run_key() { echo "WNODES-COMPOSE/unknown/$1/1"; }

# `wnodesctl job RUN --json` as the monitor (the backlog exporter's container holds its creds),
# through the first of the three NATS servers that answers.
job_json() {
    local n
    for n in 1 2 3; do
        dc exec -T backlog wnodesctl job --nats "nats://nats-$n:4222" \
            --creds /etc/wnodes/nats/creds/monitor.creds --json "$1" 2>/dev/null && return 0
    done
    return 1
}

# psql in the postgres container (tab-separated, no header).
psql_q() {
    dc exec -T postgres psql -U wnodes -d wnodes -tA -F $'\t' -c "$1"
}
