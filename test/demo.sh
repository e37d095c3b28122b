#!/usr/bin/env bash
# demo.sh - paycoord's main job on an embedded default: installs what is
# missing, builds, starts a throwaway PostgreSQL, the test processor and the
# daemon, runs a short demo of payments that prints their outcomes, and
# cleans everything up. Nothing outside a temporary directory is touched.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
"$src/.ci/install-deps"
build="$src/build-demo"
echo "== build (release)"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPAYCOORD_FAILPOINTS=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" -- --no-print-directory >/dev/null
work=$(mktemp -d /tmp/paycoord-demo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$src/test/pg.sh" stop "$work/pg" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== throwaway PostgreSQL in $work/pg"
"$src/test/pg.sh" start "$work/pg" >/dev/null
"$src/test/pg.sh" migrate "$work/pg"

echo "== test processor"
umask 077
echo "demo-token-$(date +%s%N)" > "$work/token"
umask 022
"$build/test/processor/psp-sim" --port 0 --control-port 0 --token-file "$work/token" --quiet \
    > "$work/sim.out" 2> "$work/sim.log" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/sim.out" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/.* port=\([0-9]*\) .*/\1/p' "$work/sim.out")
cport=$(sed -n 's/.*control_port=\([0-9]*\).*/\1/p' "$work/sim.out")
echo "   listening on 127.0.0.1:$port (control $cport)"

echo "== paycoord daemon"
cat > "$work/paycoord.conf" <<CONF
listen_socket = $work/paycoord.sock
db_conninfo = $("$src/test/pg.sh" conninfo "$work/pg")
node_id = demo
processor_url = http://127.0.0.1:$port
processor_token_file = $work/token
processor_poll_ms = 100
pay_wait_ms = 5000
log_level = notice
allow_root = true
CONF
"$build/coordinator/paycoord" --config "$work/paycoord.conf" 2> "$work/paycoord.log" &
pids+=($!)
echo "   log: $work/paycoord.log (shown at the end)"

/usr/bin/python3 "$src/test/demo.py" "$work/paycoord.sock" "$cport"
echo "== daemon log (last lines)"
tail -n 8 "$work/paycoord.log"
