#!/usr/bin/env bash
# The balancer pair's failover gaps (keepalived in network namespaces, root only): the proxy-mode
# pair test run at keepalived's default advert_int (1 s) and at 0.1 s; each prints the time from
# kill -9 and from link loss to new connections working again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "(pair failover benchmark skipped: it needs root to build network namespaces)"; exit 0; }
swift build --build-tests >/dev/null
for advert in 1 0.1; do
    BALLAST_HA_ADVERT=$advert swift test --skip-build --filter killAndLinkDownWithPreempt 2>&1 | grep "keepalived proxy" || true
done
