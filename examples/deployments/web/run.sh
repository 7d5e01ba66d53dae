#!/usr/bin/env bash
# Two nginx servers (8081, 8082) behind Ballast (8090) with an HTTP check on /healthz, wrk
# through Ballast for 8 s; web1 is stopped 2 s in and started again 5 s in. Shows what Ballast
# logged and what wrk saw. Everything started here is stopped at the end.
cd "$(dirname "$0")/../../.."
here=examples/deployments/web
source examples/deployments/common.sh
declare -A nginx_pid
start_nginx() {  # name port
    sed -e "s|@DIR@|$work|g" -e "s|@NAME@|$1|g" -e "s|@PORT@|$2|g" "$here/nginx.conf.in" >"$work/$1.conf"
    nginx -c "$work/$1.conf" -p "$work" -e "$work/nginx-$1.err" &
    nginx_pid[$1]=$!
    pids+=($!)
}
start_nginx web1 8081
start_nginx web2 8082
sleep 0.5
start_ballast "$here/ballast.yaml"
sleep 1.2
for _ in 1 2 3 4; do curl -s http://127.0.0.1:8090/; done
echo "--- wrk -t1 -c20 -d8s through Ballast; web1 stops at 2 s and starts again at 5 s"
wrk -t1 -c20 -d8s http://127.0.0.1:8090/ >"$work/wrk.out" &
wrk_pid=$!
sleep 2
kill -TERM "${nginx_pid[web1]}"   # nginx's fast stop: its connections close
sleep 3
start_nginx web1 8081
wait "$wrk_pid"
cat "$work/wrk.out"
echo "--- Ballast's log"
grep -E "is (UP|DOWN)" "$work/ballast.log"
for _ in 1 2 3 4; do curl -s http://127.0.0.1:8090/; done
