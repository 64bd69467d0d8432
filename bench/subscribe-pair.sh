#!/usr/bin/env bash
# Catch-up and publish→delivery latency of two registries subscribed at once, for two builds
# in turn, in one run:
#
#   bench/subscribe-pair.sh BASELINE_BIN [CANDIDATE_BIN]   (candidate: this tree's release build)
#
# For each round and each build: a fresh store; `civgate bench publish` (4 x 16 in flight) for
# PUBLISH_SECS (default 40) seconds as the population database — deaths in Hải Phòng (031) and
# Hà Nội (001) in turn — then `civgate bench subscribe --catch-up 1000000 --registry
# registry-hp --registry registry-hn --rate 5000`: both registries read the stored events from
# sequence 1 at the same time, then both stay subscribed while 5,000 events/s are published.
# The load generator is always the candidate's (`bench` is a client; its requests are the same
# bytes for both). A build that addresses population events delivers each registry its own
# half; one that does not delivers every event to both. The baseline config is the shipped one
# without the keys it does not know. ROUNDS (default 2) alternates baseline, candidate.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BASE=${1:?usage: bench/subscribe-pair.sh BASELINE_BIN [CANDIDATE_BIN]}
if [ -z "${2:-}" ]; then cargo build --release --locked --quiet; fi
CAND=${2:-$PWD/target/release/civgate}
ROUNDS=${ROUNDS:-2}
PUBLISH_SECS=${PUBLISH_SECS:-40}

T=$(mktemp -d)
GW=
cleanup() {
    [ -n "$GW" ] && kill "$GW" 2>/dev/null && wait "$GW" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

"$CAND" certs init --dir "$T/certs" >/dev/null
unthrottled() {
    sed -e 's/publishes = { per_second = 500, burst = 1000 }/publishes = { per_second = 1000000, burst = 1000000 }/' \
        -e "s#\"certs/#\"$T/certs/#g" civgate.toml
}
unthrottled >"$T/candidate.toml"
unthrottled | grep -v -e '^provinces = ' -e '^consumer_groups = ' >"$T/baseline.toml"

run() { # NAME BIN CONFIG
    local name=$1 bin=$2 config=$3 port
    port=$(free_port)
    rm -rf "$T/data"
    "$bin" serve --config "$config" --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 \
        --data-dir "$T/data" >"$T/$name.log" 2>&1 &
    GW=$!
    wait_for "$T/$name.log" "civgate serving"
    echo "== $name ($bin)"
    "$CAND" bench publish --addr "127.0.0.1:$port" --certs "$T/certs" --duration "$PUBLISH_SECS" \
        --warmup 2 --server-pid "$GW" | sed 's/^/   /'
    "$CAND" bench subscribe --addr "127.0.0.1:$port" --certs "$T/certs" --catch-up 1000000 \
        --registry registry-hp --registry registry-hn --rate 5000 | sed 's/^/   /'
    kill "$GW"
    wait "$GW" 2>/dev/null || true
    GW=
}

for r in $(seq "$ROUNDS"); do
    echo "# round $r"
    run baseline "$BASE" "$T/baseline.toml"
    run candidate "$CAND" "$T/candidate.toml"
done
