#!/usr/bin/env bash
# A private one-node Slurm 22.05 cluster on this machine (docs/slurm.md): its own munge key and
# socket, a private MariaDB for slurmdbd (so that `sacct` works as at a site), slurmdbd,
# slurmctld and slurmd on free ports, and WNoDeS's job_submit/lua filter, which makes every
# ordinary `sbatch` job run inside a WNoDeS VM (slurm/job_submit.lua,
# slurm/wnodes-slurm-job-starter). No systemd units: the daemons are started by this script,
# as root, with their state under STATE_DIR.
#
#   scripts/slurm-cluster.sh start [STATE_DIR]  install what is missing (apt), configure, start
#                                               everything; on a running cluster: say so
#   scripts/slurm-cluster.sh stop [STATE_DIR]   stop everything `start` started (state is kept)
#   scripts/slurm-cluster.sh env [STATE_DIR]    the export a client needs (eval "$(... env)"):
#                                               SLURM_CONF; the munge socket, which Slurm's
#                                               clients read from slurm.conf, as a comment
#   scripts/slurm-cluster.sh status [STATE_DIR] which daemons run; exit 0 when all do
#
# STATE_DIR defaults to /var/tmp/wnodes-slurm. Every phase prints what it does (on stderr); a
# daemon that does not come up fails the script with the tail of its log.
#
# Choices for this project's machines (cgroup v1, no systemd as PID 1, several clusters at once:
# scripts/test.sh starts its own): ProctrackType=proctrack/linuxproc and TaskPlugin=task/none.
# proctrack/cgroup and task/cgroup did run a job here (slurmd made /sys/fs/cgroup/freezer/
# slurm_<node>), but every cluster on the machine has the same node name and counts job ids from
# 1, so their cgroups (slurm_<node>/uid_<uid>/job_<id>) would collide. SlurmUser=root (the
# daemons and their state are this script's).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
state=${2:-/var/tmp/wnodes-slurm}

say() { printf 'slurm-cluster: %s\n' "$*" >&2; }
die() { printf 'slurm-cluster: error: %s\n' "$*" >&2; exit 1; }
[[ "${cmd}" =~ ^(start|stop|env|status)$ ]] \
    || die "usage: $0 start|stop|env|status [STATE_DIR]"

plugins=/usr/lib/x86_64-linux-gnu/slurm-wlm
etc=${state}/etc
run=${state}/run
log=${state}/log
conf=${etc}/slurm.conf
munge_socket=${run}/munge/munge.socket.2
mysql_socket=${run}/mysql/mysqld.sock

tail_log() { # file
    if [[ -f "$1" ]]; then
        echo "--- last lines of $1:" >&2
        tail -n 25 "$1" >&2
    else
        echo "--- $1 does not exist" >&2
    fi
}

# The pid in a pid file when that process is alive.
alive() { # pidfile
    local pid
    [[ -f "$1" ]] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null
}

pidfile() { # daemon
    case "$1" in
        munged) echo "${run}/munge/munged.pid" ;;
        mariadbd) echo "${run}/mysql/mysqld.pid" ;;
        *) echo "${run}/$1.pid" ;;
    esac
}

daemons=(munged mariadbd slurmdbd slurmctld slurmd)

status() {
    local d all=0
    for d in "${daemons[@]}"; do
        if alive "$(pidfile "$d")"; then
            say "${d}: running (pid $(cat "$(pidfile "$d")"))"
        else
            say "${d}: not running"
            all=1
        fi
    done
    return "${all}"
}

env_lines() {
    [[ -f "${conf}" ]] || die "no cluster configured in ${state} (run: $0 start ${state})"
    echo "export SLURM_CONF=${conf}"
    # Slurm's clients find the munge socket in slurm.conf (AuthInfo, AccountingStoragePass).
    echo "# munge socket: ${munge_socket} (munge -S ${munge_socket})"
}

# Waits up to $1 seconds for command "${@:2}" to succeed; the daemon's log on failure.
wait_for() { # seconds what logfile cmd...
    local secs=$1 what=$2 logf=$3
    shift 3
    local i
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    tail_log "${logf}"
    die "${what} not ready within ${secs} s"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install() {
    local need=()
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    command -v slurmdbd >/dev/null || need+=(slurmdbd)
    command -v sbatch >/dev/null || need+=(slurm-client)
    command -v munged >/dev/null || need+=(munge)
    command -v mariadbd >/dev/null || need+=(mariadb-server)
    [[ -f "${plugins}/job_submit_lua.so" ]] || need+=(slurm-wlm-basic-plugins)
    [[ -f "${plugins}/accounting_storage_mysql.so" ]] || need+=(slurm-wlm-mysql-plugin)
    command -v python3 >/dev/null || need+=(python3)
    if ((${#need[@]})); then
        say "installing through apt: ${need[*]}"
        [[ "$(id -u)" -eq 0 ]] || die "installing needs root"
        # No systemd here: invoke-rc.d's policy (or its missing init) keeps the packages'
        # own daemons (the system's munged and MariaDB) from starting.
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" \
            >"${state}/apt.log" 2>&1 || { tail_log "${state}/apt.log"; die "apt-get install failed"; }
    else
        say "installed: slurmctld slurmd slurmdbd slurm-client munge mariadb-server, job_submit/lua ($(slurmctld -V))"
    fi
    # job_submit_lua.so links Lua 5.1 (liblua5.1-0, a dependency of the plugins' package).
    # grep reads all of ldd's output (not -q): with pipefail, an early exit of grep would fail
    # the pipeline through ldd's SIGPIPE, at random.
    ldd "${plugins}/job_submit_lua.so" | grep 'liblua5.1.so.0 => /' >/dev/null \
        || die "${plugins}/job_submit_lua.so cannot find liblua5.1 (apt-get install liblua5.1-0)"
}

configure() {
    mkdir -p "${etc}" "${run}/munge" "${run}/mysql" "${log}/munge" "${log}/mysql" "${state}/spool/slurmctld" \
        "${state}/spool/slurmd" "${state}/munge" "${state}/mysql"
    chmod 0755 "${state}" "${etc}" "${run}" "${log}"
    if [[ ! -f "${state}/ports" ]]; then
        say "picking ports (slurmctld, slurmd, slurmdbd, mariadb)"
        printf 'ctld=%s\nslurmd=%s\ndbd=%s\nmysql=%s\n' "$(free_port)" "$(free_port)" \
            "$(free_port)" "$(free_port)" >"${state}/ports"
    fi
    # shellcheck disable=SC1091
    . "${state}/ports"
    say "ports: slurmctld ${ctld}, slurmd ${slurmd}, slurmdbd ${dbd}, mariadb ${mysql}"

    # munge: a key of the cluster's own; munged runs as the munge user Debian's package made.
    if [[ ! -f "${state}/munge/munge.key" ]]; then
        say "munge: a new key in ${state}/munge/munge.key"
        mungekey --create --keyfile="${state}/munge/munge.key" >/dev/null
    fi
    chown -R munge:munge "${state}/munge" "${run}/munge" "${log}/munge"
    chmod 0700 "${state}/munge"
    chmod 0755 "${run}/munge"
    chmod 0400 "${state}/munge/munge.key"

    # MariaDB: its own datadir, socket and port; slurmdbd's user and database.
    chown -R mysql:mysql "${state}/mysql" "${run}/mysql" "${log}/mysql"
    if [[ ! -d "${state}/mysql/data/mysql" ]]; then
        say "mariadb: initialising ${state}/mysql/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="${state}/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"${log}/mariadb-install.log" 2>&1 \
            || { tail_log "${log}/mariadb-install.log"; die "mariadb-install-db failed"; }
    fi
    [[ -f "${etc}/dbpass" ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"${etc}/dbpass")
    chmod 0600 "${etc}/dbpass"

    # The node, sized from the machine (slurmd -C), leaving 512 MiB to the host.
    local cpus mem node
    node=$(hostname -s)
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mem=$((mem > 1024 ? mem - 512 : mem))
    say "node ${node}: CPUs=${cpus} RealMemory=${mem} (slurmd -C, less 512 MiB)"

    local starter="${root}/slurm/wnodes-slurm-job-starter"
    cat >"${conf}" <<EOF
# Written by scripts/slurm-cluster.sh: a private one-node cluster (docs/slurm.md).
ClusterName=wnodes
SlurmctldHost=${node}(127.0.0.1)
SlurmctldPort=${ctld}
SlurmdPort=${slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${munge_socket}
CredType=cred/munge
StateSaveLocation=${state}/spool/slurmctld
SlurmdSpoolDir=${state}/spool/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=${log}/slurmctld.log
SlurmdLogFile=${log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup plugins: several clusters on one machine would share their cgroups (see the top).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=256
MinJobAge=300
# Accounting through slurmdbd (sacct).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${dbd}
# The munge socket for slurmdbd connections (AuthInfo is only for slurmctld and slurmd).
AccountingStoragePass=${munge_socket}
# WNoDeS: each job's end (or requeue) as a record in the spool file the bridge follows.
JobCompType=jobcomp/script
JobCompLoc=${etc}/wnodes-slurm-jobcomp
# WNoDeS: every batch script is wrapped to run inside a WNoDeS VM (job_submit.lua next to
# this file; the job starter ${starter}).
JobSubmitPlugins=lua
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=wnodes Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"${etc}/slurmdbd.conf" <<EOF
# Written by scripts/slurm-cluster.sh.
AuthType=auth/munge
AuthInfo=socket=${munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=${dbd}
SlurmUser=root
LogFile=${log}/slurmdbd.log
PidFile=$(pidfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${mysql}
StorageUser=slurm
StoragePass=$(cat "${etc}/dbpass")
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "${etc}/slurmdbd.conf"
    chmod 0644 "${conf}"
    # The filter, with this checkout's job starter and its settings.
    sed "s|@JOB_STARTER@|${starter}|; s|@STARTER_CONF@|${etc}/wnodes-job-starter.conf|" \
        "${root}/slurm/job_submit.lua" >"${etc}/job_submit.lua"
    # The jobcomp hook, writing into this cluster's spool file (jobcomp_spool).
    sed "s|@SPOOL@|${state}/spool/wnodes-jobcomp.log|; s|@SLURM_CONF@|${conf}|" \
        "${root}/slurm/wnodes-slurm-jobcomp" >"${etc}/wnodes-slurm-jobcomp"
    chmod 0755 "${etc}/wnodes-slurm-jobcomp"
    # The spool exists before any job ends: a bridge may start following it at once.
    touch "${state}/spool/wnodes-jobcomp.log"
    cat >"${etc}/wnodes-job-starter.conf" <<EOF
# Written by scripts/slurm-cluster.sh: the job starter's settings (sh syntax).
# wnodes-bridge is found on the job's PATH (a submitter's environment goes with the job), so
# a test can point jobs at its own build; a site sets bridge=/usr/bin/wnodes-bridge.
# bridge=${root}/target/debug/wnodes-bridge
EOF
    chmod 0644 "${etc}/job_submit.lua" "${etc}/wnodes-job-starter.conf"
}

start_munged() {
    if alive "$(pidfile munged)"; then say "munged: running"; return; fi
    say "munged: starting (socket ${munge_socket})"
    rm -f "${munge_socket}" "${munge_socket}.lock"
    runuser -u munge -- munged --key-file="${state}/munge/munge.key" --socket="${munge_socket}" \
        --pid-file="$(pidfile munged)" --log-file="${log}/munge/munged.log" \
        --seed-file="${state}/munge/munged.seed" \
        || { tail_log "${log}/munge/munged.log"; die "munged did not start"; }
    wait_for 10 munged "${log}/munge/munged.log" sh -c "munge -S '${munge_socket}' -n | unmunge -S '${munge_socket}'"
}

start_mariadb() {
    if alive "$(pidfile mariadbd)"; then say "mariadb: running"; return; fi
    say "mariadb: starting (port ${mysql}, socket ${mysql_socket})"
    # mariadbd runs as mysql (--user): it is started in the background and writes its pid file.
    setsid mariadbd --no-defaults --user=mysql --datadir="${state}/mysql/data" \
        --socket="${mysql_socket}" --port="${mysql}" --bind-address=127.0.0.1 \
        --pid-file="$(pidfile mariadbd)" --log-error="${log}/mysql/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=32M --innodb-log-file-size=16M \
        --max-connections=50 --skip-name-resolve </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb "${log}/mysql/mariadb.log" mariadb --no-defaults -S "${mysql_socket}" -u root -e 'select 1'
    say "mariadb: user slurm, database slurm_acct_db"
    mariadb --no-defaults -S "${mysql_socket}" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "${etc}/dbpass")';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "${etc}/dbpass")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    if alive "$(pidfile slurmdbd)"; then say "slurmdbd: running"; return; fi
    say "slurmdbd: starting (port ${dbd})"
    SLURM_CONF=${conf} slurmdbd || { tail_log "${log}/slurmdbd.log"; die "slurmdbd did not start"; }
    # sacctmgr answers once slurmdbd has its tables.
    wait_for 60 slurmdbd "${log}/slurmdbd.log" env SLURM_CONF="${conf}" sacctmgr -n list cluster
}

add_cluster() {
    if ! SLURM_CONF=${conf} sacctmgr -n -P list cluster format=cluster | grep -x wnodes >/dev/null; then
        say "slurmdbd: adding cluster wnodes"
        SLURM_CONF=${conf} sacctmgr -i add cluster wnodes >/dev/null
    fi
}

start_slurmctld() {
    if alive "$(pidfile slurmctld)"; then say "slurmctld: running"; return; fi
    say "slurmctld: starting (port ${ctld})"
    SLURM_CONF=${conf} slurmctld || { tail_log "${log}/slurmctld.log"; die "slurmctld did not start"; }
    wait_for 30 slurmctld "${log}/slurmctld.log" env SLURM_CONF="${conf}" scontrol ping
    # The filter loaded (or slurmctld refuses every job).
    grep -q 'job_submit.lua loaded' "${log}/slurmctld.log" 2>/dev/null \
        || { tail_log "${log}/slurmctld.log"; die "slurmctld did not load WNoDeS's job_submit.lua"; }
}

start_slurmd() {
    if alive "$(pidfile slurmd)"; then say "slurmd: running"; return; fi
    say "slurmd: starting (port ${slurmd}, node $(hostname -s))"
    SLURM_CONF=${conf} slurmd -N "$(hostname -s)" \
        || { tail_log "${log}/slurmd.log"; die "slurmd did not start"; }
    node_idle() {
        local st
        st=$(SLURM_CONF=${conf} sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null) || return 1
        [[ "${st}" == idle || "${st}" == mixed || "${st}" == allocated ]] || return 1
    }
    wait_for 30 "slurmd (node idle in sinfo)" "${log}/slurmd.log" node_idle
}

# SIGTERM to each daemon named that runs, then waits for all of them (SIGKILL after 30 s).
stop_group() { # daemon...
    local d pf pid i waiting=()
    for d in "$@"; do
        pf=$(pidfile "$d")
        alive "${pf}" || continue
        pid=$(cat "${pf}")
        say "${d}: stopping (pid ${pid})"
        kill -TERM "${pid}" 2>/dev/null || true
        waiting+=("${d}:${pid}")
    done
    for ((i = 0; i < 300 && ${#waiting[@]}; i++)); do
        local left=()
        for d in "${waiting[@]}"; do
            if kill -0 "${d#*:}" 2>/dev/null; then left+=("$d"); else rm -f "$(pidfile "${d%%:*}")"; fi
        done
        waiting=("${left[@]}")
        ((${#waiting[@]})) && sleep 0.1
    done
    for d in "${waiting[@]}"; do
        say "${d%%:*}: still running after 30 s: SIGKILL"
        kill -KILL "${d#*:}" 2>/dev/null || true
        rm -f "$(pidfile "${d%%:*}")"
    done
}

case "${cmd}" in
    env) env_lines ;;
    status) status ;;
    stop)
        # The Slurm daemons first (slurmctld keeps what slurmdbd did not take in its state),
        # then what they use.
        stop_group slurmd slurmctld slurmdbd
        stop_group mariadbd munged
        say "stopped (state kept in ${state})"
        ;;
    start)
        [[ "$(id -u)" -eq 0 ]] || die "the cluster's daemons run as root (and as munge, mysql): run as root"
        mkdir -p "${state}"
        if [[ -f "${conf}" ]] && status 2>/dev/null; then
            say "already running in ${state}"
            status
            exit 0
        fi
        t0=${EPOCHREALTIME}
        say "install"
        install
        say "configure ${state}"
        configure
        start_munged
        start_mariadb
        start_slurmdbd
        add_cluster
        start_slurmctld
        start_slurmd
        say "up in $(awk -v a="${t0}" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }') s: $(SLURM_CONF=${conf} sinfo -h -o '%P %D %T %c CPUs %m MiB')"
        ;;
esac
