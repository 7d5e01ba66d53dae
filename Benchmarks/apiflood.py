#!/usr/bin/env python3
"""One runtime API client flooding the socket, Ballast beside HAProxy 2.6: 30,000 `show stat` in
prompt mode from one client (as `yes 'show stat' | head -n 30000 | socat` sends them), read as
fast as the client can. Meanwhile another client asks `show info` on a new connection every
20 ms. Reported per proxy: that client's p50 / p99 / max latency, the flood's duration and
bytes, the CPU the whole process used during it (user + system, from /proc), RSS before,
during (peak of samples) and 2 s after.

Both proxies: one data-plane thread, one service with 50 servers (unchecked), a stats socket at
admin level. Everything on 127.0.0.1 and Unix sockets, started here and stopped by PID.
"""
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BALLAST, ROOT_USER, Procs, ask, cpu_seconds, free_port, pct, rss_mib, wait_port  # noqa: E402

COMMANDS = int(os.environ.get("FLOOD_COMMANDS", "30000"))
SERVERS = 50




def flood(path, pid):
    before = rss_mib(pid)
    cpu0 = cpu_seconds(pid)
    f = socket.socket(socket.AF_UNIX)
    f.connect(path)
    got = [0]
    done = threading.Event()

    def reader():
        while True:
            d = f.recv(1 << 20)
            if not d:
                break
            got[0] += len(d)
        done.set()

    def writer():
        f.sendall(b"prompt\n" + b"show stat\n" * COMMANDS + b"quit\n")

    threading.Thread(target=reader, daemon=True).start()
    t0 = time.perf_counter()
    threading.Thread(target=writer, daemon=True).start()
    lat = []
    peak = before
    while not done.is_set() and time.perf_counter() - t0 < 600:
        a = time.perf_counter()
        out = ask(path, "show info")
        lat.append((time.perf_counter() - a) * 1000)
        if b"Pid" not in out:
            raise RuntimeError(f"bad show info reply: {out[:100]!r}")
        peak = max(peak, rss_mib(pid))
        time.sleep(0.02)
    done.wait(600)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    f.close()
    time.sleep(2)
    return {"lat": lat, "seconds": seconds, "bytes": got[0], "cpu": cpu, "before": before, "peak": peak, "after": rss_mib(pid)}



def main():
    tmp = tempfile.mkdtemp(prefix="ballast-apiflood-")
    procs = Procs()
    try:
        hport, bport = free_port(), free_port()
        hsock, bsock = os.path.join(tmp, "haproxy.sock"), os.path.join(tmp, "ballast.sock")
        servers = "".join(f"    server s{i} 127.0.0.1:{20000 + i}\n" for i in range(SERVERS))
        with open(os.path.join(tmp, "h.cfg"), "w") as f:
            f.write(f"""global
    nbthread 1
    maxconn 5000
    stats socket {hsock} mode 600 level admin
    stats timeout 10m
defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
listen svc
    bind 127.0.0.1:{hport}
{servers}""")
        hp = procs.start(["haproxy", "-db", "-f", os.path.join(tmp, "h.cfg")])
        servers = "".join(f"      - {{ name: s{i}, address: 127.0.0.1:{20000 + i} }}\n" for i in range(SERVERS))
        with open(os.path.join(tmp, "b.yaml"), "w") as f:
            f.write(f"""global:
  workers: 1
  maxconn: 5000
  log: {{ level: warning }}
  stats:
    timeout: 10m
    sockets:
      - {{ path: {bsock}, level: admin }}
{ROOT_USER}services:
  - name: svc
    bind: ["127.0.0.1:{bport}"]
    servers:
{servers}""")
        bp = procs.start([BALLAST, "run", "-c", os.path.join(tmp, "b.yaml")], stderr=open(os.path.join(tmp, "b.log"), "w"))
        wait_port(hport)
        wait_port(bport)
        time.sleep(1)
        results = {"haproxy": flood(hsock, hp.pid), "ballast": flood(bsock, bp.pid)}
        print(f"Runtime API flood: {COMMANDS:,} `show stat` ({SERVERS} servers) in prompt mode from one client, "
              "read as fast as it can; another client's `show info` every 20 ms meanwhile")
        print()
        print("| | show info p50 / p99 / max ms | flood took | flood replies | process CPU during the flood | "
              "RSS before / peak / 2 s after MiB |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            lat = r["lat"]
            print(f"| {name} | {statistics.median(lat):.1f} / {pct(lat, .99):.1f} / {max(lat):.1f} | {r['seconds']:.1f} s | "
                  f"{r['bytes'] / 1048576:.0f} MiB | {r['cpu']:.1f} s ({100 * r['cpu'] / r['seconds']:.0f} % of a core) | "
                  f"{r['before']:.1f} / {r['peak']:.1f} / {r['after']:.1f} |")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
