#!/bin/sh
# bench.sh - how many creates per second psp-sim sustains over loopback with
# keep-alive: wrk posts Creates with unique keys (bench/create.lua) for
# BENCH_SECONDS (10) over BENCH_CONNECTIONS (64) connections from one thread.
# With two or more CPUs, psp-sim and wrk are pinned to different ones.
# Prints the figure on the last line; exits non-zero if any answer was not 201.
#   PSP_SIM=path/to/psp-sim test/processor/bench.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${PSP_SIM:-/work/main/build-sim/test/processor/psp-sim}
secs=${BENCH_SECONDS:-10}
conns=${BENCH_CONNECTIONS:-64}
command -v wrk >/dev/null || { echo "bench.sh: wrk not found (apt-get install wrk)" >&2; exit 2; }
[ -x "$bin" ] || { echo "bench.sh: $bin not built" >&2; exit 2; }

tmp=$(mktemp -d)
sim_pid=
cleanup() {
    [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

pin_sim= pin_wrk=
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    pin_sim="taskset -c 0"
    pin_wrk="taskset -c 1"
fi

$pin_sim "$bin" --port 0 --quiet --token bench --max-payments 20000000 >"$tmp/ready" 2>"$tmp/sim.log" &
sim_pid=$!
i=0
until grep -q '^psp-sim listening' "$tmp/ready" 2>/dev/null; do
    i=$((i + 1))
    [ $i -lt 100 ] || { echo "bench.sh: psp-sim did not start" >&2; cat "$tmp/sim.log" >&2; exit 1; }
    sleep 0.05
done
port=$(sed -n 's/.* port=\([0-9]*\) .*/\1/p' "$tmp/ready")
ctl=$(sed -n 's/.*control_port=\([0-9]*\).*/\1/p' "$tmp/ready")

$pin_wrk wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$here/bench/create.lua" \
    "http://127.0.0.1:$port" -- "$(date +%s)" bench >"$tmp/wrk.out"
cat "$tmp/wrk.out"

processed=$(/usr/bin/python3 -c '
import json, sys, urllib.request
c = json.load(urllib.request.urlopen("http://127.0.0.1:%s/control" % sys.argv[1]))
print(c["counters"]["processed_creates"])' "$ctl")
rps=$(awk '/^Requests\/sec:/ {printf "%d", $2}' "$tmp/wrk.out")
bad=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$tmp/wrk.out")
errs=$(awk '/Socket errors:/ {print}' "$tmp/wrk.out")
echo "psp-sim: $processed payments created in ${secs}s over $conns keep-alive connections${pin_sim:+ (psp-sim on cpu 0, wrk on cpu 1)}"
[ -z "$errs" ] || echo "wrk: $errs"
echo "creates/s: $rps"
[ -z "$bad" ] || { echo "bench.sh: $bad answers were not 2xx" >&2; exit 1; }
