#!/usr/bin/env bash
# The project's test command (README "Quick start", .ci/run): installs what the tests need when
# missing (nats-server into .tools/, qemu/sshfs/nftables through apt, the test guest into
# .cache/), then checks formatting, lints, and runs every test with nextest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh all
if [ -x guest/build.sh ]; then guest/build.sh >/dev/null; fi
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (the service binaries the system tests start)" >&2
cargo build --workspace --bins --locked
echo "== cargo nextest" >&2
cargo nextest run --workspace --locked --profile ci "$@"
