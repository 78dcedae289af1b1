#!/usr/bin/env bash
# Benchmark: mapped-ram vs the disk ceiling (fio) and QEMU 10.0, one interleaved run.
# Arguments go to scripts/bench.py (--size 2G --runs 3 --dir target/bench ...; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (drop_caches, QEMU on /dev/shm)" >&2; exit 1; }
command -v fio >/dev/null && qemu-system-x86_64 --version | grep -q 'version 10\.' || .ci/install-deps
cargo build --release --locked -p mapped-ram-linux --bin mapped-ram
exec python3 scripts/bench.py "$@"
