#!/usr/bin/env bash
# run-tests.sh - the whole test suite, as the README gives it and .ci/run runs it:
# installs missing Debian packages, then for a plain build and an ASan+UBSan
# build: configure, build (warnings are errors when CI=true), and run every
# test through ctest (unit tests, the test processor's tests, the pytest
# integration suite against real PostgreSQL, the test processor and the daemon).
# The plain build runs the integration suite, and the crash driver's rounds,
# once per processor API (generic, stripe, adyen), side by side; the
# sanitizer build runs them for generic only (PC_TEST_APIS overrides both).
# Then, once, the package stage (test/package/test_deb.py): build the Debian
# package, install it, run the installed daemon, purge it. It needs root and
# a machine without a paycoord package of its own; otherwise it says why it
# is skipped.
#   test/run-tests.sh            both builds, then the package stage
#   PC_TEST_BUILDS=plain test/run-tests.sh   only the plain build
#   PC_TEST_PACKAGE=0 test/run-tests.sh      without the package stage
#   PC_TEST_APIS="generic stripe" test/run-tests.sh   integration suites for these processor APIs
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
    # The processor APIs the integration suite (and its crash rounds) runs against.
    if [ "$b" = sanitize ]; then apis=${PC_TEST_APIS:-generic}; else apis=${PC_TEST_APIS:-"generic stripe adyen"}; fi
    skip=()
    for api in generic stripe adyen; do
        case " $apis " in *" $api "*) ;; *) skip+=("$([ $api = generic ] && echo integration || echo integration_$api)") ;; esac
    done
    exclude=""
    [ ${#skip[@]} -gt 0 ] && exclude="^($(IFS='|'; echo "${skip[*]}"))\$"
    export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    rc=0
    stage_start=$(date +%s)
    # Everything but the integration suites first (some tests restart the
    # shared test cluster: never beside others), then the suites side by side
    # (mostly waiting on processes and timers: they fit two cores).
    (cd "$dir" && PC_CRASH_ROUNDS=$rounds PC_SIM_SEEDS=$seeds ctest --output-on-failure --timeout 2400 \
        -E '^integration') || rc=$?
    grep -h "^paysim:" "$dir/Testing/Temporary/LastTest.log" 2>/dev/null || true
    echo "=== $b build: integration suites for: $apis"
    (cd "$dir" && PC_CRASH_ROUNDS=$rounds ctest --output-on-failure --timeout 2400 -j3 -R '^integration' \
        ${exclude:+-E "$exclude"}) || rc=$?
    for log in "$dir"/crash-rounds-*.log; do
        [ -f "$log" ] || continue
        echo "=== $b build: randomized crash rounds, $(basename "$log" .log | sed 's/crash-rounds-//') (seeds)"
        cat "$log"
    done
    if [ -f "$dir/ha-rounds.log" ]; then
        echo "=== $b build: database failover rounds (seeds)"
        cat "$dir/ha-rounds.log"
    fi
    echo "=== $b build: ctest took $(( $(date +%s) - stage_start ))s"
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
