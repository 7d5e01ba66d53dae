#!/usr/bin/env python3
"""What an access list costs at accept: new connections per second (loadgen: connect, PING,
close; 2 connections at a time) straight to redis-server, then through Ballast and HAProxy 2.6,
each without a list and with
10,000 networks (random /16–/32 networks outside 127/8, then 127.0.0.0/8 last, so every client
is admitted after a full lookup). HAProxy's list is `tcp-request connection reject unless
{ src -f allow.lst }` (its ACL of IP networks is a tree too). One data-plane thread each,
in front of one redis-server; rounds interleaved; medians. Everything on 127.0.0.1, started
here and stopped by PID.
"""
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BALLAST, LOADGEN, ROOT_USER, Procs, free_port, wait_port  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "5"))
PREFIXES = int(os.environ.get("ACL_PREFIXES", "10000"))


def networks():
    rng = random.Random(7)
    out = []
    while len(out) < PREFIXES - 1:
        length = rng.randint(16, 32)
        a = rng.randint(0x0B000000, 0xDF000000) & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
        text = f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}/{length}"
        if a >> 24 != 127 and text not in out:
            out.append(text)
    return out + ["127.0.0.0/8"]


def connrate(port):
    out = subprocess.run([LOADGEN, "connrate", str(port), str(SECONDS), "2"], capture_output=True, text=True, timeout=SECONDS + 30)
    parts = out.stdout.split()
    return int(parts[1]), int(parts[5])


def main():
    tmp = tempfile.mkdtemp(prefix="ballast-aclbench-")
    procs = Procs()
    try:
        rport = free_port()
        procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", tmp, "--maxclients", "10000"])
        wait_port(rport)
        nets = networks()
        with open(os.path.join(tmp, "allow.lst"), "w") as f:
            f.write("\n".join(nets) + "\n")
        ports = {}
        for name, acl in [("haproxy", False), ("haproxy + 10k networks", True)]:
            port = free_port()
            rule = f"    tcp-request connection reject unless {{ src -f {tmp}/allow.lst }}\n" if acl else ""
            path = os.path.join(tmp, f"h{len(ports)}.cfg")
            with open(path, "w") as f:
                f.write(f"""global
    nbthread 1
    maxconn 5000
defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
listen svc
    bind 127.0.0.1:{port}
{rule}    server r 127.0.0.1:{rport}
""")
            procs.start(["haproxy", "-db", "-f", path], stderr=open(path + ".log", "w"))
            ports[name] = port
        for name, acl in [("ballast", False), ("ballast + 10k networks", True)]:
            port = free_port()
            allow = "    allow: [" + ", ".join(nets) + "]\n" if acl else ""
            path = os.path.join(tmp, f"b{len(ports)}.yaml")
            with open(path, "w") as f:
                f.write(f"""global:
  workers: 1
  maxconn: 5000
  log: {{ level: warning }}
{ROOT_USER}services:
  - name: svc
    bind: ["127.0.0.1:{port}"]
{allow}    servers: [{{ name: r, address: "127.0.0.1:{rport}" }}]
""")
            procs.start([BALLAST, "run", "-c", path], stderr=open(path + ".log", "w"))
            ports[name] = port
        for name, p in ports.items():
            try:
                wait_port(p)
            except RuntimeError:
                logs = "".join(open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".log"))
                raise RuntimeError(f"{name} does not listen on {p}: {logs[-2000:]}")
        ports = {"direct": rport, **ports}
        results = {n: [] for n in ports}
        failed = {n: 0 for n in ports}
        for _ in range(ROUNDS):
            for name, port in ports.items():
                cps, bad = connrate(port)
                results[name].append(cps)
                failed[name] += bad
        print(f"New connections per second with an access list of {PREFIXES:,} networks "
              f"(loadgen connrate, 2 at a time, {ROUNDS} × {SECONDS} s, medians)")
        print()
        print("| | connections/s | vs the same proxy without a list | failed |")
        print("|---|---:|---:|---:|")
        for name in ports:
            m = statistics.median(results[name])
            if name == "direct":
                print(f"| direct to redis-server | {m:,.0f} | | {failed[name]} |")
                continue
            base = "haproxy" if name.startswith("haproxy") else "ballast"
            print(f"| {name} | {m:,.0f} | {m / statistics.median(results[base]):.2f}× | {failed[name]} |")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
