# Helpers shared by the bench scripts (sourced).

# A loopback port nothing listens on right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for FILE PATTERN: until a line of FILE matches (30 s), else print FILE and exit 1.
wait_for() {
    for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1" >&2
    cat "$1" >&2
    exit 1
}

# shipped_config_on GW ADMIN DIR [FILE]: the repository's civgate.toml (or FILE) on these
# loopback ports, with look-up quotas and per-agency in-flight caps far above any bench's load
# (stdout).
shipped_config_on() {
    sed -e "s/127.0.0.1:7443/127.0.0.1:$1/" \
        -e "s/127.0.0.1:9095/127.0.0.1:$2/" \
        -e "s/127.0.0.1:7444/127.0.0.1:$3/" \
        -e "s#https://localhost:7444#https://localhost:$3#" \
        -e "s#per_second = 500, burst = 1000#per_second = 10000000, burst = 10000000#" \
        -e "s/max_in_flight_per_agency = 256/max_in_flight_per_agency = 4096/" \
        "${4:-civgate.toml}"
}

# with_scratch: a temporary directory in T, and PIDS, the processes started into it; at exit
# they are stopped and the directory removed.
with_scratch() {
    T=$(mktemp -d)
    PIDS=()
    trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"' EXIT
}
