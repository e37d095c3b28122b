#!/usr/bin/env bash
# run-tests.sh - the whole test suite, as the README gives it and .ci/run runs it:
# installs missing Debian packages, then for a plain build and an ASan+UBSan
# build: configure, build (warnings are errors when CI=true), and run every
# test through ctest (unit tests, the test processor's tests, the pytest
# integration suite against real PostgreSQL, the test processor and the daemon).
# Then, once, the package stage (test/package/test_deb.py): build the Debian
# package, install it, run the installed daemon, purge it. It needs root and
# a machine without a paycoord package of its own; otherwise it says why it
# is skipped.
#   test/run-tests.sh            both builds, then the package stage
#   PC_TEST_BUILDS=plain test/run-tests.sh   only the plain build
#   PC_TEST_PACKAGE=0 test/run-tests.sh      without the package stage
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
"$src/.ci/install-deps"
builds=${PC_TEST_BUILDS:-"plain sanitize"}
jobs=$(nproc)
for b in $builds; do
    dir="$src/build-test-$b"
    opts=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
    [ "$b" = sanitize ] && opts+=(-DPAYCOORD_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug)
    [ "${CI:-}" = true ] && opts+=(-DPAYCOORD_WERROR=ON)
    echo "=== $b build: configure"
    cmake -S "$src" -B "$dir" "${opts[@]}" >/dev/null
    echo "=== $b build: compile"
    cmake --build "$dir" -j"$jobs" -- --no-print-directory >/dev/null || cmake --build "$dir" -j1
    echo "=== $b build: ctest"
    # The randomized crash driver: 200 rounds in the plain build, fewer under
    # the (slower) sanitizers; PC_CRASH_ROUNDS overrides both.
    if [ "$b" = sanitize ]; then rounds=${PC_CRASH_ROUNDS:-40}; else rounds=${PC_CRASH_ROUNDS:-200}; fi
    # The deterministic simulation: 50,000 seeds in the plain build, fewer
    # under the sanitizers; PC_SIM_SEEDS overrides both.
    if [ "$b" = sanitize ]; then seeds=${PC_SIM_SEEDS:-8000}; else seeds=${PC_SIM_SEEDS:-50000}; fi
    export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    rc=0
    (cd "$dir" && PC_CRASH_ROUNDS=$rounds PC_SIM_SEEDS=$seeds ctest --output-on-failure --timeout 1500) || rc=$?
    grep -h "^paysim:" "$dir/Testing/Temporary/LastTest.log" 2>/dev/null || true
    if [ -f "$dir/crash-rounds.log" ]; then
        echo "=== $b build: randomized crash rounds (seeds)"
        cat "$dir/crash-rounds.log"
    fi
    if [ -f "$dir/ha-rounds.log" ]; then
        echo "=== $b build: database failover rounds (seeds)"
        cat "$dir/ha-rounds.log"
    fi
    [ "$rc" -eq 0 ] || { echo "=== $b build: FAILED"; exit "$rc"; }
done
echo "=== all test builds passed: $builds"
if [ "${PC_TEST_PACKAGE:-1}" = 0 ]; then
    echo "=== package stage SKIPPED: PC_TEST_PACKAGE=0"
else
    echo "=== package stage"
    plain="$src/build-test-plain"
    # The test processor, and a daemon with fail points to show the packaged one has none.
    [ -x "$plain/test/processor/psp-sim" ] && export PSP_SIM="$plain/test/processor/psp-sim"
    [ -x "$plain/coordinator/paycoord" ] && export PAYCOORD_BIN="$plain/coordinator/paycoord"
    /usr/bin/python3 "$src/test/package/test_deb.py"
fi
