#!/usr/bin/env python3
"""nat mode on this machine, in network namespaces built here (root only).

client ns ── veth ── balancer ns ── veth ── server ns (iperf3 -s)

iperf3 (one stream, SECONDS each, ROUNDS interleaved rounds, medians) from the client to:
  routing        the server's own address: plain forwarding through the balancer, no NAT
  nft-dnat       the service address, with a hand-written one-line nft DNAT rule (kernel NAT's limit)
  ballast-nat    the service address, Ballast nat mode (its table, maps and ct marks)
  ballast-nat-acl  the same with an allow list of 10,000 networks and a deny list of 1,000
  ballast-proxy  Ballast proxy mode on the balancer (splice relay)
Then, with Ballast nat mode: the time one server's state change takes to reach the kernel
(`set server … state drain` / `ready`, measured inside Ballast around the netlink batch), and
the time to program a whole table with a 65,537-slot Maglev map (balance: source).
Everything stops by PID and the namespaces are deleted at the end.
"""
import json
import os
import shutil
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BALLAST, Procs, ask, netns_add, netns_teardown, sh  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "5"))
P = f"nb{random.randint(100, 999)}"
NS = {k: f"{P}-{k}" for k in ("c", "b", "s")}
VIP = "10.78.1.100"
SERVER = "10.78.2.2"


def ns(n, *args, **kw):
    return sh("ip", "netns", "exec", NS[n], *args, **kw)


def topology():
    netns_add(NS.values())
    for (a, b, net) in (("c", "b", 1), ("s", "b", 2)):
        ia, ib = f"{P}{a}{net}", f"{P}{b}{net}"
        sh("ip", "link", "add", ia, "type", "veth", "peer", "name", ib)
        sh("ip", "link", "set", ia, "netns", NS[a])
        sh("ip", "link", "set", ib, "netns", NS[b])
        sh("ip", "-n", NS[a], "addr", "add", f"10.78.{net}.2/24", "dev", ia)
        sh("ip", "-n", NS[b], "addr", "add", f"10.78.{net}.1/24", "dev", ib)
        sh("ip", "-n", NS[a], "link", "set", ia, "up")
        sh("ip", "-n", NS[b], "link", "set", ib, "up")
        sh("ip", "-n", NS[a], "route", "add", "default", "via", f"10.78.{net}.1")
    sh("ip", "-n", NS["b"], "addr", "add", f"{VIP}/24", "dev", f"{P}b1")
    ns("b", "sysctl", "-qw", "net.ipv4.ip_forward=1")


def teardown():
    netns_teardown(NS.values())


def iperf(host, port):
    out = ns("c", "iperf3", "-c", host, "-p", str(port), "-t", str(SECONDS), "-J", check=False)
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(data["error"])
    return data["end"]["sum_received"]["bits_per_second"] / 1e9



def start_ballast(procs, tmp, name, yaml):
    path = os.path.join(tmp, name + ".yaml")
    with open(path, "w") as f:
        f.write(yaml)
    log = open(path + ".log", "w+")
    p = procs.start(["ip", "netns", "exec", NS["b"], BALLAST, "run", "-c", path], stderr=log)
    for _ in range(200):
        time.sleep(0.05)
        log.seek(0)
        text = log.read()
        if "started" in text:
            return p
        if p.poll() is not None:
            sys.exit(f"ballast did not start:\n{text}")
    sys.exit("ballast did not start")


def main():
    if os.geteuid() != 0:
        sys.exit("natbench needs root (it builds network namespaces)")
    tmp = tempfile.mkdtemp(prefix="ballast-natbench-")
    procs = Procs()
    topology()
    try:
        procs.start(["ip", "netns", "exec", NS["s"], "iperf3", "-s", "-p", "5201"])
        time.sleep(0.5)
        user = "  user: root\n"
        sock = os.path.join(tmp, "admin.sock")
        nat_yaml = f"""global:
  workers: 1
{user}  stats:
    sockets: [{{ path: {sock}, level: admin }}]
services:
  - name: bench
    mode: nat
    bind: "{VIP}:5201"
    servers:
      - {{ name: s1, address: "{SERVER}:5201" }}
      - {{ name: s2, address: "{SERVER}:5201", weight: 1 }}
  - name: proxied
    bind: "10.78.1.1:5202"
    servers:
      - {{ name: s1, address: "{SERVER}:5201" }}
"""
        # The same nat service behind an allow list of 10,000 networks (the client's last) and a
        # deny list of 1,000: the kernel's interval sets, consulted for a flow's first packet.
        rng = random.Random(7)
        nets = sorted({f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.0/24" for _ in range(11000)})
        allow = [n for n in nets if not n.startswith("10.")][:9999] + ["10.78.1.0/24"]
        allowed = set(allow)
        deny = [n for n in nets if n not in allowed][:1000]
        acl_yaml = nat_yaml.replace('    bind: "' + VIP + ':5201"\n', '    bind: "' + VIP + ':5201"\n    allow: [' + ", ".join(allow) + ']\n    deny: [' + ", ".join(deny) + ']\n', 1)
        results = {k: [] for k in ("routing", "nft-dnat", "ballast-nat", "ballast-nat-acl", "ballast-proxy")}
        for r in range(ROUNDS):
            print(f"round {r + 1}/{ROUNDS}", file=sys.stderr)
            results["routing"].append(iperf(SERVER, 5201))
            ns("b", "nft", f"add table ip hand ; add chain ip hand pre {{ type nat hook prerouting priority dstnat ; }} ; "
               f"add rule ip hand pre ip daddr {VIP} tcp dport 5201 dnat to {SERVER}:5201")
            results["nft-dnat"].append(iperf(VIP, 5201))
            ns("b", "nft", "delete table ip hand")
            b = start_ballast(procs, tmp, f"nat{r}", nat_yaml)
            results["ballast-nat"].append(iperf(VIP, 5201))
            results["ballast-proxy"].append(iperf("10.78.1.1", 5202))
            procs.stop(b)
            b = start_ballast(procs, tmp, f"acl{r}", acl_yaml)
            results["ballast-nat-acl"].append(iperf(VIP, 5201))
            procs.stop(b)
        # Reaction time: one server's state change, measured inside Ballast around the batch.
        b = start_ballast(procs, tmp, "react", nat_yaml)
        changes = []
        for i in range(20):
            state = "drain" if i % 2 == 0 else "ready"
            ask(sock, f"set server bench/s2 state {state}")
            time.sleep(0.05)
            m = re.search(r"last state change applied in (\d+) us", ask(sock, "show nft").decode())
            changes.append(int(m.group(1)))
        procs.stop(b)
        # A whole table with a 65,537-slot Maglev map.
        maglev_yaml = nat_yaml.replace("    mode: nat\n", "    mode: nat\n    balance: source\n")
        fulls = []
        for i in range(3):
            b = start_ballast(procs, tmp, f"maglev{i}", maglev_yaml)
            m = re.search(r"last full programming: (\d+) us", ask(sock, "show nft").decode())
            fulls.append(int(m.group(1)))
            # And one server's change on that table (only the changed slots move).
            ask(sock, "set server bench/s2 state drain")
            time.sleep(0.3)
            m2 = re.search(r"last state change applied in (\d+) us", ask(sock, "show nft").decode())
            fulls.append(-int(m2.group(1)))
            procs.stop(b)
        maglev_full = [x for x in fulls if x > 0]
        maglev_change = [-x for x in fulls if x < 0]
        # Reload with many services: one service's weight changes; only it is reprogrammed.
        many = 200
        many_yaml = nat_yaml.split("services:\n")[0] + "services:\n"
        for k in range(many):
            many_yaml += (f"  - name: svc{k}\n    mode: nat\n    bind: \"{VIP}:{6000 + k}\"\n    servers:\n"
                          f"      - {{ name: s1, address: \"{SERVER}:5201\" }}\n      - {{ name: s2, address: \"{SERVER}:5201\" }}\n")
        many_start, many_reload = [], []
        for i in range(3):
            b = start_ballast(procs, tmp, f"many{i}", many_yaml)
            many_start.append(int(re.search(r"last full programming: (\d+) us", ask(sock, "show nft").decode()).group(1)))
            with open(os.path.join(tmp, f"many{i}.yaml"), "w") as f:
                f.write(many_yaml.replace(f"svc{many // 2}\n", f"svc{many // 2}\n    balance: random\n", 1))
            log_path = os.path.join(tmp, f"many{i}.yaml.log")
            b.send_signal(1)
            for _ in range(100):
                time.sleep(0.05)
                with open(log_path) as f:
                    if "reloaded" in f.read():
                        break
            many_reload.append(int(re.search(r"last full programming: (\d+) us", ask(sock, "show nft").decode()).group(1)))
            procs.stop(b)
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"nat mode, iperf3 one stream through a balancer namespace ({ROUNDS} rounds × {SECONDS} s, medians, Gbit/s)")
        print()
        print("| path | Gbit/s | vs routing | vs nft-dnat | runs |")
        print("|---|---:|---:|---:|---|")
        for k in ("routing", "nft-dnat", "ballast-nat", "ballast-nat-acl", "ballast-proxy"):
            runs = ", ".join(f"{x:.2f}" for x in results[k])
            print(f"| {k} | {med[k]:.2f} | {med[k] / med['routing']:.2f}× | {med[k] / med['nft-dnat']:.2f}× | {runs} |")
        print()
        print("| kernel programming | median | max | target |")
        print("|---|---:|---:|---|")
        print(f"| one server's state change (roundrobin map and rule, 20 changes) | {statistics.median(changes) / 1000:.2f} ms | {max(changes) / 1000:.2f} ms | < 5 ms |")
        print(f"| one server's state change on a 65,537-slot Maglev map (changed slots only) | {statistics.median(maglev_change) / 1000:.1f} ms | {max(maglev_change) / 1000:.1f} ms | |")
        print(f"| whole table with a 65,537-slot Maglev map (start) | {statistics.median(maglev_full) / 1000:.0f} ms | {max(maglev_full) / 1000:.0f} ms | < 250 ms |")
        print(f"| whole table with {many} services (start) | {statistics.median(many_start) / 1000:.1f} ms | {max(many_start) / 1000:.1f} ms | |")
        print(f"| reload changing one of {many} services (the difference only) | {statistics.median(many_reload) / 1000:.2f} ms | {max(many_reload) / 1000:.2f} ms | |")
    finally:
        procs.stop_all()
        teardown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
