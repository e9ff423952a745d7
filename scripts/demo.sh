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
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh all >&2
guest/build.sh >&2
echo "building..." >&2
cargo build -q --workspace --bins
exec "$root/target/debug/wnodes-dev" demo "$@"
