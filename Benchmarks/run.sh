#!/usr/bin/env bash
# One command: Ballast beside HAProxy (splice forced and without splice) and beside a direct
# connection, interleaved, on this machine; health-check costs; show stat with 1,000 servers; a runtime API flood; access lists;
# nat mode in network namespaces (root). Prints a markdown table (also saved under
# Benchmarks/results/). The proxy comparison runs once per thread count of THREAD_SWEEP ("1 2":
# one and two proxy threads each, so the two-core trade-off shows), each with both of Ballast's
# engines (ENGINES, "epoll,io_uring") and system-call counts (perf, as root), RUNS times (3: every
# service and proxy started afresh each time), then each ratio's median and range over the runs.
# Knobs: RUNS (3), ROUNDS (1 per run), SECONDS_PER_RUN (5), THREAD_SWEEP, ENGINES, IDLE_CONNECTIONS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The binary users install (make release: static Swift runtime), so RSS and start-up are theirs.
swift build -c release --static-swift-stdlib --scratch-path .build-static --product ballast
(cd Benchmarks && swift build -c release --product loadgen && swift build -c release --product schedbench)
mkdir -p Benchmarks/results
out="Benchmarks/results/$(date +%Y%m%d-%H%M%S).md"
{
    syscalls=0
    if [ "$(id -u)" -eq 0 ] && command -v perf >/dev/null 2>&1; then syscalls=1; fi
    runs=${RUNS:-3}
    for t in ${THREAD_SWEEP:-1 2}; do
        files=()
        for r in $(seq 1 "$runs"); do
            f="$out.threads$t.run$r"
            # System calls are counted in the first run only.
            THREADS=$t ROUNDS=${ROUNDS:-1} SYSCALLS=$([ "$r" -eq 1 ] && echo $syscalls || echo 0) \
                python3 Benchmarks/bench.py | tee "$f"
            files+=("$f")
            echo
        done
        if [ "$runs" -gt 1 ]; then python3 Benchmarks/runs.py "${files[@]}"; echo; fi
    done
    echo; echo "Scheduler micro benchmarks"; echo
    Benchmarks/.build/release/schedbench
    echo
    python3 Benchmarks/health.py
    echo
    python3 Benchmarks/statlat.py
    echo
    python3 Benchmarks/apiflood.py
    echo
    python3 Benchmarks/aclbench.py
    echo
    python3 Benchmarks/replication.py
    echo
    bash Benchmarks/ha.sh
    if [ "$(id -u)" -eq 0 ]; then
        echo
        python3 Benchmarks/natbench.py
        echo
        python3 Benchmarks/dsrbench.py
    else
        echo; echo "(nat and dsr mode benchmarks skipped: they need root to build network namespaces)"
    fi
} | tee "$out"
echo "saved to $out" >&2
