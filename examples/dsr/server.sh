#!/bin/sh
# On each server: accept packets for the service addresses without answering ARP for them
# (the balancer does), and announce a MAC address change so the balancer follows at once.
set -e
ip addr add 192.0.2.100/32 dev lo
ip -6 addr add 2001:db8::100/128 dev lo
sysctl -qw net.ipv4.conf.all.arp_ignore=1
sysctl -qw net.ipv4.conf.all.arp_announce=2
sysctl -qw net.ipv4.conf.all.arp_notify=1
# The service itself listens on the same port as the balancer's bind (80): DSR cannot translate ports.
