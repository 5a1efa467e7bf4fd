#!/usr/bin/env bash
# C-level tests of the core (csrc/*.c, no Python): builds tests/c/test_core.c together with
# csrc/*.c into a temporary directory and runs it under valgrind memcheck, or, where valgrind
# is missing, built with AddressSanitizer + UndefinedBehaviorSanitizer instead.
# Exits non-zero when compilation, the memory checker or any check fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/dipp-ctest.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

CC="${CC:-gcc}"
CFLAGS=(-std=c11 -O1 -g -Wall -Wextra -Werror -ffp-contract=off -fopenmp -I"$root/csrc")
SOURCES=("$here/test_core.c" "$root"/csrc/*.c)
export OMP_NUM_THREADS=2

# Box-Muller's logarithm, sine and cosine against long double on every input (natively: 2^24 evaluations).
"$CC" -std=c11 -O2 -Wall -Wextra -Werror -ffp-contract=off -I"$root/csrc" "$here/test_box_muller.c" \
    -o "$tmp/test_box_muller" -lm
"$tmp/test_box_muller"

if command -v valgrind >/dev/null 2>&1; then
    echo "tests/c: $CC ${CFLAGS[*]}; running under valgrind memcheck (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
    "$CC" "${CFLAGS[@]}" "${SOURCES[@]}" -o "$tmp/test_core" -lm
    VG=(valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect)
    if [ -f "$here/valgrind.supp" ]; then
        VG+=(--suppressions="$here/valgrind.supp")
    fi
    "${VG[@]}" "$tmp/test_core"
else
    echo "tests/c: valgrind not found; $CC ${CFLAGS[*]} -fsanitize=address,undefined instead" \
         "(OMP_NUM_THREADS=$OMP_NUM_THREADS)"
    "$CC" "${CFLAGS[@]}" -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
        "${SOURCES[@]}" -o "$tmp/test_core" -lm
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$tmp/test_core"
fi
