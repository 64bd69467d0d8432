#!/usr/bin/env bash
# civgate vs nginx vs HAProxy vs the directory alone, side by side in one run.
#
#   bench/compare.sh [OUT.json]      (default: bench/compare.json)
#
# Measures with `civgate bench lookup` at the same settings (4 connections x 64 in flight, 2 s
# warm-up, 8 s measured, release build), everything on 127.0.0.1:
#   (a) direct  — the reference population directory over mutual TLS;
#   (b) nginx   — nginx as a gRPC reverse proxy (mTLS in, limit_req far above the load,
#                 access_log to a file, upstream keepalive, mTLS out) → the directory;
#   (h) haproxy — HAProxy (Debian's 2.6) as a gRPC reverse proxy: mTLS in with the CA and the
#                 CRL, a stick-table tracking each client certificate DN's request rate with a
#                 deny rule far above the load, an HTTP access log, `http-reuse always`, mTLS
#                 HTTP/2 out → the directory (it multiplexes streams as civgate does);
#   (c) civgate — mTLS in, identity, policy, purpose filter, rate limit (far above the load),
#                 durable audit record, mTLS out → the directory; the shipped configuration
#                 (worker_threads = 0: on up to 2 cores, as here, a single-threaded runtime;
#                 upstream.connections = 0: one directory connection per serving thread);
#   (d) civgate as (c) on a work-stealing runtime of 2 threads (worker_threads = 2, what the
#                 shipped configuration picks on bigger machines: one thread per core);
#   (e) civgate as (c) with tonic's Channel as the directory client ([upstream] client =
#                 "tonic") instead of its own h2 client: the ratio e/c of the gateway's CPU per
#                 look-up says what the hand-written client saves.
# For each: req/s, p50/p99/p99.9, errors, CPU µs per request of each server process (from
# /proc/PID/stat over the measured window). Prints one table and the ratios c/b, c/a, d/b, d/a
# and c/h, d/h, and writes everything as JSON. Installs nginx and haproxy with apt-get if they
# are missing; leaves nothing running.
# ROUNDS (default 3) repeats (a), (b), (c), (d) in turn; ratios are taken within each round and the
# medians reported, since one 8 s window on a shared 2-core machine swings by ±20%.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
OUT=${1:-bench/compare.json}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}

for pkg in nginx haproxy; do
    if ! command -v "$pkg" >/dev/null; then
        echo "installing $pkg (apt-get)…"
        (apt-get install -y -qq "$pkg" >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq "$pkg" >/dev/null))
    fi
done
# CIVGATE_BIN=path measures another build (e.g. a baseline commit's) without rebuilding.
if [ -z "${CIVGATE_BIN:-}" ]; then cargo build --release --locked --quiet; fi
B=${CIVGATE_BIN:-$PWD/target/release/civgate}

T=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -s "$T/nginx.pid" ]; then kill "$(cat "$T/nginx.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

# Free loopback ports for the gateway, its admin port, the directory and nginx.
GW=$(free_port)
ADMIN=$(free_port)
GW1=$(free_port)
ADMIN1=$(free_port)
GW2=$(free_port)
ADMIN2=$(free_port)
DIR=$(free_port)
NGX=$(free_port)
HAP=$(free_port)

"$B" certs init --dir "$T/certs" >/dev/null
# The shipped configuration, on these ports, with quotas far above the load.
shipped_config_on "$GW" "$ADMIN" "$DIR" >"$T/civgate.toml"
"$B" config check --config "$T/civgate.toml" >/dev/null

"$B" refdb serve --config "$T/civgate.toml" >"$T/refdb.log" 2>&1 &
REFDB=$!
PIDS+=("$REFDB")
wait_for "$T/refdb.log" "directory serving"

cat >"$T/nginx.conf" <<EOF
worker_processes auto;
pid $T/nginx.pid;
error_log $T/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log $T/nginx-access.log;
    # Long-lived client connections (a bench connection carries far more than the default 1,000
    # requests; at the limit nginx closes it and the calls in flight fail).
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    limit_req_zone \$ssl_client_s_dn zone=agency:10m rate=10000000r/s;
    upstream directory {
        server 127.0.0.1:$DIR;
        keepalive 256;
        keepalive_requests 1000000000;
    }
    server {
        listen 127.0.0.1:$NGX ssl http2;
        ssl_certificate $T/certs/server.pem;
        ssl_certificate_key $T/certs/server.key;
        ssl_client_certificate $T/certs/ca.pem;
        ssl_crl $T/certs/crl.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        http2_max_concurrent_streams 256;
        location / {
            limit_req zone=agency burst=10000000 nodelay;
            grpc_pass grpcs://directory;
            grpc_ssl_certificate $T/certs/clients/gateway.pem;
            grpc_ssl_certificate_key $T/certs/clients/gateway.key;
            grpc_ssl_trusted_certificate $T/certs/ca.pem;
            grpc_ssl_verify on;
            grpc_ssl_name localhost;
            grpc_ssl_session_reuse on;
        }
    }
}
EOF
nginx -c "$T/nginx.conf" -p "$T" -e "$T/nginx-error.log"
for _ in $(seq 50); do [ -s "$T/nginx.pid" ] && break; sleep 0.1; done
NGINX_WORKERS=$(pgrep -P "$(cat "$T/nginx.pid")" | tr '\n' ' ')

# HAProxy wants each certificate and its key in one file.
cat "$T/certs/server.pem" "$T/certs/server.key" >"$T/haproxy-server.pem"
cat "$T/certs/clients/gateway.pem" "$T/certs/clients/gateway.key" >"$T/haproxy-client.pem"
cat >"$T/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 8000
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend grpc_in
    bind 127.0.0.1:$HAP ssl crt $T/haproxy-server.pem ca-file $T/certs/ca.pem crl-file $T/certs/crl.pem verify required alpn h2
    stick-table type string len 512 size 100k expire 60s store http_req_rate(1s)
    http-request track-sc0 ssl_c_s_dn
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 10000000 }
    default_backend directory
backend directory
    http-reuse always
    server dir 127.0.0.1:$DIR ssl verify required ca-file $T/certs/ca.pem crt $T/haproxy-client.pem verifyhost localhost sni str(localhost) alpn h2
EOF
haproxy -c -f "$T/haproxy.cfg" >/dev/null
haproxy -db -f "$T/haproxy.cfg" >"$T/haproxy-access.log" 2>"$T/haproxy-error.log" &
HAPROXY=$!
PIDS+=("$HAPROXY")
for _ in $(seq 50); do ss -ltn | grep -q ":$HAP " && break; sleep 0.1; done
ss -ltn | grep -q ":$HAP " || { echo "haproxy did not start:" >&2; cat "$T/haproxy-error.log" >&2; exit 1; }

"$B" serve --config "$T/civgate.toml" >"$T/gateway.log" 2>&1 &
GATEWAY=$!
PIDS+=("$GATEWAY")
wait_for "$T/gateway.log" "civgate serving"
sed -e "s/^worker_threads = 0/worker_threads = 2/" "$T/civgate.toml" >"$T/civgate-ws.toml"
grep -q "^worker_threads = 2" "$T/civgate-ws.toml"
"$B" serve --config "$T/civgate-ws.toml" --listen "127.0.0.1:$GW1" --admin-listen "127.0.0.1:$ADMIN1" \
    --data-dir "$T/data-ws" >"$T/gateway-ws.log" 2>&1 &
GATEWAY1=$!
PIDS+=("$GATEWAY1")
wait_for "$T/gateway-ws.log" "civgate serving"
# The runtime each gateway reports in its "civgate serving" line (colours stripped).
runtime_of() { sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -o 'runtime[=":]*[a-z-]*' | head -1 | sed 's/.*[=":]//'; }
# (e): the same configuration, tonic's Channel towards the directory.
sed -e "s/^\[upstream\]/[upstream]\nclient = \"tonic\"/" "$T/civgate.toml" >"$T/civgate-tonic.toml"
grep -q '^client = "tonic"' "$T/civgate-tonic.toml"
"$B" serve --config "$T/civgate-tonic.toml" --listen "127.0.0.1:$GW2" --admin-listen "127.0.0.1:$ADMIN2" \
    --data-dir "$T/data-tonic" >"$T/gateway-tonic.log" 2>&1 &
GATEWAY2=$!
PIDS+=("$GATEWAY2")
wait_for "$T/gateway-tonic.log" "civgate serving"
RUNTIME_C=$(runtime_of "$T/gateway.log")
RUNTIME_D=$(runtime_of "$T/gateway-ws.log")
echo "(c) runs on a ${RUNTIME_C:-?} runtime, (d) on a ${RUNTIME_D:-?} one" >&2

common=(--certs "$T/certs" --connections 4 --concurrency 64 --warmup "$WARMUP" --duration "$DURATION" --json)
wpids=()
for w in $NGINX_WORKERS; do wpids+=(--server-pid "$w"); done
# The machines are noisy (their speed drifts by ±20% within minutes): ROUNDS rounds of
# (a), (b), (c), (d) in turn, each ratio taken within its round, and the median round reported.
for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS: (a) direct: the directory over mTLS" >&2
    "$B" bench lookup --target directory --addr "127.0.0.1:$DIR" "${common[@]}" \
        --server-pid "$REFDB" >"$T/a$r.json"
    echo "round $r/$ROUNDS: (b) nginx → directory" >&2
    "$B" bench lookup --target directory --addr "127.0.0.1:$NGX" "${common[@]}" \
        "${wpids[@]}" --server-pid "$REFDB" >"$T/b$r.json"
    echo "round $r/$ROUNDS: (h) haproxy → directory" >&2
    "$B" bench lookup --target directory --addr "127.0.0.1:$HAP" "${common[@]}" \
        --server-pid "$HAPROXY" --server-pid "$REFDB" >"$T/h$r.json"
    echo "round $r/$ROUNDS: (c) civgate → directory (durable audit)" >&2
    "$B" bench lookup --target gateway --addr "127.0.0.1:$GW" "${common[@]}" \
        --server-pid "$GATEWAY" --server-pid "$REFDB" >"$T/c$r.json"
    echo "round $r/$ROUNDS: (d) civgate, work-stealing runtime of 2 threads → directory (durable audit)" >&2
    "$B" bench lookup --target gateway --addr "127.0.0.1:$GW1" "${common[@]}" \
        --server-pid "$GATEWAY1" --server-pid "$REFDB" >"$T/d$r.json"
    echo "round $r/$ROUNDS: (e) civgate with tonic's Channel to the directory (durable audit)" >&2
    "$B" bench lookup --target gateway --addr "127.0.0.1:$GW2" "${common[@]}" \
        --server-pid "$GATEWAY2" --server-pid "$REFDB" >"$T/e$r.json"
done
AUDITED=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^civgate_audit_log_size / {print $2}')
AUDITED1=$(curl -s "http://127.0.0.1:$ADMIN1/metrics" | awk '/^civgate_audit_log_size / {print $2}')
LOGGED=$(wc -l <"$T/nginx-access.log")
HLOGGED=$(wc -l <"$T/haproxy-access.log")

python3 - "$T" "$OUT" "$REFDB" "$GATEWAY" "$NGINX_WORKERS" "$AUDITED" "$LOGGED" "$ROUNDS" "$GATEWAY1" "$AUDITED1" "${RUNTIME_C:-?}" "${RUNTIME_D:-?}" "$GATEWAY2" "$HAPROXY" "$HLOGGED" <<'EOF'
import json, os, platform, statistics, sys
t, out, refdb, gateway, workers, audited, logged, nrounds, gateway1, audited1, runtime_c, runtime_d, gateway2, haproxy, hlogged = sys.argv[1:16]
refdb, gateway, gateway1, gateway2, nrounds, haproxy = int(refdb), int(gateway), int(gateway1), int(gateway2), int(nrounds), int(haproxy)
workers = [int(w) for w in workers.split()]
names = {"a": "direct", "b": "nginx", "h": "haproxy", "c": "civgate", "d": "civgate-ws", "e": "civgate-tonic"}
proxy = {"a": [], "b": workers, "h": [haproxy], "c": [gateway], "d": [gateway1], "e": [gateway2]}

def load(k, r):
    run = json.load(open(f"{t}/{k}{r}.json"))
    cpu = dict((p, us) for p, us in run["server_cpu_us_per_request"])
    run["name"] = names[k]
    run["proxy_cpu_us_per_request"] = sum(cpu.get(p, 0.0) for p in proxy[k])
    run["directory_cpu_us_per_request"] = cpu.get(refdb, 0.0)
    return run

def ratios_of(runs):
    a, b = runs["a"], runs["b"]
    out = {}
    for k in "cd":
        c = runs[k]
        out[f"{k}_over_b_throughput"] = c["requests_per_second"] / b["requests_per_second"]
        out[f"{k}_over_a_throughput"] = c["requests_per_second"] / a["requests_per_second"]
        out[f"{k}_over_b_proxy_cpu"] = c["proxy_cpu_us_per_request"] / b["proxy_cpu_us_per_request"]
        out[f"{k}_p99_minus_b_p99_ms"] = c["p99_ms"] - b["p99_ms"]
        h = runs["h"]
        out[f"{k}_over_h_throughput"] = c["requests_per_second"] / h["requests_per_second"]
        out[f"{k}_over_h_proxy_cpu"] = c["proxy_cpu_us_per_request"] / h["proxy_cpu_us_per_request"]
        out[f"{k}_p99_minus_h_p99_ms"] = c["p99_ms"] - h["p99_ms"]
    # The directory client: tonic's Channel (e) against the gateway's own (c).
    out["e_over_c_proxy_cpu"] = runs["e"]["proxy_cpu_us_per_request"] / runs["c"]["proxy_cpu_us_per_request"]
    out["e_over_c_throughput"] = runs["e"]["requests_per_second"] / runs["c"]["requests_per_second"]
    return out

rounds = []
for r in range(1, nrounds + 1):
    runs = {k: load(k, r) for k in "abhcde"}
    rounds.append({"runs": runs, "ratios": ratios_of(runs)})
# The median round by c/b throughput; each ratio's median over the rounds as well.
median_round = sorted(rounds, key=lambda x: x["ratios"]["c_over_b_throughput"])[(nrounds - 1) // 2]
medians = {k: statistics.median(x["ratios"][k] for x in rounds) for k in rounds[0]["ratios"]}

print(f"{'round':<6}{'path':<11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>8}"
      f"{'proxy CPU µs/req':>18}{'directory CPU µs/req':>22}")
for i, rd in enumerate(rounds, 1):
    mark = "*" if rd is median_round else ""
    for k in "abhcde":
        r = rd["runs"][k]
        px = f"{r['proxy_cpu_us_per_request']:.1f}" if k != "a" else "-"
        print(f"{str(i) + mark:<6}{r['name']:<11}{r['requests_per_second']:>9.0f}{r['p50_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}{r['p999_ms']:>10.2f}{r['errors']:>8}{px:>18}"
              f"{r['directory_cpu_us_per_request']:>22.1f}")
for i, rd in enumerate(rounds, 1):
    x = rd["ratios"]
    print(f"round {i}: " + "   ".join(
        f"{k}/b {x[k + '_over_b_throughput']:.2f}  {k}/a {x[k + '_over_a_throughput']:.2f}  "
        f"CPU {k}/b {x[k + '_over_b_proxy_cpu']:.2f}  p99 {k}-b {x[k + '_p99_minus_b_p99_ms']:+.2f} ms"
        for k in "cd") + f"   CPU e/c {x['e_over_c_proxy_cpu']:.2f}  e/c {x['e_over_c_throughput']:.2f}")
for k in "cd":
    print(f"median of {nrounds} rounds, ({k}) {names[k]}: "
          f"{k}/b throughput {medians[k + '_over_b_throughput']:.2f} (target >= 1.3)   "
          f"{k}/a throughput {medians[k + '_over_a_throughput']:.2f} (target >= 0.6)   "
          f"{k}/b proxy CPU per request {medians[k + '_over_b_proxy_cpu']:.2f} (target <= 0.75)   "
          f"p99 {k} - b {medians[k + '_p99_minus_b_p99_ms']:+.2f} ms (target <= 0)")
for k in "cd":
    print(f"median of {nrounds} rounds, ({k}) {names[k]} against HAProxy: "
          f"{k}/h throughput {medians[k + '_over_h_throughput']:.2f} (target >= 1)   "
          f"{k}/h proxy CPU per request {medians[k + '_over_h_proxy_cpu']:.2f} (target <= 1)   "
          f"p99 {k} - h {medians[k + '_p99_minus_h_p99_ms']:+.2f} ms (target <= 0)")
print(f"median of {nrounds} rounds, the directory client: tonic's Channel / civgate's own: "
      f"gateway CPU per look-up {medians['e_over_c_proxy_cpu']:.2f}, throughput {medians['e_over_c_throughput']:.2f} "
      f"(the own client is kept if it saves >= 10%: CPU e/c >= 1.11)")
print(f"audit log sizes after the run: (c) {audited}, (d) {audited1}; nginx access-log lines: {logged}; haproxy access-log lines: {hlogged}")
json.dump({
    "machine": {"cores": os.cpu_count(), "kernel": platform.release()},
    "settings": {"connections": 4, "in_flight_per_connection": 64, "rounds": nrounds,
                 "civgate_worker_threads": {"c": 0, "d": 2},
                 "civgate_runtime": {"c": runtime_c, "d": runtime_d},
                 # upstream.connections = 0 (shipped): one per serving thread.
                 "civgate_upstream_connections": {"c": 0, "d": 0}},
    "rounds": rounds, "median_ratios": medians,
    # The median round (by c/b throughput), in the shape of a one-round run.
    "runs": median_round["runs"], "ratios": median_round["ratios"],
    "civgate_audit_log_size": int(float(audited or 0)),
    "civgate_ws_audit_log_size": int(float(audited1 or 0)), "nginx_access_log_lines": int(logged),
    "haproxy_access_log_lines": int(hlogged),
}, open(out, "w"), indent=2)
print(f"written: {out}")
EOF
