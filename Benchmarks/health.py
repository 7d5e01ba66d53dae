#!/usr/bin/env python3
"""Health-check costs, on this machine:

1. CPU used by checking 1,000 servers every second (tcp and redis checks against one local
   redis-server; all servers share its address, names differ), over a measured window.
2. Time from a server's death (SIGKILL of its redis-server) to: the first new client connection
   answered by the other server, and the log line that marks it DOWN.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BALLAST, ROOT_USER, cpu_seconds, free_port, wait_port  # noqa: E402

WINDOW = int(os.environ.get("HEALTH_WINDOW", "10"))


def redis(tmp, port):
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", tmp, "--maxclients", "4000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


def start_ballast(tmp, name, yaml):
    path = os.path.join(tmp, name + ".yaml")
    with open(path, "w") as f:
        f.write(yaml)
    log = open(path + ".log", "w+")
    p = subprocess.Popen([BALLAST, "run", "-c", path], stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(100):
        time.sleep(0.05)
        log.seek(0)
        if "started" in log.read():
            break
    return p, log


def thousand(tmp, backend, check):
    servers = "\n".join(f"      - {{ name: s{i}, address: 127.0.0.1:{backend} }}" for i in range(1000))
    yaml = f"""global:
  workers: 1
  log: {{ level: warning }}
{ROOT_USER}services:
  - name: many
    bind: ["127.0.0.1:{free_port()}"]
    check: {{ type: {check}, interval: 1s, timeout: 500ms }}
    servers:
{servers}
"""
    p, log = start_ballast(tmp, "many-" + check, yaml)
    time.sleep(2)  # let the spread start-up settle
    c0, t0 = cpu_seconds(p.pid), time.time()
    time.sleep(WINDOW)
    c1, t1 = cpu_seconds(p.pid), time.time()
    p.send_signal(signal.SIGTERM)
    p.wait(10)
    log.seek(0)
    downs = log.read().count("is DOWN")
    cpu = c1 - c0
    checks = 1000 * (t1 - t0)
    return cpu / (t1 - t0) * 100, cpu / checks * 1e6, downs


def ask_port(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nport\r\n")
    data = b""
    while data.count(b"\r\n") < 5:
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b"\r\n")[4])


def failover(tmp, interval_ms, fall):
    pa, pb = free_port(), free_port()
    ra, rb = redis(tmp, pa), redis(tmp, pb)
    front = free_port()
    yaml = f"""global:
  workers: 1
{ROOT_USER}defaults:
  retries: 2
services:
  - name: r
    bind: ["127.0.0.1:{front}"]
    check: {{ type: redis, interval: {interval_ms}ms, fastinterval: {max(interval_ms // 5, 20)}ms, timeout: {interval_ms // 2}ms, fall: {fall} }}
    servers:
      - {{ name: a, address: 127.0.0.1:{pa} }}
      - {{ name: b, address: 127.0.0.1:{pb} }}
"""
    p, log = start_ballast(tmp, f"failover-{interval_ms}", yaml)
    time.sleep(1)
    ra.kill()
    t0 = time.time()
    first_b = None
    while time.time() - t0 < 10:
        try:
            if ask_port(front) == pb and first_b is None:
                first_b = time.time() - t0
                break
        except OSError:
            pass
    down = None
    while time.time() - t0 < 10 and down is None:
        log.seek(0)
        if "Server r/a is DOWN" in log.read():
            down = time.time() - t0
        else:
            time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    p.wait(10)
    rb.kill()
    return first_b, down


def main():
    tmp = tempfile.mkdtemp(prefix="ballast-health-")
    port = free_port()
    r = redis(tmp, port)
    try:
        rows = [(check,) + thousand(tmp, port, check) for check in ("tcp", "redis")]
    finally:
        r.kill()
    print(f"Health checks, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {WINDOW}s window\n")
    print("| 1,000 servers checked every 1 s | CPU % of one core | CPU µs per check | servers marked DOWN |")
    print("|---|---:|---:|---:|")
    for check, pct, us, downs in rows:
        print(f"| `type: {check}` | {pct:.1f} | {us:.1f} | {downs} |")
    print("\n| redis check, server killed (SIGKILL) | first new connection on the other server | marked DOWN |")
    print("|---|---:|---:|")
    try:
        for interval, fall in ((1000, 3), (200, 2)):
            first_b, down = failover(tmp, interval, fall)
            fmt = lambda x: "—" if x is None else f"{x * 1000:.0f} ms"
            print(f"| interval {interval} ms, fastinterval {max(interval // 5, 20)} ms, fall {fall} | {fmt(first_b)} | {fmt(down)} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
