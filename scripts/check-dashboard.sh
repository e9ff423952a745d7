#!/usr/bin/env bash
# Checks monitoring/dashboard.json against a real Prometheus that scraped the demo stack:
#
#   scripts/check-dashboard.sh [--screenshot PNG]
#
# 1. the dashboard's JSON and schema sanity (python's json module: schemaVersion, unique panel
#    ids, every target on the ${DS_PROMETHEUS} input, an expr and a refId in each);
# 2. `wnodes-dev up --usage-exporter` (root: its private network namespace, tap networking,
#    qemu), `wnodesctl backlog --serve` (consumer lag, dead letters, VMs per host) and Debian's
#    `prometheus` (scripts/install-deps.sh) scraping every service's /metrics, the usage
#    exporter and the backlog exporter every second, all inside the stack's namespace;
# 3. three jobs through the stack (wnodes-bridge submit, as `wnodes-dev up` prints it); while
#    the third job's VM runs its scratch directory is made immutable (chattr +i), so scratch's
#    release of its vm.stopped is dead-lettered; then the directory is mended and the dead
#    letter redriven (`wnodesctl dlq redrive`), so the volume goes;
# 4. EVERY `expr` of the dashboard through Prometheus' /api/v1/query, `$__rate_interval` and
#    `$__interval` replaced by 5m and `$__range` by 15m: each must return at least one series
#    with a number (not NaN); it fails naming the panel and the expression otherwise (it
#    retries for up to 60 s, for the last scrapes);
# 5. with --screenshot PNG: Prometheus' graph page of the VM start latency (p50 and p90 of
#    wnodes_launcher_vm_start_seconds), taken by Debian's headless `chromium` (installed by
#    `scripts/install-deps.sh chromium` when missing), written to PNG.
#
# At the end, also after a failure: the exporter and Prometheus are stopped, the immutable
# directory mended, and `wnodes-dev down` stops the stack and fails if anything was left behind.
#
# Needs root, qemu-system-x86_64, nsenter, chattr, curl, python3, prometheus, the test guest
# (guest/build.sh) and the debug binaries (`cargo build --workspace --bins`; another directory
# with WNODES_BIN_DIR). A missing one fails the check, naming it. Prints its time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$EPOCHREALTIME

die() { echo "check-dashboard: $*" >&2; exit 1; }
say() { echo "check-dashboard: $*" >&2; }

screenshot=
while [ $# -gt 0 ]; do
    case "$1" in
        --screenshot)
            [ $# -ge 2 ] || die "--screenshot needs a path"
            screenshot=$2
            shift 2
            ;;
        -h | --help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (usage: $0 [--screenshot PNG])" ;;
    esac
done
if [ -n "$screenshot" ]; then
    case "$screenshot" in
        *.png) ;;
        *) die "--screenshot: '$screenshot' does not end in .png" ;;
    esac
    screenshot=$(realpath -m -- "$screenshot")
fi

dashboard=$root/monitoring/dashboard.json
bin=${WNODES_BIN_DIR:-$root/target/debug}

# 1. JSON and schema sanity, before anything starts.
python3 - "$dashboard" <<'EOF'
import json, sys
path = sys.argv[1]
d = json.load(open(path))
errors = []
if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
    errors.append(f"schemaVersion {d.get('schemaVersion')!r}: want an integer >= 36")
inputs = [i.get("name") for i in d.get("__inputs", []) if i.get("type") == "datasource"]
if inputs != ["DS_PROMETHEUS"]:
    errors.append(f"__inputs: want one datasource input DS_PROMETHEUS, found {inputs}")
for k in ("title", "uid", "panels"):
    if not d.get(k):
        errors.append(f"no {k}")
ids = [p.get("id") for p in d.get("panels", [])]
if len(ids) != len(set(ids)) or None in ids:
    errors.append(f"panel ids missing or repeated: {ids}")
exprs = 0
for p in d.get("panels", []):
    if p.get("type") == "row":
        continue
    t = p.get("title", f"panel {p.get('id')}")
    if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        errors.append(f"{t}: datasource is not ${{DS_PROMETHEUS}}")
    if not all(k in p.get("gridPos", {}) for k in "hwxy"):
        errors.append(f"{t}: gridPos incomplete")
    if not p.get("targets"):
        errors.append(f"{t}: no targets")
    refs = [x.get("refId") for x in p.get("targets", [])]
    if len(refs) != len(set(refs)) or None in refs:
        errors.append(f"{t}: refIds missing or repeated: {refs}")
    for x in p.get("targets", []):
        if x.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            errors.append(f"{t} {x.get('refId')}: datasource is not ${{DS_PROMETHEUS}}")
        if not x.get("expr", "").strip():
            errors.append(f"{t} {x.get('refId')}: no expr")
        exprs += 1
if errors:
    sys.exit("check-dashboard: " + path + ":\n  " + "\n  ".join(errors))
print(f"check-dashboard: {path}: valid JSON, schemaVersion {d['schemaVersion']}, "
      f"{sum(p.get('type') != 'row' for p in d['panels'])} panels, {exprs} expressions", file=sys.stderr)
EOF

# Preconditions: each missing one fails the check, naming it.
[ "$(id -u)" -eq 0 ] || die "needs root (wnodes-dev up's private network namespace, taps, chattr)"
for tool in qemu-system-x86_64 nsenter chattr curl python3; do
    command -v "$tool" >/dev/null || die "no $tool (scripts/install-deps.sh)"
done
command -v prometheus >/dev/null || die "no prometheus (Debian's prometheus: scripts/install-deps.sh)"
[ -f "$root/.cache/guest/manifest.json" ] || die "no test guest in .cache/guest (guest/build.sh)"
for b in wnodes-dev wnodesctl wnodes-usage wnodes-bridge wnodes-launcher wnodes-image \
    wnodes-scratch wnodes-network wnodes-gateway wnodes-accounting; do
    [ -x "$bin/$b" ] || die "no $bin/$b (cargo build --workspace --bins, or set WNODES_BIN_DIR)"
done
if [ -n "$screenshot" ] && ! command -v chromium >/dev/null; then
    scripts/install-deps.sh chromium >&2
    command -v chromium >/dev/null || die "no chromium after scripts/install-deps.sh chromium"
fi

work=$(mktemp -d /tmp/wnodes-dashboard.XXXXXX)
# The export under it is served to the job's uid (nobody): it must be able to traverse.
chmod 0755 "$work"
up_pid=
backlog_pid=
prom_pid=
job3=
immutable=
ok=0
cleanup() {
    local rc=$?
    set +e
    for p in "$job3" "$prom_pid" "$backlog_pid"; do
        if [ -n "$p" ]; then
            kill "$p" 2>/dev/null
            wait "$p" 2>/dev/null
        fi
    done
    [ -n "$immutable" ] && chattr -i "$immutable"
    if [ -n "$up_pid" ]; then
        if "$bin/wnodes-dev" down --work-dir "$work/up" >&2; then
            wait "$up_pid" || { say "wnodes-dev up exited non-zero"; rc=1; }
        else
            say "wnodes-dev down failed (above); stopping wnodes-dev up ($up_pid)"
            kill "$up_pid" 2>/dev/null
            wait "$up_pid" 2>/dev/null
            rc=1
        fi
    fi
    if [ "$rc" -eq 0 ] && [ "$ok" -eq 1 ]; then
        rm -rf "$work"
    else
        say "FAILED; logs kept in $work (up.log, prometheus.log, backlog.log, up/logs/)"
        [ "$rc" -eq 0 ] && rc=1
    fi
    say "took $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
    exit "$rc"
}
trap cleanup EXIT

# 2. The stack, the backlog exporter and Prometheus.
say "wnodes-dev up --usage-exporter (work dir $work/up)"
"$bin/wnodes-dev" up --work-dir "$work/up" --usage-exporter >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 900); do
    grep -q '^   stop:' "$work/up.log" && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; up_pid=; die "wnodes-dev up ended"; }
    sleep 0.2
done
grep -q '^   stop:' "$work/up.log" || { cat "$work/up.log" >&2; die "wnodes-dev up not up within 180 s"; }
info=$work/up/wnodes-dev.json
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]] or "")' "$info" "$1"; }
netns=$(field netns)
[ -n "$netns" ] || die "wnodes-dev up ran without a network namespace (not root?)"
nats_url=$(field nats_url)
in_ns() { nsenter --net="$netns" "$@"; }

# Not through in_ns: $! must be the process itself (nsenter execs it), not a subshell.
nsenter --net="$netns" "$bin/wnodesctl" backlog --serve 127.0.0.1:9091 --every 1s \
    --nats "$nats_url" --creds "$(field monitor_creds)" >"$work/backlog.log" 2>&1 &
backlog_pid=$!

python3 - "$info" >"$work/prometheus.yml" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
print("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:")
targets = dict(info["metrics"], backlog="127.0.0.1:9091")
for name, addr in sorted(targets.items()):
    print(f"  - job_name: wnodes-{name}\n    static_configs:\n      - targets: ['{addr}']")
EOF
if [ "$(grep -c 'job_name: wnodes-' "$work/prometheus.yml")" -ne 9 ]; then
    cat "$work/prometheus.yml" >&2
    die "expected 9 scrape jobs (8 services and the backlog exporter)"
fi
nsenter --net="$netns" prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address=127.0.0.1:9090 >"$work/prometheus.log" 2>&1 &
prom_pid=$!
prom=http://127.0.0.1:9090
for _ in $(seq 1 150); do
    in_ns curl -fsS "$prom/-/ready" >/dev/null 2>&1 && break
    kill -0 "$prom_pid" 2>/dev/null || { cat "$work/prometheus.log" >&2; prom_pid=; die "prometheus ended"; }
    sleep 0.2
done
in_ns curl -fsS "$prom/-/ready" >/dev/null || die "prometheus not ready within 30 s"
say "prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') scraping every 1 s: $(grep -o "wnodes-[a-z]*" "$work/prometheus.yml" | tr '\n' ' ')"

# 3. Jobs.
# As `wnodes-dev up` prints it; then the job id, `--` and the payload.
submit=(nsenter --net="$netns" env WNODES_CONFIG="$(field config)"
    WNODES_NATS__CREDS_FILE="$(field agent_creds)" "$bin/wnodes-bridge" submit --vo demo
    --user nobody --uid 65534 --gid 65534 --job-id)
for i in 1 2; do
    out=$("${submit[@]}" "dash-$i" -- /bin/echo "hello $i" 2>"$work/submit-$i.err") \
        || { cat "$work/submit-$i.err" >&2; die "job dash-$i failed"; }
    [ "$out" = "hello $i" ] || die "job dash-$i printed '$out'"
    say "job dash-$i ran"
done
# The third: scratch cannot remove its volume while the directory is immutable, so its release
# (vm.stopped) is dead-lettered once its attempts are spent.
volumes=$work/up/state/scratch/volumes
"${submit[@]}" dash-3 -- /bin/sleep 3 >"$work/submit-3.out" 2>"$work/submit-3.err" &
job3=$!
# Once its VM runs, its volume is made (not a hidden `.partial` any more).
for _ in $(seq 1 300); do
    grep -q 'vm.running' "$work/submit-3.err" && break
    sleep 0.2
done
grep -q 'vm.running' "$work/submit-3.err" || { cat "$work/submit-3.err" >&2; die "job dash-3's VM not running within 60 s"; }
volume=$(find "$volumes" -mindepth 1 -maxdepth 1 -name 'vm-*' -print -quit 2>/dev/null)
[ -n "$volume" ] || die "no scratch volume for job dash-3 in $volumes"
chattr +i "$volumes"
immutable=$volumes
wait "$job3" || { job3=; cat "$work/submit-3.err" >&2; die "job dash-3 failed"; }
job3=
dlq() { in_ns "$bin/wnodesctl" dlq --nats "$nats_url" --creds "$(field admin_creds)" "$@"; }
seq=
for _ in $(seq 1 120); do
    seq=$(dlq list --json | python3 -c '
import json, sys
for d in json.load(sys.stdin):
    if d["subject"].endswith(".vm.stopped") and d["consumer"].startswith("scratch"):
        print(d["sequence"]); break')
    [ -n "$seq" ] && break
    sleep 0.5
done
[ -n "$seq" ] || die "no dead letter from scratch within 60 s"
say "job dash-3 ran; scratch dead-lettered its vm.stopped (dead letter $seq)"
# Let the exporter and Prometheus see the dead letter before it is redriven.
sleep 3
chattr -i "$volumes"
immutable=
dlq redrive "$seq" --yes >&2
for _ in $(seq 1 150); do
    [ -e "$volume" ] || break
    sleep 0.2
done
[ ! -e "$volume" ] || die "the redriven release did not remove $volume"
say "dead letter $seq redriven; the volume is gone"

# 4. Every expression of the dashboard.
in_ns python3 - "$dashboard" "$prom" <<'EOF'
import json, math, sys, time, urllib.parse, urllib.request
dash, prom = sys.argv[1], sys.argv[2]
WINDOWS = {"$__rate_interval": "5m", "$__interval": "5m", "$__range": "15m"}
targets = []
for p in json.load(open(dash))["panels"]:
    for t in p.get("targets", []):
        expr = t["expr"]
        for k, v in WINDOWS.items():
            expr = expr.replace(k, v)
        if "$" in expr:
            sys.exit(f"check-dashboard: {p['title']} {t['refId']}: a variable left in {expr!r}")
        targets.append((p["title"], t["refId"], expr))

def query(expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(body)
    series = body["data"]["result"]
    numbers = [s for s in series if not math.isnan(float(s["value"][1]))]
    return series, numbers

deadline = time.time() + 60
while True:
    empty, report = [], []
    for title, ref, expr in targets:
        series, numbers = query(expr)
        report.append(f"  {len(series):3} series ({len(numbers)} numbers)  {title} [{ref}]: {expr}")
        if not numbers:
            empty.append(f"{title} [{ref}]: {expr} -> {len(series)} series, none a number")
    if not empty or time.time() > deadline:
        break
    time.sleep(2)
print("\n".join(report), file=sys.stderr)
if empty:
    sys.exit("check-dashboard: no data for:\n  " + "\n  ".join(empty))
print(f"check-dashboard: all {len(targets)} expressions of the dashboard returned data", file=sys.stderr)
EOF

# 5. The screenshot.
if [ -n "$screenshot" ]; then
    mkdir -p "$(dirname "$screenshot")"
    url=$(python3 - "$prom" <<'EOF'
import sys, urllib.parse
b = "sum by (le) (rate(wnodes_launcher_vm_start_seconds_bucket[5m]))"
q = " or ".join(f'label_replace(histogram_quantile({x}, {b}), "quantile", "{x}", "", "")'
                for x in ("0.5", "0.9"))
p = {"g0.expr": q, "g0.tab": "0", "g0.range_input": "1m", "g0.stacked": "0",
     "g0.show_exemplars": "0"}
print(sys.argv[1] + "/graph?" + urllib.parse.urlencode(p))
EOF
)
    say "screenshot of $url"
    in_ns chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --window-size=1200,860 --virtual-time-budget=15000 \
        --screenshot="$screenshot" "$url" >"$work/chromium.log" 2>&1 \
        || { cat "$work/chromium.log" >&2; die "chromium failed"; }
    [ -s "$screenshot" ] || die "chromium wrote no $screenshot"
    say "screenshot: $screenshot ($(stat -c %s "$screenshot") bytes)"
fi
ok=1
