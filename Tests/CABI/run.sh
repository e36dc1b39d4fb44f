#!/usr/bin/env bash
# Builds lib/libflashmoe.so (scripts/build-lib) unless FLASHMOE_LIB names a built one, compiles
# Tests/CABI/abi_test.c and Tests/CABI/abi_fp8_test.c against include/flashmoe.h with cc, and runs them on the CPU
# backend. Each prints "N passed, M failed"; the script exits non-zero on any failure.
# Usage: Tests/CABI/run.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ -z "${FLASHMOE_LIB:-}" ]; then
    scripts/build-lib
    FLASHMOE_LIB=$PWD/lib/libflashmoe.so
fi
libdir=$(cd "$(dirname "$FLASHMOE_LIB")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The test links -lflashmoe, so the library must be named libflashmoe.so in the folder it links from.
if [ "$(basename "$FLASHMOE_LIB")" != libflashmoe.so ]; then
    cp "$FLASHMOE_LIB" "$tmp/libflashmoe.so"
    libdir=$tmp
fi
for test in abi_test abi_fp8_test; do
    cc -std=c11 -O1 -Wall -Wextra -Werror -Iinclude "Tests/CABI/$test.c" -L"$libdir" -lflashmoe -lm -lpthread \
        -Wl,-rpath,"$libdir" -o "$tmp/$test"
done
"$tmp/abi_test"
"$tmp/abi_fp8_test"
