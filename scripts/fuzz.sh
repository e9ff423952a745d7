#!/usr/bin/env bash
# Fuzz with cargo fuzz (libFuzzer), on the stable toolchain: the wnodes-lrms parsers, the
# wnodes-bus event decoder and name validators, the launcher's validators (VM ids, host
# paths, qemu's command line) and site policy, and the storage gateway's own checks (host
# policy on exports and owners, NFS rules, configuration ranges, the parsers of its programs'
# output).
#
#   scripts/fuzz.sh [htcondor|pbs|lsf|slurm|event|names|launch|policy|gateway|all]
#                   [seconds per target]            (default: all, 60)
#
# Layout (crates/wnodes-lrms/fuzz/ for htcondor, pbs, lsf, slurm; crates/wnodes-bus/fuzz/ for
# event, names; services/launcher/fuzz/ for launch, policy; services/gateway/fuzz/ for gateway):
#   seeds/<target>        hand-written inputs and copies of the test fixtures (committed)
#   corpus/<target>       the minimised corpus (committed; rewritten by this script)
#   corpus-work/<target>  the growing corpus of every campaign (git-ignored, kept between runs)
#   artifacts/<target>    crash inputs libFuzzer found: commit them
# A campaign fuzzes corpus-work (seeded from seeds/ and corpus/), then minimises seeds + corpus +
# corpus-work into corpus/ (libFuzzer -set_cover_merge, inputs up to 1 KiB, edge features only),
# so the committed corpus stays small. The crates' tests (tests/fuzz_corpus.rs of wnodes-lrms,
# wnodes-bus, the launcher and the gateway) replay seeds, corpus and artifacts through the same
# checks as regression tests, without fuzzing.
#
# cargo-fuzz is installed on first use into .tools/ (git-ignored):
#   CARGO_INSTALL_ROOT=.tools cargo install cargo-fuzz --locked
# Stable rustc has no sanitizers, hence --sanitizer none; cargo fuzz passes a few -Z flags, which
# RUSTC_BOOTSTRAP=1 allows on stable.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:-all}
secs=${2:-60}
case "$secs" in (*[!0-9]*|'') echo "seconds must be a number: $secs" >&2; exit 64;; esac
case "$target" in
  all) targets=(htcondor pbs lsf slurm event names launch policy gateway) ;;
  htcondor|pbs|lsf|slurm|event|names|launch|policy|gateway) targets=("$target") ;;
  *) echo "unknown target: $target (htcondor, pbs, lsf, slurm, event, names, launch, policy, gateway, all)" >&2; exit 64 ;;
esac

# The fuzz crate of a target.
crate_of() {
  case "$1" in
    event|names) echo "$root/crates/wnodes-bus/fuzz" ;;
    launch|policy) echo "$root/services/launcher/fuzz" ;;
    gateway) echo "$root/services/gateway/fuzz" ;;
    *) echo "$root/crates/wnodes-lrms/fuzz" ;;
  esac
}

tools="$root/.tools"
mkdir -p "$tools"
export PATH="$tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
  CARGO_INSTALL_ROOT="$tools" cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  cd "$(crate_of "$t")"
  work="corpus-work/$t"
  mkdir -p "$work" "corpus/$t" "artifacts/$t"
  cp -n seeds/"$t"/* corpus/"$t"/* "$work"/ 2>/dev/null || true
  echo "== $t: fuzzing for ${secs}s" >&2
  cargo fuzz run --sanitizer none "$t" "$work" -- \
    -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
  echo "== $t: minimising into corpus/$t" >&2
  fresh=$(mktemp -d)
  cargo fuzz run --sanitizer none "$t" "$fresh" "corpus/$t" "$work" -- \
    -set_cover_merge=1 -max_len=1024 -use_value_profile=0 -use_cmp=0 >/dev/null 2>&1
  rm -rf "corpus/$t" && mkdir -p "corpus/$t" && cp "$fresh"/* "corpus/$t"/ && rm -rf "$fresh"
  echo "== $t: corpus now $(ls "corpus/$t" | wc -l) files, $(du -sh --apparent-size "corpus/$t" | cut -f1)" >&2
done
