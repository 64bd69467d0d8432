#!/usr/bin/env bash
# Which shared store for limits shared by replicas: one GCRA quota decision (read the bucket,
# decide, write it back, atomically) on Redis (a Lua script, as civgate runs it) and on
# PostgreSQL (one INSERT … ON CONFLICT DO UPDATE … WHERE), one client and 8 clients on one hot
# bucket. Needs redis-benchmark and pgbench (Debian's redis-tools, postgresql-client), Redis on
# 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (database test, trust auth).
set -euo pipefail
SECS=${SECS:-5}
N=${N:-20000}
script='local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1]); local burst = tonumber(ARGV[2]); local n = tonumber(ARGV[3])
local tat = tonumber(redis.call("GET", KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + T * n
if new_tat - T * burst > now then return {0, new_tat - T * burst - now} end
redis.call("SET", KEYS[1], new_tat, "PX", math.floor((new_tat - now) / 1000) + 1000)
return {1, 0}'
for c in 1 8; do
    echo "== Redis, $c client(s)"
    redis-benchmark -h 127.0.0.1 -n "$N" -c "$c" -q EVAL "$script" 1 bench:gcra 2000 1000000 1 | tail -1 | sed 's/.*: //'
done
redis-cli -h 127.0.0.1 del bench:gcra >/dev/null
psql -h 127.0.0.1 -U postgres -d test -qc "CREATE TABLE IF NOT EXISTS bench_gcra (k text PRIMARY KEY, tat bigint NOT NULL)"
sql=$(mktemp)
cat >"$sql" <<'SQL'
INSERT INTO bench_gcra AS b (k, tat) VALUES ('q', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint + 2000)
ON CONFLICT (k) DO UPDATE SET tat = greatest(b.tat, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + 2000
WHERE greatest(b.tat, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) + 2000 - 2000 * 1000000
      <= (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
RETURNING tat;
SQL
for c in 1 8; do
    echo "== PostgreSQL, $c client(s)"
    pgbench -h 127.0.0.1 -U postgres -n -c "$c" -j "$((c < 2 ? c : 2))" -T "$SECS" -f "$sql" test 2>&1 |
        grep -E "latency average|^tps" | tr '\n' ' '
    echo
done
psql -h 127.0.0.1 -U postgres -d test -qc "DROP TABLE bench_gcra"
rm -f "$sql"
