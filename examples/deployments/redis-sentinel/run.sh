#!/usr/bin/env bash
# Redis with Sentinel behind Ballast, on loopback: a master (7301), two replicas (7302, 7303),
# three Sentinels (27301-27303), Ballast's redis-rw on 6380 and redis-ro on 6381. A writer pushes
# numbered writes through redis-rw and keeps the ones Redis acknowledged; the script forces a
# Sentinel failover, then kills the new master with SIGKILL, shows what Ballast did, and counts the
# acknowledged writes missing from the final master. Everything started here is stopped at the end.
cd "$(dirname "$0")/../../.."
here=examples/deployments/redis-sentinel
source examples/deployments/common.sh
declare -A redis_pid
start_redis() {  # port [master-port]
    local extra=()
    [ -n "${2:-}" ] && extra=(--replicaof 127.0.0.1 "$2")
    redis-server --port "$1" --bind 127.0.0.1 --dir "$work" --dbfilename "dump-$1.rdb" --save "" --appendonly no \
        --repl-diskless-sync-delay 0 --logfile "$work/redis-$1.log" "${extra[@]}" &
    redis_pid[$1]=$!
    pids+=($!)
}
start_redis 7301
start_redis 7302 7301
start_redis 7303 7301
for port in 27301 27302 27303; do
    cat >"$work/sentinel-$port.conf" <<CONF
port $port
bind 127.0.0.1
dir $work
logfile $work/sentinel-$port.log
sentinel monitor mymaster 127.0.0.1 7301 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 10000
CONF
    redis-server "$work/sentinel-$port.conf" --sentinel &
    pids+=($!)
done
echo "--- waiting for the Sentinels to know both replicas and each other"
for _ in $(seq 100); do
    ok=1
    for port in 27301 27302 27303; do
        [ "$(redis-cli -p $port SENTINEL replicas mymaster 2>/dev/null | grep -c '^name$')" -eq 2 ] || ok=0
        [ "$(redis-cli -p $port SENTINEL sentinels mymaster 2>/dev/null | grep -c '^name$')" -eq 2 ] || ok=0
    done
    [ $ok -eq 1 ] && break
    sleep 0.2
done
start_ballast "$here/ballast.yaml"
sleep 1
show() { $ballast ctl --socket /tmp/ballast-sentinel-demo.sock show stat | cut -d, -f1,2,18,37 | grep -v BACKEND; }
echo "--- show stat (service, server, status, check detail)"
show
echo "--- a writer: RPUSH acked N through redis-rw (6380), one at a time"
( i=0; while :; do i=$((i+1)); if redis-cli -p 6380 RPUSH acked "$i" 2>/dev/null | grep -qE '^[0-9]+$'; then echo "$i"; fi; done ) >"$work/acked" &
writer=$!
pids+=($writer)
sleep 2
echo "--- SENTINEL FAILOVER mymaster (the old master is not paused by Sentinel)"
redis-cli -p 27301 SENTINEL FAILOVER mymaster
sleep 3
grep -E "sentinel|takes the writes|is (UP|DOWN)" "$work/ballast.log" | tail -6
show
new=$(redis-cli -p 27301 SENTINEL get-master-addr-by-name mymaster | tail -1)
echo "--- kill -9 the new master (port $new); Sentinel fails over after down-after-milliseconds (1 s)"
kill -9 "${redis_pid[$new]}"
sleep 6
grep -E "sentinel|takes the writes|is (UP|DOWN)" "$work/ballast.log" | tail -6
show
kill "$writer" 2>/dev/null || true
sleep 0.2
final=$(redis-cli -p 27301 SENTINEL get-master-addr-by-name mymaster | tail -1)
redis-cli -p "$final" LRANGE acked 0 -1 | sort -n >"$work/present"
sort -n "$work/acked" >"$work/acked.sorted"
lost=$(comm -23 "$work/acked.sorted" "$work/present" | wc -l)
echo "--- $(wc -l <"$work/acked") writes acknowledged through Ballast; $lost missing from the final master ($final)"
echo "    (after a SIGKILL, Redis's asynchronous replication may lose the last writes the dead master had not sent;"
echo "     a graceful failover loses none: Ballast stops writes to the old master when Sentinel selects the replica)"
