#!/usr/bin/env bash
# Losing a NATS server loses nothing: the compose stack (compose/docker-compose.yml, three
# JetStream servers, streams and durables at R3) runs several VM jobs on both hypervisors while
# one NATS server — the events stream's leader — is killed (SIGKILL) and restarted later.
#
#   scripts/compose-nats-loss.sh [--keep] [--jobs N] [--down-for SECONDS]
#
# Jobs (default 6, alternating hv1 and hv2, each sleeping 20 s in its VM) are submitted a few
# seconds apart; the server is killed after the second submission and restarted --down-for
# seconds later (default 30), so jobs start, run and end while it is away. Then it counts and
# prints: jobs that exited 0, usage records in PostgreSQL (rows and distinct runs), each run's
# events by type (none missing, none twice; resource.released once per resource), usage.recorded
# events, and the dead letters; exits 0 only when every job completed, no event is missing or
# duplicated, every usage record was written exactly once and nothing was dead-lettered.
# Needs root; builds and starts the stack as scripts/compose-demo.sh does and takes it down
# unless --keep. Not part of scripts/test.sh (minutes: docs/compose.md has its times).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/compose-lib.sh
. "$root/scripts/compose-lib.sh"

keep=0 jobs=6 down_for=30
while [[ $# -gt 0 ]]; do
    case $1 in
    --keep) keep=1 ;;
    --jobs)
        jobs=${2:?--jobs N}
        shift
        ;;
    --down-for)
        down_for=${2:?--down-for SECONDS}
        shift
        ;;
    -h | --help)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument $1 (--keep, --jobs N, --down-for SECONDS)" ;;
    esac
    shift
done
[[ $jobs =~ ^[1-9][0-9]?$ ]] || die "--jobs: 1 to 99"
[[ $down_for =~ ^[1-9][0-9]{0,2}$ ]] || die "--down-for: 1 to 999 seconds"

t_start=$SECONDS
ensure_docker
build_images
trap finish EXIT
stack_up 300
echo "== stack ready in $((SECONDS - t_start)) s (with the image builds)"

# The events stream's leader, from the servers' monitoring endpoint (/jsz).
leader_of() {
    local n
    for n in 1 2 3; do
        dc exec -T backlog curl -fsS "http://nats-$n:8222/jsz?accounts=true&streams=true" 2>/dev/null |
            python3 -c '
import json, sys
d = json.load(sys.stdin)
for a in d.get("account_details", []):
    for s in a.get("stream_detail", []):
        if s["name"] == sys.argv[1]:
            print(s.get("cluster", {}).get("leader", ""))
            sys.exit(0)
' "$1" && return 0
    done
    return 1
}
# Each stream's replicas as its leader sees them ("WNODES_EVENTS leader nats-1; replicas:
# nats-2 current, nats-3 current; messages N").
read -r -d '' REPLICAS_PY <<'PY' || true
import json, sys
me = sys.argv[1]
d = json.load(sys.stdin)
for a in d.get("account_details", []):
    for s in a.get("stream_detail", []):
        c = s.get("cluster", {})
        if c.get("leader") != me:
            continue
        reps = ", ".join(r["name"] + (" current" if r.get("current") else " behind") for r in c.get("replicas", []))
        print(f"   {s['name']:<16} leader {me}; replicas: {reps}; messages {s['state']['messages']}")
PY
replicas() {
    local n
    for n in 1 2 3; do
        dc exec -T backlog curl -fsS "http://nats-$n:8222/jsz?accounts=true&streams=true" 2>/dev/null |
            python3 -c "$REPLICAS_PY" "nats-$n" || true
    done
}

victim=$(leader_of WNODES_EVENTS || true)
[[ $victim =~ ^nats-[123]$ ]] || victim=nats-2
live=nats-1
[[ $victim == nats-1 ]] && live=nats-2
echo "== streams before (replicas 3):"
replicas || true
echo "== $jobs jobs, alternating hv1/hv2 (each sleeps 20 s in its VM); $victim (the WNODES_EVENTS leader) is killed after the 2nd submission and restarted ${down_for} s later"

work=$(mktemp -d)
stamp=$(date +%H%M%S)
pids=()
t0=$SECONDS
killed_at="" restarted_at=""
for i in $(seq "$jobs"); do
    host=hv$(((i - 1) % 2 + 1))
    job="loss-$stamp-$i"
    payload="sleep 20; echo \"job $i on \$(hostname)\"; exit 0
"
    # The job starter connects to a server that is up (a site's job starters resolve a name
    # that lists the live servers); the services stay connected where they were.
    (
        WNODES_SUBMIT_URL="nats://$live:4222"
        mkdir -p "$work/$job"
        printf '%s' "$payload" | dc exec -T "$host" sh -c "cat > /tmp/job-$job.sh"
        s=$SECONDS
        set +e
        dc exec -T -e "WNODES_NATS__URL=$WNODES_SUBMIT_URL" "$host" wnodes-bridge submit --vo demo --user "$JOB_USER" --uid "$JOB_UID" \
            --gid "$JOB_GID" --job-id "$job" --script "/tmp/job-$job.sh" \
            >"$work/$job/stdout" 2>"$work/$job/stderr"
        echo $? >"$work/$job/rc"
        echo $((SECONDS - s)) >"$work/$job/wall"
        echo "$host" >"$work/$job/host"
    ) &
    pids+=("$!")
    echo "   t=$((SECONDS - t0))s submitted $job on $host"
    if [[ $i == 2 ]]; then
        sleep 3
        dc kill -s SIGKILL "$victim" >/dev/null 2>&1
        killed_at=$((SECONDS - t0))
        echo "   t=${killed_at}s killed $victim (SIGKILL)"
    fi
    sleep 4
    if [[ -n $killed_at && -z $restarted_at ]] && ((SECONDS - t0 - killed_at >= down_for)); then
        dc start "$victim" >/dev/null 2>&1
        restarted_at=$((SECONDS - t0))
        echo "   t=${restarted_at}s restarted $victim"
    fi
done
if [[ -z $restarted_at ]]; then
    while ((SECONDS - t0 - killed_at < down_for)); do sleep 1; done
    dc start "$victim" >/dev/null 2>&1
    restarted_at=$((SECONDS - t0))
    echo "   t=${restarted_at}s restarted $victim"
fi
for p in "${pids[@]}"; do wait "$p" || true; done
echo "   t=$((SECONDS - t0))s every job starter returned"

ok=1
completed=0
echo "== jobs:"
for i in $(seq "$jobs"); do
    job="loss-$stamp-$i"
    rc=$(cat "$work/$job/rc" 2>/dev/null || echo "?")
    [[ $rc == 0 ]] && completed=$((completed + 1))
    echo "   $job on $(cat "$work/$job/host" 2>/dev/null) exit $rc in $(cat "$work/$job/wall" 2>/dev/null) s: $(tr '\n' ' ' <"$work/$job/stdout" 2>/dev/null)"
    [[ $rc == 0 ]] || sed 's/^/      /' "$work/$job/stderr" | tail -5
done
[[ $completed == "$jobs" ]] || ok=0

# Usage records: accounting writes each after the VM's vm.stopped.
rows=0
for _ in $(seq 120); do
    rows=$(psql_q "select count(*) from usage_records where job_id like 'loss-$stamp-%'")
    [[ $rows -ge $jobs ]] && break
    sleep 1
done
distinct=$(psql_q "select count(distinct run_key) from usage_records where job_id like 'loss-$stamp-%'")
[[ $rows == "$jobs" && $distinct == "$jobs" ]] || ok=0

# Each run's events by type, from the events stream (as the monitor).
for i in $(seq "$jobs"); do
    job_json "$(run_key "loss-$stamp-$i")" >"$work/events-$i.json" || echo '{}' >"$work/events-$i.json"
done
events_ok=1
python3 - "$work" "$jobs" >"$work/events.txt" <<'PY' || events_ok=0
import collections, json, sys
work, jobs = sys.argv[1], int(sys.argv[2])
once = ["job.started", "vm.requested", "image.ready", "scratch.ready", "network.ready",
        "storage.ready", "vm.running", "vm.stopped", "usage.recorded", "job.finished"]
bad, totals, usage_events = 0, [], 0
for i in range(1, jobs + 1):
    try:
        ev = json.load(open(f"{work}/events-{i}.json")).get("events", [])
    except Exception:
        ev = []
    c = collections.Counter(e["type"] for e in ev)
    ids = [e["id"] for e in ev]
    missing = [t for t in once if c[t] == 0]
    twice = [t for t in once if c[t] > 1] + (["event ids"] if len(ids) != len(set(ids)) else [])
    released = c["resource.released"]
    usage_events += c["usage.recorded"]
    totals.append(len(ev))
    status = "ok"
    if missing or twice or released != 3:
        status = f"missing {missing} twice {twice} resource.released {released}"
        bad += 1
    print(f"   run {i}: {len(ev)} events ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))}): {status}")
print(f"SUMMARY events={sum(totals)} usage_recorded_events={usage_events} runs_with_problems={bad}")
sys.exit(1 if bad else 0)
PY
summary=$(sed -n 's/^SUMMARY //p' "$work/events.txt")

# Dead letters, and what every durable still has to process (the backlog, as the monitor).
read -r dead stuck < <(dc exec -T backlog wnodesctl backlog --nats "nats://$live:4222" \
    --creds /etc/wnodes/nats/creds/monitor.creds --json 2>/dev/null |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["dead_letters"], sum(c["pending"] + c["ack_pending"] for c in d["consumers"]))
' 2>/dev/null || echo "? ?")
[[ $dead == 0 && $stuck == 0 ]] || ok=0

echo "== events per run (from WNODES_EVENTS):"
grep -v '^SUMMARY' "$work/events.txt"
[[ $events_ok == 1 ]] || ok=0
echo "== streams after $victim's restart:"
sleep 2
replicas || true
echo "== counts: jobs $jobs, completed (exit 0) $completed; usage records in PostgreSQL $rows (distinct runs $distinct); ${summary:-events ?}; dead letters $dead; messages pending or unacknowledged on the durables $stuck"
echo "== $victim down from t=${killed_at}s to t=${restarted_at}s; total $((SECONDS - t_start)) s"
if [[ $ok == 1 ]]; then
    echo "== NATS node loss: nothing lost, every usage record written once"
    exit 0
fi
echo "== NATS node loss FAILED (see above)"
exit 1
