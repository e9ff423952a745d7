#!/usr/bin/env bash
# Checks monitoring/: `promtool check rules` on the alert rules and `promtool test rules` on
# alerts.test.yml (each alert fires on series meant to fire it, and stays quiet on the others).
# promtool comes from Debian's `prometheus` package (scripts/install-deps.sh). Run by
# scripts/test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/monitoring"
command -v promtool >/dev/null || { echo "check-monitoring: no promtool (scripts/install-deps.sh)" >&2; exit 1; }
promtool check rules alerts.yml >&2
promtool test rules alerts.test.yml >&2
echo "check-monitoring: $(grep -c '^      - alert:' alerts.yml) alert rules checked and tested" >&2
