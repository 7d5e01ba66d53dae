#!/usr/bin/env python3
"""Ballast beside HAProxy and beside a direct connection, in one run, interleaved.

Contenders (same thread count for each proxy):
  direct            the client talks to the server itself
  haproxy-splice    HAProxy 2.6 mode tcp, option splice-request + splice-response, tune.pipesize 1 MiB
  haproxy           HAProxy 2.6 mode tcp, no splice
  ballast-epoll     Ballast proxy mode (release build), epoll engine
  ballast-io_uring  the same with global.engine: io_uring
  ballast-io_uring_sqpoll  with global.engine: io_uring_sqpoll (only when ENGINES names it)

Workloads: iperf3 one and four streams (Gbit/s, proxy CPU s per GB); redis-benchmark -c 50 GET and
SET (requests/s, p50, p99, proxy CPU us per request); new connections per second and proxy CPU
per connection (loadgen connrate: connect, PING, +PONG, close; and wrk with `Connection: close`
against nginx, one request per connection); RSS with N idle proxied connections.

Each workload runs ROUNDS times; within a round the contenders run one after another, so a slow
moment of the machine hits everyone alike. The table shows medians; each ratio is the median of
the per-round ratios with their range (lowest–highest) in brackets.

Knobs: ROUNDS, SECONDS_PER_RUN, THREADS, ENGINES (epoll,io_uring), WORKLOADS (all, or a comma
list of iperf,redis,conn,wrk,idle), SYSCALLS=1 (counts system calls per request and per MB with
perf, one extra run per contender).

Everything listens on 127.0.0.1 only, every process is started here and stopped by PID.
"""
import json
import os
import shutil
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The static release binary (make release), as installed; BALLAST_BIN overrides.
BALLAST = os.environ.get("BALLAST_BIN", os.path.join(ROOT, ".build-static", "release", "ballast"))
LOADGEN = os.path.join(ROOT, "Benchmarks", ".build", "release", "loadgen")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "5"))
THREADS = int(os.environ.get("THREADS", "1"))
REDIS_REQUESTS = int(os.environ.get("REDIS_REQUESTS", "200000"))
ENGINES = os.environ.get("ENGINES", "epoll,io_uring").split(",")
WORKLOADS = os.environ.get("WORKLOADS", "iperf,redis,conn,wrk,idle").split(",")
BALLASTS = [f"ballast-{e}" for e in ENGINES]
CONTENDERS = ["direct", "haproxy-splice", "haproxy"] + BALLASTS
PROXIES = CONTENDERS[1:]
CLK = os.sysconf("SC_CLK_TCK")
# Ballast refuses to serve as root unless the config says so.
ROOT_USER = "  user: root\n" if os.geteuid() == 0 else ""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sh(*args, check=True):
    """Runs a command, returns its output (raises on failure unless check=False)."""
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def netns_add(names):
    """New network namespaces, each with its loopback up."""
    for n in names:
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")


def netns_teardown(names):
    """Ends every process in these network namespaces (by PID: only ours run there), then deletes them."""
    for n in names:
        for p in sh("ip", "netns", "pids", n, check=False).split():
            try:
                os.kill(int(p), 9)
            except OSError:
                pass
        sh("ip", "netns", "del", n, check=False)


def rss_mib(pid):
    return rss_kib(pid) / 1024


def ask(path, line, timeout=60):
    """One runtime API command on a Unix socket (Ballast's or HAProxy's): the whole reply."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(line.encode() + b"\n")
    out = bytearray()
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        out += d
    s.close()
    return bytes(out)


def pct(xs, q):
    """The q-quantile (0...1) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in reversed(self.procs):
            self.stop(p)


def haproxy_config(front, back, splice, maxconn):
    opts = "    option splice-request\n    option splice-response\n" if splice else ""
    return f"""global
    nbthread {THREADS}
    maxconn {maxconn}
    tune.pipesize 1048576
    maxpipes 512

defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
{opts}
frontend f
    bind 127.0.0.1:{front}
    default_backend b

backend b
    server s1 127.0.0.1:{back}
"""


def ballast_config(front, back, maxconn, engine):
    return f"""global:
  workers: {THREADS}
  engine: {engine}
  maxconn: {maxconn}
  pipe_size: 1m
  log: {{ level: warning }}
{ROOT_USER}services:
  - name: bench
    bind: ["127.0.0.1:{front}"]
    servers:
      - {{ name: s1, address: 127.0.0.1:{back} }}
"""


class Setup:
    """One backend port and, for each proxy, a front port relaying to it."""

    def __init__(self, procs, tmp, backend_port, maxconn=10000):
        self.ports = {"direct": backend_port}
        self.pids = {}
        self.start_rss = {}
        for name in PROXIES:
            front = free_port()
            self.ports[name] = front
            if name.startswith("ballast"):
                path = os.path.join(tmp, f"{name}-{backend_port}.yaml")
                with open(path, "w") as f:
                    f.write(ballast_config(front, backend_port, maxconn, name.split("-", 1)[1]))
                p = procs.start([BALLAST, "run", "-c", path], stderr=open(path + ".log", "w"))
            else:
                path = os.path.join(tmp, f"{name}-{backend_port}.cfg")
                with open(path, "w") as f:
                    f.write(haproxy_config(front, backend_port, name == "haproxy-splice", maxconn))
                p = procs.start(["haproxy", "-db", "-f", path], stderr=open(path + ".log", "w"))
            self.pids[name] = p.pid
        for name in PROXIES:
            try:
                wait_port(self.ports[name])
                self.start_rss[name] = rss_kib(self.pids[name]) / 1024
            except RuntimeError:
                logs = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".log") and str(backend_port) in f]
                sys.exit(f"{name} did not start:\n" + "\n".join(open(l).read() for l in logs))

    def cpu(self, name):
        return cpu_seconds(self.pids[name]) if name in self.pids else 0.0


def run_iperf(setup, name, streams):
    c0 = setup.cpu(name)
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(setup.ports[name]), "-t", str(SECONDS), "-P", str(streams), "-J"],
        capture_output=True, text=True, timeout=SECONDS + 30)
    cpu = setup.cpu(name) - c0
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 via {name}: {data['error']}")
    recv = data["end"]["sum_received"]
    gbit = recv["bits_per_second"] / 1e9
    gb = recv["bytes"] / 1e9
    return {"gbit": gbit, "cpu_per_gb": cpu / gb if name in setup.pids and gb > 0 else None}


def run_redis(setup, name, test):
    c0 = setup.cpu(name)
    out = subprocess.run(
        ["redis-benchmark", "-p", str(setup.ports[name]), "-c", "50", "-n", str(REDIS_REQUESTS), "-t", test, "--csv"],
        capture_output=True, text=True, timeout=300)
    cpu = setup.cpu(name) - c0
    rows = [l for l in out.stdout.splitlines() if l.startswith('"') and not l.startswith('"test"')]
    header = [h.strip('"') for h in out.stdout.splitlines()[0].split(",")]
    vals = [v.strip('"') for v in rows[0].split(",")]
    row = dict(zip(header, vals))
    return {
        "rps": float(row["rps"]), "p50": float(row["p50_latency_ms"]), "p99": float(row["p99_latency_ms"]),
        "cpu_us": cpu / REDIS_REQUESTS * 1e6 if name in setup.pids else None,
    }


def run_connrate(setup, name):
    c0 = setup.cpu(name)
    out = subprocess.run([LOADGEN, "connrate", str(setup.ports[name]), str(SECONDS), "2"],
                         capture_output=True, text=True, timeout=SECONDS + 30)
    cpu = setup.cpu(name) - c0
    parts = out.stdout.split()
    cps = int(parts[1])
    return {"cps": cps, "failed": int(parts[5]),
            "cpu_us": cpu / (cps * SECONDS) * 1e6 if name in setup.pids and cps else None}


def nginx_config(tmp, port):
    return (f"worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{ access_log off; server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"hello\\n\"; }} }} }}\n")


def run_wrk(setup, name):
    """New connections with HTTP: wrk, one thread, 10 connections, `Connection: close` (one request each)."""
    c0 = setup.cpu(name)
    out = subprocess.run(["wrk", "-t1", "-c10", f"-d{SECONDS}s", "-H", "Connection: close",
                          f"http://127.0.0.1:{setup.ports[name]}/"], capture_output=True, text=True,
                         timeout=SECONDS + 30).stdout
    cpu = setup.cpu(name) - c0
    rps = float(out.split("Requests/sec:")[1].split()[0])
    return {"cps": rps, "cpu_us": cpu / (rps * SECONDS) * 1e6 if name in setup.pids and rps else None}


def run_idle(setup, name, count):
    p = subprocess.Popen([LOADGEN, "hold", str(setup.ports[name]), str(count), "4"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    time.sleep(1.0)
    rss = rss_kib(setup.pids[name])
    p.wait(60)
    return {"rss_mib": rss / 1024, "base_mib": setup.start_rss[name], "held": int(line[1]) if len(line) > 1 else 0}


def perf_syscalls(pid, seconds_cmd):
    """Runs the command while perf counts the system calls `pid` enters; {name: count}."""
    out = os.path.join(tempfile.gettempdir(), f"perf-{pid}-{time.time_ns()}.txt")
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", "syscalls:sys_enter_*", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        units = seconds_cmd()
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_") and parts[0].isdigit():
                counts[parts[2][len("syscalls:sys_enter_"):]] = int(parts[0])
    os.unlink(out)
    return counts, units


def count_syscalls(iperf, redis, name):
    def gets():
        run_redis(redis, name, "get")
        return REDIS_REQUESTS

    def megabytes():
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(iperf.ports[name]), "-t", "3", "-J"],
                             capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)["end"]["sum_received"]["bytes"] / 1e6

    def top(counts, units, n=3):
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{k} {v / units:.2f}" for k, v in best if v)

    def connections():
        out = subprocess.run([LOADGEN, "connrate", str(redis.ports[name]), "3", "2"],
                             capture_output=True, text=True, timeout=60)
        return int(out.stdout.split()[1]) * 3

    g, ng = perf_syscalls(redis.pids[name], gets)
    b, nb = perf_syscalls(iperf.pids[name], megabytes)
    c, nc = perf_syscalls(redis.pids[name], connections)
    return {"per_get": sum(g.values()) / ng, "per_mb": sum(b.values()) / nb, "per_conn": sum(c.values()) / nc,
            "top_get": top(g, ng), "top_mb": top(b, nb), "top_conn": top(c, nc, 8)}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=2):
    if x is None:
        return "—"
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def main():
    for tool in ["iperf3", "haproxy", "redis-server", "redis-benchmark", "nginx", "wrk"]:
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"{tool} is missing: run bash scripts/deps.sh")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Each proxy needs two descriptors per idle connection, under the same hard limit for all;
    # HAProxy also reserves two per pipe (maxpipes 512) and refuses to start beyond the limit.
    idle_count = int(os.environ.get("IDLE_CONNECTIONS", min(10000, (hard - 1024 - 400) // 2)))
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="ballast-bench-")
    results = {}
    syscalls = {}
    try:
        iperf_port = free_port()
        procs.start(["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"])
        wait_port(iperf_port)
        redis_port = free_port()
        procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", tmp, "--maxclients", str(idle_count + 100)])
        wait_port(redis_port)
        iperf = Setup(procs, tmp, iperf_port, maxconn=1000)
        nginx_port = free_port()
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write(nginx_config(tmp, nginx_port))
        procs.start(["nginx", "-c", os.path.join(tmp, "nginx.conf"), "-p", tmp])
        wait_port(nginx_port)
        web = Setup(procs, tmp, nginx_port, maxconn=4000)
        # HAProxy refuses to start when 2 x maxconn (+ a few) exceeds the descriptor limit.
        redis = Setup(procs, tmp, redis_port, maxconn=min(idle_count + 100, (hard - 1024 - 100) // 2))

        def record(key, name, value):
            results.setdefault(key, {}).setdefault(name, []).append(value)

        for r in range(ROUNDS):
            print(f"round {r + 1}/{ROUNDS}", file=sys.stderr)
            if "iperf" in WORKLOADS:
                for name in CONTENDERS:
                    record("iperf1", name, run_iperf(iperf, name, 1))
                for name in CONTENDERS:
                    record("iperf4", name, run_iperf(iperf, name, 4))
            if "redis" in WORKLOADS:
                for name in CONTENDERS:
                    record("get", name, run_redis(redis, name, "get"))
                    record("set", name, run_redis(redis, name, "set"))
            if "conn" in WORKLOADS:
                for name in CONTENDERS:
                    record("conn", name, run_connrate(redis, name))
            if "wrk" in WORKLOADS:
                for name in CONTENDERS:
                    record("wrk", name, run_wrk(web, name))
        if os.environ.get("SYSCALLS") == "1":
            for name in PROXIES:
                syscalls[name] = count_syscalls(iperf, redis, name)
        # Last: closing thousands of idle connections leaves as many TIME_WAIT sockets, which
        # slow every later connect (the new-connection rows of the next round, direct included).
        if "idle" in WORKLOADS:
            for r in range(ROUNDS):
                for name in PROXIES:
                    record("idle", name, run_idle(redis, name, idle_count))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    def m(key, name, field):
        if name not in results[key]:
            return None
        return median([v[field] for v in results[key][name]])

    print(f"Ballast benchmark, {time.strftime('%Y-%m-%d')} — {os.cpu_count()} cores, "
          f"{subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}, "
          f"{THREADS} proxy thread(s), medians of {ROUNDS} interleaved rounds, {SECONDS}s per run\n")
    heads = ["direct", "HAProxy splice forced", "HAProxy no splice"] + [f"Ballast {e}" for e in ENGINES]
    ratio_heads = [f"{e} ÷ HAProxy {h}" for e in ENGINES for h in ("splice", "no splice")]
    print("| | " + " | ".join(heads + ratio_heads) + " |")
    print("|---|" + "---:|" * (len(heads) + len(ratio_heads)))

    def ratio(key, field, b, h):
        """Median of the per-round ratios b/h, with their range."""
        rs = [x[field] / y[field] for x, y in zip(results[key].get(b, []), results[key].get(h, []))
              if x[field] is not None and y[field]]
        if not rs:
            return "—"
        if len(rs) == 1:
            return f"{rs[0]:.2f}×"
        return f"{statistics.median(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})"

    def row(label, key, field, digits=2):
        if key not in results:
            return
        vals = [m(key, n, field) for n in CONTENDERS]
        ratios = [ratio(key, field, b, h) for b in BALLASTS for h in ("haproxy-splice", "haproxy")]
        print(f"| {label} | " + " | ".join(fmt(v, digits) for v in vals) + " | " + " | ".join(ratios) + " |")

    row("iperf3 1 stream, Gbit/s", "iperf1", "gbit")
    row("iperf3 1 stream, proxy CPU s per GB", "iperf1", "cpu_per_gb", 3)
    row("iperf3 4 streams, Gbit/s", "iperf4", "gbit")
    row("iperf3 4 streams, proxy CPU s per GB", "iperf4", "cpu_per_gb", 3)
    row("redis GET -c 50, requests/s", "get", "rps")
    row("redis GET p50, ms", "get", "p50", 3)
    row("redis GET p99, ms", "get", "p99", 3)
    row("redis SET -c 50, requests/s", "set", "rps")
    row("redis SET p99, ms", "set", "p99", 3)
    row("proxy CPU µs per redis GET", "get", "cpu_us", 1)
    row("proxy CPU µs per redis SET", "set", "cpu_us", 1)
    row("new connections/s (connect, PING, close)", "conn", "cps")
    row("proxy CPU µs per connection (PING/close)", "conn", "cpu_us", 1)
    row("new connections/s (HTTP, Connection: close, wrk)", "wrk", "cps")
    row("proxy CPU µs per connection (HTTP close)", "wrk", "cpu_us", 1)
    row(f"RSS MiB with {idle_count:,} idle proxied connections", "idle", "rss_mib", 1)
    row("RSS MiB right after start", "idle", "base_mib", 1)
    if "conn" in results:
        failed = {n: sum(v["failed"] for v in results["conn"][n]) for n in CONTENDERS}
        print(f"\nconnrate failures per contender: {failed}")
    if "idle" in results:
        held = {n: min(v["held"] for v in results["idle"][n]) for n in PROXIES}
        print(f"idle connections actually held: {held}")
    if syscalls:
        print("\nSystem calls made by the proxy (perf stat -e 'syscalls:sys_enter_*', one run each)\n")
        print("| | " + " | ".join(syscalls) + " |")
        print("|---|" + "---:|" * len(syscalls))
        for label, field in [("per redis GET (-c 50)", "per_get"), ("per MB (iperf3, 1 stream)", "per_mb"),
                             ("per new connection (PING/close)", "per_conn")]:
            print(f"| {label} | " + " | ".join(f"{syscalls[n][field]:.2f}" for n in syscalls) + " |")
        for label, field in [("most frequent, per GET", "top_get"), ("most frequent, per MB", "top_mb"),
                             ("most frequent, per connection", "top_conn")]:
            print(f"| {label} | " + " | ".join(syscalls[n][field] for n in syscalls) + " |")


if __name__ == "__main__":
    main()
