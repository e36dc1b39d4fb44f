#!/usr/bin/env bash
# FlashMoE's CPU backend against numpy on this machine: paper-e32, 256 tokens, float32.
#
# Runs numpy_matmul.py (numpy's GEMM rates and the same layer written in numpy), then
# `swift run -c release flashmoe bench --backend cpu --preset paper-e32 --tokens 256 --json ...`, and prints both
# side by side with the ratio numpy ms / FlashMoE ms (target >= 40 %, see compare.py --cpu-target).
#
# Environment: SWIFT_SCRATCH=<path> passes --scratch-path to swift; NUMPY_ARGS / BENCH_ARGS add arguments to the
# two commands; KEEP=<dir> keeps the two JSON files there. Exit status: 0, or the failing step's status.
set -euo pipefail
export PYTHONUNBUFFERED=1

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
tmp=${KEEP:-$(mktemp -d)}
mkdir -p "$tmp"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT

echo "== numpy (${tmp}/numpy.json)"
# shellcheck disable=SC2086  # NUMPY_ARGS is a word list on purpose
python3 Benchmarks/numpy_matmul.py --json "$tmp/numpy.json" ${NUMPY_ARGS:-}

scratch=()
[ -z "${SWIFT_SCRATCH:-}" ] || scratch=(--scratch-path "$SWIFT_SCRATCH")
echo "== flashmoe bench --backend cpu (${tmp}/flashmoe.json)"
# shellcheck disable=SC2086
swift run "${scratch[@]}" -c release flashmoe bench --backend cpu --preset paper-e32 --tokens 256 \
        --json "$tmp/flashmoe.json" ${BENCH_ARGS:-} || {
    status=$?
    echo "error: 'flashmoe bench --backend cpu' failed (status $status); numpy's numbers are above" >&2
    exit "$status"
}

echo "== comparison"
python3 Benchmarks/compare.py --numpy "$tmp/numpy.json" "$tmp/flashmoe.json"
