#!/usr/bin/env bash
# Two builds of the gateway measured in turn in one run: the gateway's CPU per look-up (what
# bench/compare.sh calls the proxy CPU) and durable publishes/s.
#
#   bench/release-pair.sh BASELINE_BIN [CANDIDATE_BIN] [OUT.json]
#                                       (candidate: this tree's release build; OUT: bench/release-pair.json)
#
# One reference directory; both gateways run side by side on the shipped configuration (quotas
# far above the load), each on a store of its own, SQLite. ROUNDS times (default 3), in the
# order baseline, candidate, candidate, baseline (drift over the run cancels out), the idle
# gateway waiting:
#   look-up — `bench lookup`, 4 connections x 64 in flight, WARMUP s then DURATION s: look-ups/s
#             and the gateway process's CPU µs per look-up (/proc/PID/stat);
#   publish — `bench publish`, 4 connections x 16 in flight (64 in all): durable publishes/s
#             and the gateway's CPU µs per publish.
# The load generator is always the candidate's (a client: its requests are the same bytes for
# both). Prints each measurement, the candidate/baseline ratios of each round, and their medians.
# EVENTS=linked-births publishes registry-hp's births in cases of their own (what the flow table
# tracks) instead of the population database's deaths; BASE_CONFIG=FILE runs the baseline on
# its own release's civgate.toml (one that predates a section or role the candidate's has).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BASE=${1:?usage: bench/release-pair.sh BASELINE_BIN [CANDIDATE_BIN] [OUT.json]}
CAND=${2:-}
OUT=${3:-bench/release-pair.json}
[ -n "$CAND" ] || { cargo build --release --locked --quiet && CAND=$PWD/target/release/civgate; }
ROUNDS=${ROUNDS:-3}
export EVENTS=${EVENTS:-deaths}
BASE_CONFIG=${BASE_CONFIG:-}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}

with_scratch

DIR=$(free_port)
"$CAND" certs init --dir "$T/certs" >/dev/null
# Publishes unthrottled too: the bench measures the store, not the quota.
shipped_config_on "$(free_port)" "$(free_port)" "$DIR" |
    sed -e 's/publishes = { per_second = 500, burst = 1000 }/publishes = { per_second = 1000000, burst = 1000000 }/' \
        >"$T/civgate.toml"
grep -q 'per_second = 1000000' "$T/civgate.toml"
cp "$T/civgate.toml" "$T/baseline.toml"
if [ -n "$BASE_CONFIG" ]; then
    shipped_config_on "$(free_port)" "$(free_port)" "$DIR" "$BASE_CONFIG" |
        sed -e 's/publishes = { per_second = 500, burst = 1000 }/publishes = { per_second = 1000000, burst = 1000000 }/' \
            >"$T/baseline.toml"
    grep -q 'per_second = 1000000' "$T/baseline.toml"
fi
"$CAND" refdb serve --config "$T/civgate.toml" >"$T/refdb.log" 2>&1 &
PIDS+=($!)
wait_for "$T/refdb.log" "directory serving"

declare -A PORT PID
for name in baseline candidate; do
    bin=$BASE
    [ "$name" = candidate ] && bin=$CAND
    port=$(free_port)
    config=$T/civgate.toml
    [ "$name" = baseline ] && config=$T/baseline.toml
    "$bin" serve --config "$config" --listen "127.0.0.1:$port" \
        --admin-listen "127.0.0.1:$(free_port)" --data-dir "$T/data-$name" >"$T/$name.log" 2>&1 &
    PID[$name]=$!
    PIDS+=($!)
    PORT[$name]=$port
    wait_for "$T/$name.log" "civgate serving"
    echo "== $name: $bin on 127.0.0.1:$port" >&2
done

measure() { # NAME ROUND
    local name=$1 r=$2 port=${PORT[$1]} pid=${PID[$1]}
    "$CAND" bench lookup --target gateway --addr "127.0.0.1:$port" --certs "$T/certs" \
        --connections 4 --concurrency 64 --warmup "$WARMUP" --duration "$DURATION" \
        --server-pid "$pid" --json >"$T/lookup-$name-$r.json"
    "$CAND" bench publish --addr "127.0.0.1:$port" --certs "$T/certs" --connections 4 \
        --concurrency 16 --warmup "$WARMUP" --duration "$DURATION" --server-pid "$pid" \
        --events "$EVENTS" >"$T/publish-$name-$r.txt"
    echo "   $name: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['requests_per_second']:.0f} look-ups/s, gateway {r['server_cpu_us_per_request'][0][1]:.1f} µs CPU per look-up\")" "$T/lookup-$name-$r.json"); $(cat "$T/publish-$name-$r.txt")" >&2
}

for r in $(seq "$ROUNDS"); do
    echo "# round $r/$ROUNDS" >&2
    measure baseline "$r"
    measure candidate "$r"
    measure candidate "$r.2"
    measure baseline "$r.2"
done

python3 - "$T" "$ROUNDS" "$OUT" "$BASE" "$CAND" <<'EOF'
import json, os, platform, re, statistics, sys, time
t, rounds, out, base, cand = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def lookup(name, r):
    j = json.load(open(f"{t}/lookup-{name}-{r}.json"))
    return j["requests_per_second"], j["server_cpu_us_per_request"][0][1]

def publish(name, r):
    line = open(f"{t}/publish-{name}-{r}.txt").read()
    rate = float(re.search(r"([0-9.]+) durable publishes/s", line).group(1))
    cpu = float(re.search(r"pid \d+ ([0-9.]+) µs", line).group(1))
    return rate, cpu

rows = []
for r in range(1, rounds + 1):
    m = {}
    for name in ("baseline", "candidate"):
        a, b = lookup(name, r), lookup(name, f"{r}.2")
        c, d = publish(name, r), publish(name, f"{r}.2")
        m[name] = {
            "lookups_per_second": (a[0] + b[0]) / 2,
            "cpu_us_per_lookup": (a[1] + b[1]) / 2,
            "publishes_per_second": (c[0] + d[0]) / 2,
            "cpu_us_per_publish": (c[1] + d[1]) / 2,
        }
    ratio = {k: m["candidate"][k] / m["baseline"][k] for k in m["baseline"]}
    rows.append({"round": r, **m, "candidate_over_baseline": ratio})
    print(f"round {r}: candidate/baseline  CPU per look-up {ratio['cpu_us_per_lookup']:.3f}  "
          f"look-ups/s {ratio['lookups_per_second']:.3f}  publishes/s {ratio['publishes_per_second']:.3f}  "
          f"CPU per publish {ratio['cpu_us_per_publish']:.3f}")
med = {k: statistics.median(x["candidate_over_baseline"][k] for x in rows) for k in rows[0]["candidate_over_baseline"]}
print("median candidate/baseline: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
json.dump({
    "date": time.strftime("%Y-%m-%d"),
    "machine": {"cores": os.cpu_count(), "kernel": platform.release()},
    "baseline": base, "candidate": cand, "events": os.environ.get("EVENTS", "deaths"),
    "rounds": rows, "median_candidate_over_baseline": med,
}, open(out, "w"), indent=2)
EOF
