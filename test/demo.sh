#!/usr/bin/env bash
# demo.sh - paycoord's main job on an embedded default: installs what is
# missing, builds, starts a throwaway PostgreSQL, the test processor and the
# daemon, runs a short demo of payments that prints their outcomes, and
# cleans everything up. Nothing outside a temporary directory is touched.
#   test/demo.sh [--processor generic|stripe|adyen]
# picks the processor API: the test processor speaks it (psp-sim --mode) and
# the daemon uses its adapter (processor_api); with stripe and adyen the
# processor's signed webhooks go to the daemon's listener on loopback.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
api=generic
while [ $# -gt 0 ]; do
    case $1 in
        --processor) api=${2:-}; shift 2 ;;
        --processor=*) api=${1#*=}; shift ;;
        -h|--help) echo "usage: $0 [--processor generic|stripe|adyen]"; exit 0 ;;
        *) echo "demo: unknown argument $1" >&2; exit 2 ;;
    esac
done
case $api in generic|stripe|adyen) ;; *) echo "demo: --processor must be generic, stripe or adyen" >&2; exit 2 ;; esac
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

echo "== test processor ($api)"
umask 077
echo "demo-token-$(date +%s%N)" > "$work/token"
# the webhook secret: Stripe's whsec_ string, Adyen's HMAC key in hex
case $api in
    stripe) secret="whsec_demo_$(date +%s%N)" ;;
    adyen) secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n') ;;
    *) secret="" ;;
esac
[ -n "$secret" ] && printf '%s\n' "$secret" > "$work/webhook.secret"
umask 022
hook_port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sim_args=(--mode "$api")
[ -n "$secret" ] && sim_args+=(--webhook-url "http://127.0.0.1:$hook_port/webhook" --webhook-secret "$secret")
"$build/test/processor/psp-sim" --port 0 --control-port 0 --token-file "$work/token" --quiet "${sim_args[@]}" \
    > "$work/sim.out" 2> "$work/sim.log" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/sim.out" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/.* port=\([0-9]*\) .*/\1/p' "$work/sim.out")
cport=$(sed -n 's/.*control_port=\([0-9]*\).*/\1/p' "$work/sim.out")
echo "   listening on 127.0.0.1:$port (control $cport)"

echo "== paycoord daemon (processor_api = $api)"
url=http://127.0.0.1:$port
[ "$api" = adyen ] && url=$url/v71
cat > "$work/paycoord.conf" <<CONF
listen_socket = $work/paycoord.sock
db_conninfo = $("$src/test/pg.sh" conninfo "$work/pg")
node_id = demo
processor_api = $api
processor_url = $url
processor_token_file = $work/token
processor_poll_ms = 100
pay_wait_ms = 5000
log_level = notice
allow_root = true
webhook_listen = 127.0.0.1:$hook_port
CONF
case $api in
    stripe) echo "stripe_webhook_secret_file = $work/webhook.secret" >> "$work/paycoord.conf" ;;
    adyen) printf 'adyen_merchant_account = PspSimMerchant\nadyen_hmac_key_file = %s\n' "$work/webhook.secret" \
               >> "$work/paycoord.conf" ;;
esac
"$build/coordinator/paycoord" --config "$work/paycoord.conf" 2> "$work/paycoord.log" &
pids+=($!)
echo "   log: $work/paycoord.log (shown at the end)"

/usr/bin/python3 "$src/test/demo.py" "$work/paycoord.sock" "$cport" "$api"
echo "== daemon log (last lines)"
tail -n 8 "$work/paycoord.log"
