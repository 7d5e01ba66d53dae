#!/usr/bin/env bash
# Installs the Debian packages Ballast's build, tests, demo and benchmarks use.
set -euo pipefail
pkgs=(redis-server redis-tools redis-sentinel mariadb-server mariadb-client haproxy iperf3 nginx-light wrk sysbench
    keepalived conntrackd libnftnl-dev libmnl-dev liburing-dev linux-perf pkg-config util-linux procps socat curl nftables conntrack iproute2)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # Installing a daemon's package must not start its system service: the tests start their
    # own. A policy-rc.d that refuses every start, only while installing and only if none exists.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        trap '$SUDO rm -f "$policy"' EXIT
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    if [ -n "$policy" ]; then $SUDO rm -f "$policy"; trap - EXIT; fi
fi
# The Debian packages start their own redis-server and haproxy; the tests start their own instead.
for svc in redis-server redis-sentinel haproxy mariadb nginx keepalived conntrackd; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        ${SUDO:-} systemctl stop "$svc" || true
    fi
done
# The metrics tests parse /metrics with the Prometheus project's own text-format parser.
if ! python3 -c "import prometheus_client" >/dev/null 2>&1; then
    python3 -m pip install -q prometheus_client >/dev/null 2>&1 || pip3 install -q prometheus_client
fi
