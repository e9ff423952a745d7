#!/usr/bin/env bash
# Build wnodes-guest-probe statically linked (glibc, `-C target-feature=+crt-static`), for the
# SR-IOV test guest (guest/README.md, "The igb guest"): the guest has no libraries for it.
#
#   scripts/build-guest-probe.sh     build (incrementally), print the binary's path on the last line
#
# Its own target directory ($GUEST_PROBE_TARGET_DIR, default <CARGO_TARGET_DIR or target>/guest-probe):
# RUSTFLAGS differ from the normal build's, so sharing a directory would rebuild both each time.
# The release profile without LTO and with 16 codegen units: it builds in a third of the time.
# wnodes_testkit::guest_run finds the binary there (or at $GUEST_PROBE_BIN).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
triple=x86_64-unknown-linux-gnu
target_dir=${GUEST_PROBE_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/guest-probe}
rustup target list --installed 2>/dev/null | grep -qx "$triple" \
    || { echo "build-guest-probe: the $triple std is not installed (rustup target add $triple)" >&2; exit 1; }
RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --locked --target "$triple" -p wnodes-guest-probe >&2
bin="$target_dir/$triple/release/wnodes-guest-probe"
# A dynamically linked result would fail in the guest with a confusing "not found".
if ! ldd "$bin" 2>&1 | grep -Eq 'statically linked|not a dynamic executable'; then
    echo "build-guest-probe: $bin is not statically linked" >&2
    exit 1
fi
echo "$bin"
