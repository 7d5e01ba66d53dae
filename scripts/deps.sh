#!/usr/bin/env bash
# Installs the Debian packages Ballast's build, tests, demo and benchmarks use.
set -euo pipefail
pkgs=(redis-server redis-tools mariadb-server mariadb-client haproxy iperf3 libnftnl-dev libmnl-dev pkg-config util-linux procps socat curl nftables conntrack iproute2)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian packages start their own redis-server and haproxy; the tests start their own instead.
for svc in redis-server haproxy mariadb; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        ${SUDO:-} systemctl stop "$svc" || true
    fi
done
# The metrics tests parse /metrics with the Prometheus project's own text-format parser.
if ! python3 -c "import prometheus_client" >/dev/null 2>&1; then
    python3 -m pip install -q prometheus_client >/dev/null 2>&1 || pip3 install -q prometheus_client
fi
