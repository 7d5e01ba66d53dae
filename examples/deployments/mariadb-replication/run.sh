#!/usr/bin/env bash
# MariaDB replication behind Ballast, on loopback: a primary (3316) and a GTID replica (3317) in
# a temporary directory, Ballast's mysql-rw on 3390 and mysql-ro on 3391. The script shows where
# each service sends a client, injects replication lag (MASTER_DELAY while the primary writes) to
# take the replica out of mysql-ro and brings it back, then promotes the replica and shows
# mysql-rw follow and cut the old primary's session. Everything started here is stopped at the end.
cd "$(dirname "$0")/../../.."
here=examples/deployments/mariadb-replication
source examples/deployments/common.sh
start_db() {  # id port extra...
    local id=$1 port=$2
    shift 2
    mariadb-install-db --no-defaults --datadir="$work/db$id" --user="$(id -un)" --auth-root-authentication-method=normal \
        --skip-test-db >/dev/null
    mariadbd --no-defaults --datadir="$work/db$id" --socket="$work/db$id.sock" --port="$port" --bind-address=127.0.0.1 \
        --user="$(id -un)" --server-id="$id" --log-bin=mysql-bin --pid-file="$work/db$id.pid" \
        --innodb-buffer-pool-size=16M "$@" 2>"$work/db$id.err" &
    pids+=($!)
    for _ in $(seq 100); do mariadb --no-defaults -S "$work/db$id.sock" -u root -e "SELECT 1" >/dev/null 2>&1 && return; sleep 0.2; done
    echo "mariadbd $id did not start"; cat "$work/db$id.err"; exit 1
}
sql() { mariadb --no-defaults -S "$work/db$1.sock" -u root -N -B -e "$2"; }
start_db 1 3316
start_db 2 3317 --read-only=ON
for id in 1 2; do
    sql $id "SET sql_log_bin = 0; CREATE USER 'check'@'%' IDENTIFIED BY 's3cret'; GRANT SLAVE MONITOR ON *.* TO 'check'@'%'"
done
sql 1 "CREATE USER 'repl'@'%' IDENTIFIED BY 'r3pl'; GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%'; CREATE DATABASE app; CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
sql 2 "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=3316, MASTER_USER='repl', MASTER_PASSWORD='r3pl', MASTER_USE_GTID=slave_pos; START SLAVE"
sleep 1
start_ballast "$here/ballast.yaml"
sleep 1.5
via() { mariadb --no-defaults -h 127.0.0.1 -P "$1" -u check -ps3cret --connect-timeout=2 -N -B -e "SELECT @@server_id" 2>&1 | tail -1; }
show() { $ballast ctl --socket /tmp/ballast-mariadb-demo.sock show stat | cut -d, -f1,2,18,37 | grep -v -e BACKEND -e FRONTEND; }
echo "--- mysql-rw (3390) answers from server $(via 3390), mysql-ro (3391) from server $(via 3391)"
show
echo "--- inject lag: the replica applies events 8 s late (MASTER_DELAY) while the primary writes"
sql 2 "STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 8; START SLAVE"
for i in $(seq 30); do sql 1 "INSERT INTO app.t (v) VALUES ($i)"; sleep 0.25; done
grep -E "mysql-ro/db2 is (UP|DOWN)" "$work/ballast.log" | tail -2
echo "mysql-ro now: $(via 3391)"
echo "--- lag removed"
sql 2 "STOP SLAVE; CHANGE MASTER TO MASTER_DELAY = 0; START SLAVE"
sleep 2
grep -E "mysql-ro/db2 is (UP|DOWN)" "$work/ballast.log" | tail -1
echo "--- a session on the primary through mysql-rw, then the replica is promoted"
(mariadb --no-defaults -h 127.0.0.1 -P 3390 -u check -ps3cret -N -B -e "SELECT 'session open on', @@server_id; SELECT SLEEP(20); SELECT 'still open'" 2>&1 | sed 's/^/    session: /') &
sleep 0.5
sql 1 "SET GLOBAL read_only = ON"
sql 2 "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF"
sleep 1.5
grep -E "mysql-rw/db. is (UP|DOWN)" "$work/ballast.log" | tail -2
echo "mysql-rw now answers from server $(via 3390)"
show
