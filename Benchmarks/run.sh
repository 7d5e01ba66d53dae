#!/usr/bin/env bash
# One command: Ballast beside HAProxy (splice forced and without splice) and beside a direct
# connection, interleaved, on this machine; health-check costs; show stat with 1,000 servers; a runtime API flood; access lists;
# nat mode in network namespaces (root). Prints a markdown table (also saved under
# Benchmarks/results/). Knobs: ROUNDS (3), SECONDS_PER_RUN (5), THREADS (1), IDLE_CONNECTIONS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build -c release --product ballast
(cd Benchmarks && swift build -c release --product loadgen && swift build -c release --product schedbench)
mkdir -p Benchmarks/results
out="Benchmarks/results/$(date +%Y%m%d-%H%M%S).md"
{
    python3 Benchmarks/bench.py
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
