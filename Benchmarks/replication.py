#!/usr/bin/env python3
"""Balancers in front of replicated stores, in one run.

1. Redis failover: a master, two replicas and three Sentinels (down-after-milliseconds 2000), a
   careful writer (one RPUSH at a time, every acknowledgement recorded with its time) through
     ballast-sentinel  Ballast, check role: master + sentinel: (events and polls)
     ballast           Ballast, check role: master, no sentinel (replication history decides)
     haproxy           HAProxy 2.6 with its documented tcp-check role script (PING, info
                       replication, expect role:master), inter 1s, on-marked-down shutdown-sessions
   and two failovers each, on a fresh cluster: SENTINEL FAILOVER (graceful) and kill -9 of the
   master. Reported: the write outage (longest gap between two acknowledgements) and the
   acknowledged writes missing from the final master (for kill -9: those acknowledged after the
   kill, which only a balancer sending writes to the wrong server can lose, and those before it,
   which Redis's asynchronous replication loses).

2. sysbench oltp_read_write and oltp_read_only against MariaDB: direct, through Ballast, through
   HAProxy (tps, p95 latency).

Everything listens on 127.0.0.1, every process is started here and stopped by PID.
"""
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLAST = os.environ.get("BALLAST_BIN", os.path.join(ROOT, ".build-static", "release", "ballast"))
ROOT_USER = "  user: root\n" if os.geteuid() == 0 else ""
SYSBENCH_SECONDS = int(os.environ.get("SYSBENCH_SECONDS", "10"))
SYSBENCH_ROUNDS = int(os.environ.get("SYSBENCH_ROUNDS", "3"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def command(port, *args, timeout=1.0):
    """One RESP command; the raw reply (enough for the short replies read here)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        req = "*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)
        s.sendall(req.encode())
        data = b""
        s.settimeout(timeout)
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            if complete(data):
                break
        return data.decode(errors="replace")
    finally:
        s.close()


def complete(b, i=0):
    return skip(b, i) is not None


def skip(b, i):
    end = b.find(b"\r\n", i)
    if end < 0:
        return None
    kind, n = b[i:i + 1], int(b[i + 1:end] or 0) if b[i:i + 1] in (b"$", b"*") else 0
    if kind == b"$":
        return None if n >= 0 and len(b) < end + 2 + n + 2 else (end + 2 + max(n, 0) + (2 if n >= 0 else 0))
    if kind == b"*":
        k = end + 2
        for _ in range(max(n, 0)):
            k = skip(b, k)
            if k is None:
                return None
        return k
    return end + 2


class Cluster:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ballast-repl-")
        self.ports = [free_port() for _ in range(3)]
        self.sentinels = [free_port() for _ in range(3)]
        self.procs = {}
        self.others = []
        for k, port in enumerate(self.ports):
            self.start_node(k, None if k == 0 else self.ports[0])
        for k, port in enumerate(self.sentinels):
            conf = os.path.join(self.dir, "s%d.conf" % k)
            with open(conf, "w") as f:
                f.write("port %d\nbind 127.0.0.1\ndir %s\nlogfile %s/s%d.log\n" % (port, self.dir, self.dir, k))
                f.write("sentinel monitor mymaster 127.0.0.1 %d 2\n" % self.ports[0])
                f.write("sentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n")
            self.others.append(subprocess.Popen(["redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 40
        while time.time() < deadline:
            try:
                ok = all(command(s, "SENTINEL", "replicas", "mymaster").startswith("*2\r\n")
                         and command(s, "SENTINEL", "sentinels", "mymaster").startswith("*2\r\n") for s in self.sentinels)
                ok = ok and all("master_link_status:up" in command(p, "INFO", "replication") for p in self.ports[1:])
            except OSError:
                ok = False
            if ok:
                return
            time.sleep(0.2)
        raise RuntimeError("the Sentinels did not settle")

    def start_node(self, k, master):
        args = ["redis-server", "--port", str(self.ports[k]), "--bind", "127.0.0.1", "--dir", self.dir, "--dbfilename",
                "d%d.rdb" % k, "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        if master:
            args += ["--replicaof", "127.0.0.1", str(master)]
        self.procs[k] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.ports[k])

    def named(self):
        for s in self.sentinels:
            try:
                r = command(s, "SENTINEL", "get-master-addr-by-name", "mymaster")
            except OSError:
                continue
            for k, p in enumerate(self.ports):
                if "\r\n%d\r\n" % p in r:
                    return k
        return None

    def kill(self, k):
        self.procs[k].send_signal(signal.SIGKILL)
        self.procs[k].wait()

    def stop(self):
        for p in list(self.procs.values()) + self.others:
            p.send_signal(signal.SIGKILL)
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Writer(threading.Thread):
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.acks, self.running = port, [], True
        self.start()

    def run(self):
        seq, s = 0, None
        while self.running:
            if s is None:
                try:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                except OSError:
                    time.sleep(0.01)
                    continue
            seq += 1
            v = str(seq)
            try:
                s.sendall(("*3\r\n$5\r\nRPUSH\r\n$5\r\nacked\r\n$%d\r\n%s\r\n" % (len(v), v)).encode())
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = s.recv(256)
                    if not chunk:
                        raise OSError("closed")
                    reply += chunk
                if reply.startswith(b":"):
                    self.acks.append((seq, time.time()))
                else:
                    raise OSError(reply.decode(errors="replace"))
            except OSError:
                s.close()
                s = None
                time.sleep(0.01)

    def stop(self):
        self.running = False
        self.join(5)

    def missing(self, port):
        acked = list(self.acks)
        r = command(port, "LRANGE", "acked", "0", "-1", timeout=5)
        present = set(int(line) for line in r.split("\r\n") if line.isdigit())
        return [a for a in acked if a[0] not in present]


def balancer(kind, cluster, front, tmp):
    servers = list(enumerate(cluster.ports))
    if kind == "haproxy":
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 1m\n  timeout server 1m\n")
            f.write("listen redis\n  bind 127.0.0.1:%d\n  balance first\n  option tcp-check\n" % front)
            f.write("  tcp-check connect\n  tcp-check send PING\\r\\n\n  tcp-check expect string +PONG\n")
            f.write("  tcp-check send info\\ replication\\r\\n\n  tcp-check expect string role:master\n")
            f.write("  tcp-check send QUIT\\r\\n\n  tcp-check expect string +OK\n")
            for k, p in servers:
                f.write("  server r%d 127.0.0.1:%d check inter 1s on-marked-down shutdown-sessions\n" % (k, p))
        return subprocess.Popen(["haproxy", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = os.path.join(tmp, "ballast.yaml")
    with open(cfg, "w") as f:
        f.write("global:\n  workers: 1\n" + ROOT_USER + "services:\n  - name: redis\n    bind: [\"127.0.0.1:%d\"]\n" % front)
        f.write("    balance: first\n    check: { type: redis, role: master, interval: 1s }\n    on_marked_down: shutdown-sessions\n")
        if kind == "ballast-sentinel":
            f.write("    sentinel: { addresses: [%s], master: mymaster, interval: 1s }\n" % ", ".join('"127.0.0.1:%d"' % s for s in cluster.sentinels))
        f.write("    servers:\n")
        for k, p in servers:
            f.write("      - { name: r%d, address: \"127.0.0.1:%d\" }\n" % (k, p))
    return subprocess.Popen([BALLAST, "run", "-c", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def longest_gap(acks, start, end):
    times = [t for _, t in acks if start <= t <= end]
    if len(times) < 2:
        return end - start
    return max(b - a for a, b in zip(times, times[1:]))


def failover_case(kind, fault):
    cluster = Cluster()
    tmp = tempfile.mkdtemp(prefix="ballast-lb-")
    front = free_port()
    lb = balancer(kind, cluster, front, tmp)
    try:
        wait_port(front)
        time.sleep(2.5)  # first checks (HAProxy's start UP; Ballast's role checks start DOWN)
        w = Writer(front)
        time.sleep(2)
        t0 = time.time()
        if fault == "graceful":
            command(cluster.sentinels[0], "SENTINEL", "FAILOVER", "mymaster")
        else:
            cluster.kill(0)
        deadline = time.time() + 30
        while time.time() < deadline and (cluster.named() in (None, 0)):
            time.sleep(0.05)
        time.sleep(4)
        t1 = time.time()
        w.stop()
        final = cluster.named()
        lost = w.missing(cluster.ports[final])
        after = [a for a in lost if a[1] >= t0]
        return longest_gap(w.acks, t0 - 1, t1), len(after), len(lost) - len(after), len(w.acks)
    finally:
        lb.send_signal(signal.SIGKILL)
        lb.wait()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def sysbench_part():
    tmp = tempfile.mkdtemp(prefix="ballast-sb-")
    os.chmod(tmp, 0o755)
    port, sock = free_port(), os.path.join(tmp, "m.sock")
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    subprocess.run(["mariadb-install-db", "--no-defaults", "--datadir=" + tmp + "/data", "--user=" + user,
                    "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = subprocess.Popen(["mariadbd", "--no-defaults", "--datadir=" + tmp + "/data", "--socket=" + sock, "--port=%d" % port,
                           "--bind-address=127.0.0.1", "--user=" + user, "--skip-log-bin", "--innodb-buffer-pool-size=128M",
                           "--max-connections=500"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = []
    try:
        wait_port(port, 30)
        time.sleep(0.5)
        sql = lambda q: subprocess.run(["mariadb", "--no-defaults", "-S", sock, "-u", "root", "-e", q], check=True)
        sql("CREATE DATABASE sbtest; CREATE USER 'sb'@'%' IDENTIFIED BY 'sb'; GRANT ALL ON sbtest.* TO 'sb'@'%'; "
            "CREATE USER 'check'@'%' IDENTIFIED BY 'c'")
        base = ["--db-driver=mysql", "--mysql-host=127.0.0.1", "--mysql-user=sb", "--mysql-password=sb", "--tables=4", "--table-size=20000"]
        subprocess.run(["sysbench", "oltp_read_write", "--mysql-port=%d" % port] + base + ["prepare"], check=True, stdout=subprocess.DEVNULL)
        bp, hp = free_port(), free_port()
        cfg = os.path.join(tmp, "ballast.yaml")
        with open(cfg, "w") as f:
            f.write("global:\n  workers: 1\n" + ROOT_USER + "services:\n  - name: db\n    bind: [\"127.0.0.1:%d\"]\n" % bp)
            f.write("    check: { type: mysql, user: check, password: c, require: primary }\n")
            f.write("    servers: [{ name: m, address: \"127.0.0.1:%d\" }]\n" % port)
        procs.append(subprocess.Popen([BALLAST, "run", "-c", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        hcfg = os.path.join(tmp, "haproxy.cfg")
        with open(hcfg, "w") as f:
            f.write("global\n  maxconn 1000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 1m\n  timeout server 1m\n")
            f.write("listen db\n  bind 127.0.0.1:%d\n  server m 127.0.0.1:%d check\n" % (hp, port))
        procs.append(subprocess.Popen(["haproxy", "-f", hcfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(bp)
        wait_port(hp)
        time.sleep(1.5)
        rows = []
        for test in ["oltp_read_write", "oltp_read_only"]:
            got = {}
            # Interleaved rounds: a slow moment of the machine hits every path alike; medians.
            for _ in range(SYSBENCH_ROUNDS):
                for name, p in [("direct", port), ("haproxy", hp), ("ballast", bp)]:
                    out = subprocess.run(["sysbench", test, "--mysql-port=%d" % p] + base + ["--threads=8", "--time=%d" % SYSBENCH_SECONDS,
                                         "--percentile=95", "run"], check=True, capture_output=True, text=True).stdout
                    tps = float(re.search(r"transactions:\s+\d+\s+\(([\d.]+) per sec", out).group(1))
                    p95 = float(re.search(r"95th percentile:\s+([\d.]+)", out).group(1))
                    got.setdefault(name, []).append((tps, p95))
            for name in ["direct", "haproxy", "ballast"]:
                rows.append((test, name, statistics.median(t for t, _ in got[name]), statistics.median(q for _, q in got[name])))
        return rows
    finally:
        for p in procs + [db]:
            p.send_signal(signal.SIGKILL)
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    print("Redis failover through a balancer (3 redis, 3 Sentinels with down-after-milliseconds 2000, one writer)")
    print()
    print("| balancer | failover | write outage (s) | acked writes lost by the balancer | lost by Redis's async replication | writes acked |")
    print("|---|---|---|---|---|---|")
    for fault in ["graceful", "sigkill"]:
        for kind in ["ballast-sentinel", "ballast", "haproxy"]:
            gap, after, before, total = failover_case(kind, fault)
            label = "SENTINEL FAILOVER" if fault == "graceful" else "kill -9 master"
            by_lb = after if fault == "sigkill" else after + before
            by_redis = before if fault == "sigkill" else 0
            print("| %s | %s | %.2f | %d | %d | %d |" % (kind, label, gap, by_lb, by_redis, total), flush=True)
    print()
    print("sysbench through a balancer (MariaDB 10.11, 4 tables of 20,000 rows, 8 threads, %d s each, median of %d interleaved rounds)"
          % (SYSBENCH_SECONDS, SYSBENCH_ROUNDS))
    print()
    print("| test | path | tps | p95 (ms) |")
    print("|---|---|---|---|")
    for test, name, tps, p95 in sysbench_part():
        print("| %s | %s | %.1f | %.2f |" % (test, name, tps, p95), flush=True)


if __name__ == "__main__":
    main()
