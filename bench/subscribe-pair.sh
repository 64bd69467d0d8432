#!/usr/bin/env bash
# Catch-up and publish→delivery latency of the exchange for two builds, measured in turn in one
# run:
#
#   bench/subscribe-pair.sh BASELINE_BIN [CANDIDATE_BIN]   (candidate: this tree's release build)
#
# Both gateways run side by side, each on a store of its own filled first by `civgate bench
# publish` (4 x 16 in flight, PUBLISH_SECS seconds, default 55) as the population database:
# deaths in Hải Phòng (031) and Hà Nội (001) in turn. Then, ROUNDS times (default 3), baseline
# then candidate, the idle one waiting:
#   alone — `bench subscribe --catch-up 1000000 --registry registry-hp`: one registry reads the
#           stored events from sequence 1;
#   both  — the same with registry-hp and registry-hn at once, then both stay subscribed while
#           5,000 events/s are published (publish→delivery latency).
# The load generator is always the candidate's (`bench` is a client; its requests are the same
# bytes for both). A build that addresses population events delivers each registry its own
# half of the stored events; one that does not delivers every event to both. The baseline's
# config is the shipped one without the keys it does not know.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BASE=${1:?usage: bench/subscribe-pair.sh BASELINE_BIN [CANDIDATE_BIN]}
if [ -z "${2:-}" ]; then cargo build --release --locked --quiet; fi
CAND=${2:-$PWD/target/release/civgate}
ROUNDS=${ROUNDS:-3}
PUBLISH_SECS=${PUBLISH_SECS:-55}
# CATCH_UP=0 measures only the delivery latency (with both registries subscribed).
CATCH_UP=${CATCH_UP:-1000000}

with_scratch

"$CAND" certs init --dir "$T/certs" >/dev/null
unthrottled() {
    sed -e 's/publishes = { per_second = 500, burst = 1000 }/publishes = { per_second = 1000000, burst = 1000000 }/' civgate.toml
}
unthrottled >"$T/candidate.toml"
unthrottled | grep -v -e '^provinces = ' -e '^consumer_groups = ' >"$T/baseline.toml"

declare -A PORT
start() { # NAME BIN
    local port
    port=$(free_port)
    "$2" serve --config "$T/$1.toml" --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 \
        --data-dir "$T/data-$1" >"$T/$1.log" 2>&1 &
    PIDS+=($!)
    wait_for "$T/$1.log" "civgate serving"
    PORT[$1]=$port
    echo "== $1: $2, filling its store"
    "$CAND" bench publish --addr "127.0.0.1:$port" --certs "$T/certs" --duration "$PUBLISH_SECS" \
        --warmup 2 | sed 's/^/   /'
}
start baseline "$BASE"
start candidate "$CAND"

for r in $(seq "$ROUNDS"); do
    for name in baseline candidate; do
        echo "# round $r, $name"
        if [ "$CATCH_UP" != 0 ]; then
            "$CAND" bench subscribe --addr "127.0.0.1:${PORT[$name]}" --certs "$T/certs" \
                --catch-up "$CATCH_UP" --registry registry-hp --duration 0 --warmup 0 |
                grep catch-up | sed 's/^/   alone: /'
        fi
        "$CAND" bench subscribe --addr "127.0.0.1:${PORT[$name]}" --certs "$T/certs" \
            --catch-up "$CATCH_UP" --registry registry-hp --registry registry-hn --rate 5000 |
            sed 's/^/   both:  /'
    done
done
