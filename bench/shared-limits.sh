#!/usr/bin/env bash
# The cost of limits shared by replicas: one gateway with its own limits (embedded) and one
# with [shared_limits] on Redis (127.0.0.1:6379, a prefix of its own), side by side in one run,
# quotas far above the load so only the decision's cost shows. ROUNDS (default 3) rounds of
# `civgate bench lookup` against each in turn (4 connections × 64 in flight, 2 s warm-up, 8 s
# measured); prints each round's look-ups/s, p50, p99 and gateway CPU µs per call, and the
# shared/embedded ratios of the median round.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
REDIS=${REDIS:-redis://127.0.0.1:6379}
if [ -z "${CIVGATE_BIN:-}" ]; then cargo build --release --locked --quiet; fi
B=${CIVGATE_BIN:-$PWD/target/release/civgate}
with_scratch
GW=$(free_port); ADMIN=$(free_port); GW1=$(free_port); ADMIN1=$(free_port); DIR=$(free_port)
"$B" certs init --dir "$T/certs" >/dev/null
shipped_config_on "$GW" "$ADMIN" "$DIR" >"$T/embedded.toml"
PREFIX="bench-$$"
sed -e "/^\[shared_limits\]/,/^\[/ s#^url = \"\"#url = \"$REDIS\"#" \
    -e "s#^prefix = \"civgate\"#prefix = \"$PREFIX\"#" "$T/embedded.toml" >"$T/shared.toml"
grep -q "$PREFIX" "$T/shared.toml"
"$B" refdb serve --config "$T/embedded.toml" >"$T/refdb.log" 2>&1 &
REFDB=$!; PIDS+=("$REFDB")
wait_for "$T/refdb.log" "directory serving"
"$B" serve --config "$T/embedded.toml" >"$T/embedded.log" 2>&1 &
E=$!; PIDS+=("$E")
wait_for "$T/embedded.log" "civgate serving"
"$B" serve --config "$T/shared.toml" --listen "127.0.0.1:$GW1" --admin-listen "127.0.0.1:$ADMIN1" \
    --data-dir "$T/data-shared" >"$T/shared.log" 2>&1 &
S=$!; PIDS+=("$S")
wait_for "$T/shared.log" "civgate serving"
grep -q "shared by replicas" "$T/shared.log"
common=(--certs "$T/certs" --connections 4 --concurrency 64 --warmup "$WARMUP" --duration "$DURATION" --json)
for r in $(seq "$ROUNDS"); do
    "$B" bench lookup --target gateway --addr "127.0.0.1:$GW" "${common[@]}" --server-pid "$E" >"$T/e$r.json"
    "$B" bench lookup --target gateway --addr "127.0.0.1:$GW1" "${common[@]}" --server-pid "$S" >"$T/s$r.json"
done
curl -s "http://127.0.0.1:$ADMIN1/metrics" | grep -E "^civgate_shared_limits_(up|fallbacks_total) " >&2 || true
python3 - "$T" "$ROUNDS" <<'PY'
import json, sys, statistics
t, rounds = sys.argv[1], int(sys.argv[2])
def load(p):
    with open(p) as f:
        return json.load(f)
rows = []
for r in range(1, rounds + 1):
    e, s = load(f"{t}/e{r}.json"), load(f"{t}/s{r}.json")
    rows.append((e, s))
    def fmt(x):
        cpu = x["server_cpu_us_per_request"][0][1]
        return f"{x['requests_per_second']:.0f}/s p50 {x['p50_ms']:.2f} ms p99 {x['p99_ms']:.2f} ms errors {x.get('errors', 0)} gateway CPU {cpu:.1f} us/call"
    print(f"round {r}: embedded {fmt(e)} | shared {fmt(s)} | shared/embedded req/s {s['requests_per_second']/e['requests_per_second']:.2f}, p99 {s['p99_ms']/e['p99_ms']:.2f}")
ratios = sorted(s['requests_per_second'] / e['requests_per_second'] for e, s in rows)
p99 = sorted(s['p99_ms'] / e['p99_ms'] for e, s in rows)
print(f"median shared/embedded: req/s {statistics.median(ratios):.2f}, p99 {statistics.median(p99):.2f}")
PY
