#!/usr/bin/env bash
# The event-chain demo (the first main command, kept): one event published with a trace by
# process A, handled by B, which publishes a derived event handled by C. All three print the
# trace id they saw: it is the same.
# Installs what it needs (nats-server into .tools/) and cleans up after itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh nats >&2
echo "building..." >&2
cargo build -q -p wnodes-integration-tests --bin bus-node
bin="$root/target/debug/bus-node"
work=$(mktemp -d /tmp/wnodes-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

mkdir -p "$work/js" "$work/ports"
"$root/.tools/bin/nats-server" -a 127.0.0.1 -p -1 -js -sd "$work/js" --ports_file_dir "$work/ports" -l "$work/nats.log" &
pids+=($!)
for _ in $(seq 100); do ls "$work"/ports/*.ports >/dev/null 2>&1 && break; sleep 0.05; done
url=$(python3 -c 'import json,glob,sys; print(json.load(open(glob.glob(sys.argv[1]+"/*.ports")[0]))["nats"][0])' "$work/ports")
echo "nats-server at $url" >&2

node() { # role state-dir extra-env...
  local role=$1 dir=$2; shift 2
  env WNODES_NATS__URL="$url" WNODES_HOST=hv1.demo.example WNODES_SITE=DEMO \
      WNODES_STATE_DIR="$dir" WNODES_HTTP_ADDR=127.0.0.1:0 WNODES_NODE__ROLE="$role" \
      RUST_LOG=warn "$@" "$bin"
}
wait_for() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "timed out waiting for '$2' in $1" >&2; return 1; }

node relay "$work/b" > "$work/b.out" 2> "$work/b.err" & pids+=($!)
node sink "$work/c" > "$work/c.out" 2> "$work/c.err" & pids+=($!)
wait_for "$work/b.out" ready; wait_for "$work/c.out" ready
node publish "$work/a" > "$work/a.out" 2> "$work/a.err"
wait_for "$work/c.out" "sink handled"

a=$(sed -n 's/^trace_id=//p' "$work/a.out")
b=$(sed -n 's/^relay handled .* trace_id=//p' "$work/b.out")
c=$(sed -n 's/^sink handled .* trace_id=//p' "$work/c.out")
echo "A (publisher: job.started) trace_id=$a"
echo "B (relay: job.started -> vm.requested) trace_id=$b"
echo "C (sink: vm.requested) trace_id=$c"
if [ -n "$a" ] && [ "$a" != 00000000000000000000000000000000 ] && [ "$a" = "$b" ] && [ "$b" = "$c" ]; then
  echo "one trace across three processes: $a"
else
  echo "trace ids differ" >&2; exit 1
fi
