#!/usr/bin/env bash
# Ballast's main job on a ready example: two redis-servers on loopback, Ballast in front of them
# (examples/demo.yaml), and traffic through it: which backend answers each new connection, then
# redis-benchmark through the proxy. Everything started here is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build -c release
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
    rm -f /tmp/ballast-demo.sock
}
trap cleanup EXIT
for port in 7001 7002; do
    redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save "" --appendonly no \
        --logfile "$work/redis-$port.log" &
    pids+=($!)
done
sleep 0.5
config=examples/demo.yaml
if [ "$(id -u)" -eq 0 ]; then
    # Ballast refuses to serve as root: run the demo as nobody after binding.
    config="$work/demo.yaml"
    sed 's/^global:$/global:\n  user: nobody/' examples/demo.yaml > "$config"
fi
.build/release/ballast check -c "$config"
.build/release/ballast run -c "$config" 2>"$work/ballast.log" &
pids+=($!)
for _ in $(seq 50); do grep -q started "$work/ballast.log" && break; sleep 0.1; done
echo "--- Ballast log"
cat "$work/ballast.log"
echo "--- Six new connections through 127.0.0.1:6390 (weights 2:1), each asking its server's port"
for _ in 1 2 3 4 5 6; do echo "answered by the server on port $(redis-cli -p 6390 --raw CONFIG GET port | tail -1)"; done
echo "--- SET through the proxy, GET from each server directly"
redis-cli -p 6390 SET demo:key "hello through ballast"
for port in 7001 7002; do echo "server $port: $(redis-cli -p $port GET demo:key)"; done
echo "--- redis-benchmark -c 50 through Ballast"
redis-benchmark -p 6390 -c 50 -n 100000 -t set,get -q 2>&1 | tr '\r' '\n' | grep "requests per second"
echo "--- Per-connection log lines (last 3)"
grep "connection closed" "$work/ballast.log" | tail -3
echo "--- Runtime API: show stat (HAProxy's CSV; a few columns: pxname,svname,scur,stot,bin,bout,status,weight,lbtot)"
.build/release/ballast ctl --socket /tmp/ballast-demo.sock show stat | cut -d, -f1,2,5,8,9,10,18,19,31
echo "--- Drain r1 at run time: new connections all go to r2, then make it ready again"
.build/release/ballast ctl --socket /tmp/ballast-demo.sock set server redis/r1 state drain
for _ in 1 2 3; do echo "answered by the server on port $(redis-cli -p 6390 --raw CONFIG GET port | tail -1)"; done
.build/release/ballast ctl --socket /tmp/ballast-demo.sock set server redis/r1 state ready
echo "--- Prometheus /metrics (server sessions)"
curl -s http://127.0.0.1:9101/metrics | grep '^ballast_server_sessions_total'
