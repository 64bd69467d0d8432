#!/usr/bin/env bash
# Durable publishes/s and look-ups/s (with audit) on each store, in one run (issue #7):
#   sqlite    — one gateway, journal and audit log in SQLite;
#   pg-1      — one gateway on PostgreSQL;
#   pg-3      — three gateway replicas on one PostgreSQL database, load spread over them.
#
#   bench/stores.sh [postgres://…/db]     (default postgres://postgres@127.0.0.1:5432/test)
#
# `civgate bench publish` (4 connections x 16 in flight) and `civgate bench lookup`
# (4 connections x 64 in flight), 2 s warm-up, 8 s measured, release build, everything on
# 127.0.0.1 and the same cores (load generator, gateways, directory, PostgreSQL). Each
# PostgreSQL configuration gets a fresh schema, dropped at the end. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
PG=${1:-postgres://postgres@127.0.0.1:5432/test}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}

cargo build --release --locked --quiet
B=$PWD/target/release/civgate
T=$(mktemp -d)
PIDS=()
SCHEMAS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for s in "${SCHEMAS[@]}"; do psql -q "$PG" -c "DROP SCHEMA IF EXISTS $s CASCADE" >/dev/null 2>&1 || true; done
    rm -rf "$T"
}
trap cleanup EXIT

DIR=$(free_port)
"$B" certs init --dir "$T/certs" >/dev/null
sed -e "s/127.0.0.1:7444/127.0.0.1:$DIR/" \
    -e "s#https://localhost:7444#https://localhost:$DIR#" \
    -e "s#per_second = 500, burst = 1000#per_second = 10000000, burst = 10000000#" \
    -e "s/max_in_flight_per_agency = 256/max_in_flight_per_agency = 4096/" \
    civgate.toml >"$T/civgate.toml"

"$B" refdb serve --config "$T/civgate.toml" >"$T/refdb.log" 2>&1 &
PIDS+=("$!")
wait_for "$T/refdb.log" "directory serving"

# start_gateways NAME N [STORE_URL]: N gateways; sets ADDRS (--addr flags) and GWPIDS.
start_gateways() {
    local name=$1 n=$2 url=${3:-}
    ADDRS=()
    GWPIDS=()
    for i in $(seq "$n"); do
        local api admin log=$T/$name-$i.log
        api=$(free_port)
        admin=$(free_port)
        local extra=()
        [ -n "$url" ] && extra=(--store-url "$url")
        "$B" serve --config "$T/civgate.toml" --listen "127.0.0.1:$api" --admin-listen "127.0.0.1:$admin" \
            --data-dir "$T/data-$name-$i" "${extra[@]}" >"$log" 2>&1 &
        PIDS+=("$!")
        GWPIDS+=("$!")
        wait_for "$log" "civgate serving"
        ADDRS+=(--addr "127.0.0.1:$api")
    done
}
stop_gateways() {
    for p in "${GWPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${GWPIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}

RESULTS=()
measure() { # name
    local pub look
    pub=$("$B" bench publish --certs "$T/certs" "${ADDRS[@]}" --connections 4 --concurrency 16 \
        --warmup "$WARMUP" --duration "$DURATION" | tail -1)
    look=$("$B" bench lookup --certs "$T/certs" "${ADDRS[@]}" --connections 4 --concurrency 64 \
        --warmup "$WARMUP" --duration "$DURATION" --json)
    RESULTS+=("$1|$pub|$(echo "$look" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f look-ups/s, p99 %.2f ms, %d errors" % (r["requests_per_second"], r["p99_ms"], r["errors"]))')")
}

start_gateways sqlite 1
measure "sqlite, 1 gateway"
stop_gateways

for n in 1 3; do
    schema="bench_stores_${n}_$(date +%s)"
    psql -q "$PG" -c "CREATE SCHEMA $schema"
    SCHEMAS+=("$schema")
    sep='?'
    case "$PG" in *\?*) sep='&' ;; esac
    start_gateways "pg$n" "$n" "$PG${sep}options=-c%20search_path%3D$schema"
    measure "postgres, $n replica(s)"
    stop_gateways
done

echo
printf '%-24s | %s | %s\n' "store" "publishes (4x16 in flight)" "look-ups (4x64 in flight)"
for r in "${RESULTS[@]}"; do
    IFS='|' read -r name pub look <<<"$r"
    printf '%-24s | %s | %s\n' "$name" "${pub#publish: }" "$look"
done
