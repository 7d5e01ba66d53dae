#!/usr/bin/env python3
"""dsr mode against nat mode, proxy mode and a direct connection, on this machine, in network
namespaces built here (root only). One L2 segment (a bridge):

  c 10.82.0.10      lb 10.82.0.2 (+ 10.82.0.100 for dsr, 10.82.0.101 for nat)      s 10.82.0.21

The server holds the dsr address on its loopback (arp_ignore/arp_announce), runs iperf3 -s and
redis-server. Each path, in interleaved rounds (ROUNDS, medians):
  direct         the client to the server's own address
  ballast-dsr    Ballast dsr mode: the balancer re-addresses the client's frames, the server
                 answers the client directly
  ballast-nat    Ballast nat mode with masquerade (both directions through the balancer)
  ballast-proxy  Ballast proxy mode (splice relay)
Workloads: iperf3 -R (the server sends, one stream, SECONDS), and redis-benchmark GET of
100 KiB values (-c 10). For each, the machine's CPU seconds (user + system + softirq, all
cores, from /proc/stat) per GB moved; the balancer's cost is that minus the direct path's,
since in namespaces the kernel's forwarding work is not any one process's.
Everything stops by PID and the namespaces are deleted at the end.
"""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BALLAST, Procs, netns_add, netns_teardown, sh  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "5"))
REDIS_N = int(os.environ.get("REDIS_N", "20000"))
P = f"dd{random.randint(100, 999)}"
HOSTS = ("c", "lb", "s", "sw")
NS = {k: f"{P}-{k}" for k in HOSTS}
ADDR = {"c": "10.82.0.10", "lb": "10.82.0.2", "s": "10.82.0.21"}
VIP = "10.82.0.100"
NATVIP = "10.82.0.101"


def ns(n, *args, **kw):
    return sh("ip", "netns", "exec", NS[n], *args, **kw)


def topology():
    netns_add(NS.values())
    sh("ip", "-n", NS["sw"], "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", NS["sw"], "link", "set", "br0", "up")
    for h in ("c", "lb", "s"):
        d = f"{P}{h}"
        sh("ip", "link", "add", d, "type", "veth", "peer", "name", d + "p")
        sh("ip", "link", "set", d, "netns", NS[h])
        sh("ip", "link", "set", d + "p", "netns", NS["sw"])
        sh("ip", "-n", NS["sw"], "link", "set", d + "p", "master", "br0", "up")
        sh("ip", "-n", NS[h], "addr", "add", ADDR[h] + "/24", "dev", d)
        sh("ip", "-n", NS[h], "link", "set", d, "up")
    for v in (VIP, NATVIP):
        sh("ip", "-n", NS["lb"], "addr", "add", v + "/32", "dev", f"{P}lb")
    ns("lb", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "-n", NS["s"], "addr", "add", VIP + "/32", "dev", "lo")
    ns("s", "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2")


def teardown():
    netns_teardown(NS.values())


def cpu_total():
    """CPU seconds of the whole machine so far: user, nice, system, irq, softirq."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    v = [int(x) for x in fields]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def iperf_reverse(host, port):
    c0 = cpu_total()
    out = ns("c", "iperf3", "-c", host, "-p", str(port), "-R", "-t", str(SECONDS), "-J", check=False)
    cpu = cpu_total() - c0
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(data["error"])
    gbit = data["end"]["sum_received"]["bits_per_second"] / 1e9
    gb = data["end"]["sum_received"]["bytes"] / 1e9
    return gbit, cpu / gb


def redis_get(host, port):
    # GETs of the one 100 KiB value set at the start (-r 1: always key:000000000000).
    c0 = cpu_total()
    t0 = time.time()
    out = ns("c", "redis-benchmark", "-h", host, "-p", str(port), "-t", "get", "-n",
             str(REDIS_N), "-c", "10", "-r", "1", "--csv", check=False)
    cpu = cpu_total() - c0
    elapsed = time.time() - t0
    rps = 0.0
    for line in out.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if parts and parts[0] == "GET" and len(parts) > 1:
            rps = float(parts[1])
    gb = REDIS_N * 100 * 1024 / 1e9
    return rps, cpu / gb, elapsed


def main():
    if os.geteuid() != 0:
        sys.exit("dsrbench needs root (it builds network namespaces)")
    for tool in ("iperf3", "redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"dsrbench needs {tool}")
    tmp = tempfile.mkdtemp(prefix="ballast-dsrbench-")
    procs = Procs()
    topology()
    try:
        procs.start(["ip", "netns", "exec", NS["s"], "iperf3", "-s", "-p", "5201"])
        procs.start(["ip", "netns", "exec", NS["s"], "redis-server", "--port", "6379", "--bind", "0.0.0.0",
                     "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", tmp])
        time.sleep(0.5)
        # The GET's value: 100 KiB under key:000000000000 (redis-benchmark -r 1 asks for it).
        ns("c", "redis-cli", "-h", ADDR["s"], "-p", "6379", "set", "key:000000000000", "v" * (100 * 1024))
        sock = os.path.join(tmp, "admin.sock")
        server = f'      - {{ name: s1, address: "{ADDR["s"]}:PORT" }}\n'
        services = ""
        for port in (5201, 6379):
            services += (f'  - name: dsr{port}\n    mode: dsr\n    interface: {P}lb\n    bind: "{VIP}:{port}"\n'
                         f"    servers:\n" + server.replace("PORT", str(port)))
            services += (f'  - name: nat{port}\n    mode: nat\n    bind: "{NATVIP}:{port}"\n'
                         f"    nat: {{ snat: masquerade }}\n    servers:\n" + server.replace("PORT", str(port)))
            services += (f'  - name: proxy{port}\n    bind: "{ADDR["lb"]}:{port + 10000}"\n'
                         f"    servers:\n" + server.replace("PORT", str(port)))
        path = os.path.join(tmp, "ballast.yaml")
        with open(path, "w") as f:
            f.write(f"global:\n  user: root\n  workers: 1\n  stats: {{ sockets: [{{ path: {sock}, level: admin }}] }}\n"
                    f"services:\n{services}")
        log = open(path + ".log", "w+")
        p = procs.start(["ip", "netns", "exec", NS["lb"], BALLAST, "run", "-c", path], stderr=log)
        for _ in range(100):
            time.sleep(0.1)
            log.seek(0)
            text = log.read()
            if "has L2 neighbour" in text and "started" in text:
                break
            if p.poll() is not None:
                sys.exit(f"ballast did not start:\n{text}")
        time.sleep(0.5)
        paths = {
            "direct": (ADDR["s"], 0),
            "ballast-dsr": (VIP, 0),
            "ballast-nat": (NATVIP, 0),
            "ballast-proxy": (ADDR["lb"], 10000),
        }
        bulk = {k: [] for k in paths}
        get = {k: [] for k in paths}
        for r in range(ROUNDS):
            for name, (host, off) in paths.items():
                bulk[name].append(iperf_reverse(host, 5201 + off))
                get[name].append(redis_get(host, 6379 + off))
        med = statistics.median
        base_bulk = med(x[1] for x in bulk["direct"])
        base_get = med(x[1] for x in get["direct"])
        print(f"dsr vs nat vs proxy vs direct, {ROUNDS} interleaved rounds, medians "
              f"(iperf3 -R {SECONDS} s one stream; redis GET 100 KiB -c 10 n={REDIS_N})\n")
        print("| path | iperf3 -R Gbit/s | × direct | CPU s/GB | balancer CPU s/GB | redis GET 100 KiB /s | × direct | CPU s/GB | balancer CPU s/GB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in paths:
            g = med(x[0] for x in bulk[name])
            c = med(x[1] for x in bulk[name])
            rg = med(x[0] for x in get[name])
            rc = med(x[1] for x in get[name])
            print(f"| {name} | {g:.2f} | {g / med(x[0] for x in bulk['direct']):.2f} | {c:.2f} | "
                  f"{max(0.0, c - base_bulk):.2f} | {rg:.0f} | {rg / med(x[0] for x in get['direct']):.2f} | "
                  f"{rc:.2f} | {max(0.0, rc - base_get):.2f} |")
        print("\nspread (min–max):")
        for name in paths:
            print(f"  {name}: iperf3 -R {min(x[0] for x in bulk[name]):.2f}–{max(x[0] for x in bulk[name]):.2f} Gbit/s, "
                  f"GET {min(x[0] for x in get[name]):.0f}–{max(x[0] for x in get[name]):.0f}/s")
        stat = subprocess.run(["socat", "-", f"UNIX-CONNECT:{sock}"], input="show stat\n", capture_output=True,
                              text=True).stdout
        for line in stat.splitlines():
            if line.startswith("dsr") and ",s1," in line:
                cols = line.split(",")
                print(f"  {cols[0]}/s1 show stat: stot {cols[7]}, bin {cols[8]}, bout {cols[9]}")
    finally:
        procs.stop_all()
        teardown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
