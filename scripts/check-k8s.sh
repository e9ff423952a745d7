#!/usr/bin/env bash
# Checks k8s/: renders the base and every overlay with `kubectl kustomize`, validates every
# object against Kubernetes 1.33's schemas, strictly (`kubernetes-validate --strict`: an unknown
# field fails), and loads every services' configuration file found in the rendered ConfigMaps with
# each service's own `--check-config`. First proves the schema check can fail
# (k8s/testdata/unknown-field.yaml must be refused).
#
# Needs the tools from `scripts/install-deps.sh k8s` (.tools/k8s) and the service binaries
# (`cargo build --workspace --bins`). Run by scripts/test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools="$root/.tools/k8s"
kube_version=1.33.0
[[ -x "$tools/bin/kubectl" ]] || { echo "check-k8s: no $tools/bin/kubectl (scripts/install-deps.sh k8s)" >&2; exit 1; }
validate() { PYTHONPATH="$tools" python3 "$tools/bin/kubernetes-validate" --strict --quiet -k "$kube_version" "$@"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if validate k8s/testdata/unknown-field.yaml >"$tmp/bad.out" 2>&1; then
    echo "check-k8s: the schema check accepted k8s/testdata/unknown-field.yaml; it checks nothing" >&2
    exit 1
fi

services=(image scratch network gateway launcher bridge accounting usage)
dirs=(k8s/base)
for d in k8s/overlays/*/; do dirs+=("${d%/}"); done
for dir in "${dirs[@]}"; do
    out="$tmp/$(echo "$dir" | tr / _).yaml"
    "$tools/bin/kubectl" kustomize "$dir" >"$out"
    objects=$(grep -c '^kind:' "$out")
    validate "$out"
    # Every ConfigMap key ending in .toml is a services' configuration file.
    PYTHONPATH="$tools" python3 - "$out" "$tmp" <<'PY'
import sys, yaml
out, tmp = sys.argv[1], sys.argv[2]
n = 0
for doc in yaml.safe_load_all(open(out)):
    if doc and doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith(".toml"):
                n += 1
                open(f"{tmp}/{doc['metadata']['name']}-{key}", "w").write(text)

if n == 0:
    sys.exit("no services' configuration file in the rendered ConfigMaps")
PY
    for cfg in "$tmp"/*.toml; do
        for s in "${services[@]}"; do
            env -i PATH="$PATH" "target/debug/wnodes-$s" --check-config "$cfg" >/dev/null
        done
        rm -f "$cfg"
    done
    echo "check-k8s: $dir: $objects objects valid against Kubernetes $kube_version; its configuration passes every service's --check-config" >&2
done
