#!/bin/sh
# On the balancer: the service addresses live here (clients find them by ARP/NDP on eth1).
# The IPv6 one is deprecated at once so that it is never the source of the balancer's own
# packets (health checks), which the servers, holding it too, would answer to themselves.
set -e
DEV=${DEV:-eth1}
ip addr add 192.0.2.100/32 dev "$DEV"
ip -6 addr add 2001:db8::100/128 dev "$DEV" preferred_lft 0
