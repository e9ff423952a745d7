#!/usr/bin/env bash
# The compose demo: WNoDeS as a site in a box (compose/docker-compose.yml) and one batch job
# through it, the same job and report as scripts/demo.sh (`wnodes-dev demo`).
#
#   scripts/compose-demo.sh [--keep]
#
# Installs Docker Engine and Compose from Debian's packages when missing, starts dockerd when it
# is not running, builds the images (the base with debootstrap, cached under
# /var/cache/wnodes-compose; stand-ins for the public images, docker-compose.build.yml; the
# project's image from `cargo build --release` binaries), brings the stack up (three NATS
# servers, PostgreSQL, the trace backend, Prometheus, bridge, accounting, the backlog exporter,
# two hypervisors), submits the demo job with the job starter on hv1 and prints the job
# starter's progress, the job's output, `== exit code: N`, the timeline, the usage record (from
# PostgreSQL), the file the job wrote through the gateway, the trace id with the spans per
# service the trace backend holds, and Prometheus's targets. Exits 0 when the job succeeded and
# all of that checked out; takes the stack down (volumes and compose/run too) unless --keep.
# WNODES_COMPOSE_PUBLIC=1 uses the public images of docker-compose.yml instead of the stand-ins.
# Needs root. Not part of scripts/test.sh (it takes minutes: docs/compose.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/compose-lib.sh
. "$root/scripts/compose-lib.sh"

keep=0
for a in "$@"; do
    case $a in
    --keep) keep=1 ;;
    -h | --help)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument $a (--keep)" ;;
    esac
done

PAYLOAD='echo "hello from $(hostname)" > /shared/hello.txt; cat /shared/hello.txt; exit 0
'
SERVICES_IN_TRACE=7
t_start=$SECONDS
ensure_docker
build_images
t_built=$SECONDS
trap finish EXIT
echo "== starting the stack: 3 nats-server, postgres, traces, prometheus, bridge, accounting, backlog, hv1, hv2 (5 services each)"
stack_up 300
t_up=$SECONDS
echo "   ready in $((t_up - t_built)) s (images built in $((t_built - t_start)) s)"
accel=$(dc logs hv1 2>/dev/null | sed -n 's/.*launcher accel \([a-z]*\).*/\1/p' | head -n1)
echo "   hv1: launcher accel ${accel:-?} (KVM when /dev/kvm exists, else TCG)"

job="compose-demo-$$"
run=$(run_key "$job")
out=$(mktemp -d)
echo "== wnodes-bridge submit --vo demo --job-id $job --script <payload>   (on hv1)"
while IFS= read -r l; do echo "   payload: $l"; done <<<"${PAYLOAD%$'\n'}"
submit hv1 "$job" "$PAYLOAD" "$out"
code=$(cat "$out/rc")
echo "== job starter progress (stderr):"
sed 's/^/   /' "$out/stderr"
echo "== job output (stdout):"
sed 's/^/   /' "$out/stdout"
echo "== exit code: $code (submit took $(cat "$out/wall") s)"
ok=1
[[ $code == 0 ]] || ok=0

# The usage record: accounting writes it after vm.stopped.
record=""
for _ in $(seq 100); do
    record=$(psql_q "select run_key, vm_id, vo, user_name, uid, gid, cores, cpu_seconds, wall_seconds, peak_memory_bytes, exit_code, stop_reason from usage_records where run_key = '$run'")
    [[ -n $record ]] && break
    sleep 0.2
done
job_json "$run" >"$out/job.json" || true
python3 - "$out/job.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"== timeline: wnodesctl job gave nothing ({e})")
    sys.exit(0)
print(f"== timeline ({len(j['events'])} events of run {j['run']}):")
for p in j["phases"]:
    print(f"   {p['phase']:<40} {p['seconds']:>8.3f} s")
PY
trace=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("trace_id") or "")' "$out/job.json" 2>/dev/null || true)
nrec=$(psql_q "select count(*) from usage_records where run_key = '$run'")
if [[ $nrec == 1 ]]; then
    IFS=$'\t' read -r r_run r_vm r_vo r_user r_uid r_gid r_cores r_cpu r_wall r_mem r_exit r_stop <<<"$record"
    echo "== usage record (PostgreSQL, table usage_records):"
    echo "   run $r_run  vm $r_vm  vo $r_vo  user $r_user ($r_uid:$r_gid)"
    printf '   cores %s  cpu %.2f s  wall %.2f s  peak memory %.1f MiB  exit %s  stop %s\n' \
        "$r_cores" "$r_cpu" "$r_wall" "$(python3 -c "print($r_mem/1048576)")" "$r_exit" "$r_stop"
else
    echo "== usage record: expected 1, found ${nrec:-0}"
    ok=0
fi
owner=$(dc exec -T hv1 stat -c '%u:%g' /var/lib/wnodes/export/hello.txt 2>/dev/null | tr -d '\r' || true)
if [[ -n $owner ]]; then
    text=$(dc exec -T hv1 cat /var/lib/wnodes/export/hello.txt | tr -d '\r')
    echo "== on hv1: /var/lib/wnodes/export/hello.txt owned by $owner (the job's uid:gid): $text"
    [[ $owner == "$JOB_UID:$JOB_GID" ]] || ok=0
else
    echo "== on hv1: /var/lib/wnodes/export/hello.txt missing"
    ok=0
fi

# The trace: the services export in batches; give the last spans a few seconds.
if [[ -n $trace ]]; then
    echo "== trace $trace"
    services=""
    for _ in $(seq 30); do
        curl -fsS "http://127.0.0.1:16686/api/traces/$trace" >"$out/trace.json" 2>/dev/null || true
        services=$(python3 - "$out/trace.json" <<'PY'
import collections, json, sys
try:
    d = json.load(open(sys.argv[1]))["data"][0]
except Exception:
    sys.exit(0)
procs = {k: v["serviceName"] for k, v in d["processes"].items()}
count = collections.Counter(procs[s["processID"]] for s in d["spans"])
print(" ".join(f"{k}={v}" for k, v in sorted(count.items())))
PY
)
        [[ $(wc -w <<<"$services") -ge $SERVICES_IN_TRACE ]] && break
        sleep 1
    done
    n=$(wc -w <<<"$services")
    echo "   spans per service ($n services): $services"
    echo "   see it: http://127.0.0.1:16686/api/traces/$trace (Jaeger: its UI at http://127.0.0.1:16686/trace/$trace)"
    [[ $n -ge $SERVICES_IN_TRACE ]] || ok=0
else
    echo "== trace: no trace id in the run's events"
    ok=0
fi

# Prometheus: every target scraped (scrape interval 5 s).
for _ in $(seq 30); do
    curl -fsS http://127.0.0.1:9090/api/v1/targets >"$out/targets.json" 2>/dev/null || true
    summary=$(python3 - "$out/targets.json" <<'PY'
import collections, json, sys
try:
    t = json.load(open(sys.argv[1]))["data"]["activeTargets"]
except Exception:
    sys.exit(0)
up = sum(1 for x in t if x["health"] == "up")
per = collections.defaultdict(lambda: [0, 0])
for x in t:
    per[x["labels"]["job"]][1] += 1
    per[x["labels"]["job"]][0] += x["health"] == "up"
print(f"{up} {len(t)} " + ", ".join(f"{j} {u}/{n}" for j, (u, n) in sorted(per.items())))
PY
)
    read -r up total _ <<<"${summary:-0 0}"
    [[ $total -gt 0 && $up == "$total" ]] && break
    sleep 1
done
rules=$(curl -fsS http://127.0.0.1:9090/api/v1/rules 2>/dev/null | python3 -c 'import json,sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))' 2>/dev/null || echo 0)
echo "== prometheus: $up of $total targets up (${summary#* * }); $rules alert rules loaded (monitoring/alerts.yml); http://127.0.0.1:9090"
[[ $total -gt 0 && $up == "$total" ]] || ok=0
echo "== times: images $((t_built - t_start)) s, stack ready $((t_up - t_built)) s, job $(cat "$out/wall") s, total $((SECONDS - t_start)) s"
rm -rf "$out"
if [[ $ok == 1 ]]; then
    echo "== compose demo OK"
    exit 0
fi
echo "== compose demo FAILED (see above; with --keep: $(dc_hint) logs)"
exit 1
