#!/usr/bin/env bash
# Runs the Python package's tests (python/tests/test_*.py) against lib/libflashmoe.so, building the library with
# scripts/build-lib first when it is missing (or with --rebuild). $FLASHMOE_LIB, when set, names the library to
# test instead. The ctypes + numpy tests need only numpy; the torch tests skip, saying why, without torch (put a CPU
# torch, and transformers for the patch tests, on PYTHONPATH to run them).
#
# Usage: python/tests/run.sh [--rebuild]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ "${1:-}" = "--rebuild" ] || { [ -z "${FLASHMOE_LIB:-}" ] && [ ! -e lib/libflashmoe.so ]; }; then
    scripts/build-lib
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
python3 -m unittest discover -s python/tests -p 'test_*.py' -v
