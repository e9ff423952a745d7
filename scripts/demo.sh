#!/usr/bin/env bash
# The main command: the whole WNoDeS stack on this machine (nats-server + the seven services as
# separate processes) and one batch job through it, in a qemu VM (TCG) booted from the test guest.
# The job writes a file through the storage gateway; the demo prints the job's output, the
# per-phase timeline, the exit code, the usage record and the file's owner on the host, and exits
# non-zero if anything failed. As root it runs in a private network namespace with tap
# networking; otherwise it uses qemu user-mode networking (and says so).
# Installs what it needs (nats-server into .tools/, qemu/sshfs/nftables via apt, the guest into
# .cache/) and cleans up after itself. `scripts/chain-demo.sh` is the earlier three-process
# trace demo. Extra arguments go to `wnodes-dev demo` (e.g. `--keep` keeps config and logs).
# With OTEL_EXPORTER_OTLP_ENDPOINT set (passed through as is) or `--otlp-endpoint URL`, every
# service exports its spans to that OTLP/gRPC receiver on this host (relayed out of the private
# network namespace when root): the job is one trace across all seven services.
#
# `scripts/demo.sh slurm [ARGS]` runs the same job through a real Slurm instead (docs/slurm.md):
# it starts the private one-node cluster of scripts/slurm-cluster.sh when it is not running (in
# its default state dir; it stays up: `scripts/slurm-cluster.sh stop` stops it), submits the
# payload with `sbatch` (the cluster's job_submit.lua hands it to the WNoDeS job starter),
# prints the Slurm job id and, once sacct reports a final state, `sacct: ID|STATE|EXITCODE`,
# then the same report. The stack then runs in this network namespace with qemu user-mode
# networking (slurmd runs its jobs here).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
slurm=
if [ "${1:-}" = slurm ]; then
    slurm=--slurm
    shift
fi
scripts/install-deps.sh all >&2
guest/build.sh >&2
echo "building..." >&2
cargo build -q --workspace --bins
if [ -n "$slurm" ]; then
    scripts/slurm-cluster.sh start >&2
    eval "$(scripts/slurm-cluster.sh env)"
    exec "$root/target/debug/wnodes-dev" demo --slurm "$@"
fi
exec "$root/target/debug/wnodes-dev" demo "$@"
