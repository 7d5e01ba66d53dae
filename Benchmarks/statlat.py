#!/usr/bin/env python3
"""`show stat` with 1,000 servers, Ballast beside HAProxy 2.6, with the proxy idle and while it
is saturated by redis-benchmark (-c 50 GET through it), and what the polling costs the traffic.

Both proxies: one data-plane thread, one service/listen with 1,000 servers (all pointing at one
local redis-server; tcp checks every second), a stats socket at admin level.
For each proxy and round:
  idle     POLLS requests `show stat`, one after another: latency p50 / p99 / max
  loaded   redis-benchmark runs through the proxy; `show stat` is polled back to back meanwhile:
           latency p50 / p99 / max, and redis-benchmark's requests/s during the polling
  baseline redis-benchmark through the proxy without polling (requests/s)
  direct   redis-benchmark straight to redis-server (requests/s), for scale
Everything on 127.0.0.1, started here and stopped by PID.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BALLAST, ROOT_USER, Procs, ask, free_port, pct, wait_port  # noqa: E402

SERVERS = int(os.environ.get("STAT_SERVERS", "1000"))
POLLS = int(os.environ.get("STAT_POLLS", "100"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
REQUESTS = int(os.environ.get("STAT_REDIS_REQUESTS", "300000"))



def poll(path, count=None, until=None):
    lat = []
    size = 0
    while (count is not None and len(lat) < count) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        out = ask(path, "show stat")
        lat.append((time.perf_counter() - t0) * 1000)
        size = len(out)
        if not out.startswith(b"# pxname,svname,"):
            raise RuntimeError(f"bad show stat reply: {out[:200]!r}")
    return lat, size


def redis_bench(port):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(REQUESTS), "-t", "get", "--csv"],
                         capture_output=True, text=True, timeout=600)
    rows = [l for l in out.stdout.splitlines() if l.startswith('"GET')]
    return float(rows[0].split(",")[1].strip('"'))



def main():
    tmp = tempfile.mkdtemp(prefix="ballast-statlat-")
    procs = Procs()
    try:
        rport = free_port()
        procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", tmp, "--maxclients", "10000"])
        wait_port(rport)
        sockets = {}
        ports = {}
        # HAProxy
        hport = free_port()
        hsock = os.path.join(tmp, "haproxy.sock")
        servers = "".join(f"    server s{i} 127.0.0.1:{rport} check inter 1s\n" for i in range(SERVERS))
        with open(os.path.join(tmp, "h.cfg"), "w") as f:
            f.write(f"""global
    nbthread 1
    maxconn 5000
    stats socket {hsock} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
listen svc
    bind 127.0.0.1:{hport}
    balance roundrobin
{servers}""")
        procs.start(["haproxy", "-db", "-f", os.path.join(tmp, "h.cfg")])
        sockets["haproxy"] = hsock
        ports["haproxy"] = hport
        # Ballast
        bport = free_port()
        bsock = os.path.join(tmp, "ballast.sock")
        servers = "".join(f"      - {{ name: s{i}, address: 127.0.0.1:{rport} }}\n" for i in range(SERVERS))
        with open(os.path.join(tmp, "b.yaml"), "w") as f:
            f.write(f"""global:
  workers: 1
  maxconn: 5000
  log: {{ level: warning }}
  stats:
    sockets:
      - {{ path: {bsock}, level: admin }}
{ROOT_USER}services:
  - name: svc
    bind: ["127.0.0.1:{bport}"]
    check: {{ type: tcp, interval: 1s, timeout: 1s }}
    servers:
{servers}""")
        procs.start([BALLAST, "run", "-c", os.path.join(tmp, "b.yaml")], stderr=open(os.path.join(tmp, "b.log"), "w"))
        sockets["ballast"] = bsock
        ports["ballast"] = bport
        for name in ports:
            wait_port(ports[name])
        time.sleep(3)  # first round of checks
        results = {n: {"idle": [], "loaded": [], "rps_polled": [], "rps_base": [], "size": 0, "polls": []} for n in ports}
        direct = []
        for _ in range(ROUNDS):
            direct.append(redis_bench(rport))
            for name in ["haproxy", "ballast"]:
                r = results[name]
                lat, size = poll(sockets[name], count=POLLS)
                r["idle"] += lat
                r["size"] = size
                r["rps_base"].append(redis_bench(ports[name]))
                stop = threading.Event()
                box = {}
                t = threading.Thread(target=lambda: box.update(rps=redis_bench(ports[name])) or stop.set())
                t.start()
                time.sleep(0.3)
                lat, _ = poll(sockets[name], until=stop)
                t.join()
                r["loaded"] += lat
                r["polls"].append(len(lat))
                r["rps_polled"].append(box["rps"])
        print(f"show stat with {SERVERS} servers (1 data-plane thread each; {ROUNDS} rounds, medians of requests/s)")
        print()
        print("| | reply | idle p50 / p99 / max ms | under load p50 / p99 / max ms | show stat done under load | "
              "redis GET req/s without polling | with back-to-back polling |")
        print("|---|---|---|---|---|---|---|")
        for name in ["haproxy", "ballast"]:
            r = results[name]
            i, l = r["idle"], r["loaded"]
            print(f"| {name} | {r['size'] / 1024:.0f} KiB | {statistics.median(i):.1f} / {pct(i, .99):.1f} / {max(i):.1f} | "
                  f"{statistics.median(l):.1f} / {pct(l, .99):.1f} / {max(l):.1f} | {sum(r['polls'])} | "
                  f"{statistics.median(r['rps_base']):,.0f} | {statistics.median(r['rps_polled']):,.0f} |")
        print(f"| direct | | | | | {statistics.median(direct):,.0f} | |")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
