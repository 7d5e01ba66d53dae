#!/bin/sh
# keepalived notify script for a nat-mode Ballast pair (after conntrackd's primary-backup.sh).
# primary: put the flows received from the old primary into the kernel, then take over the
#          sync role; backup: ask the primary for a full resync; fault: nothing to commit.
CONNTRACKD="/usr/sbin/conntrackd -C ${CONNTRACKD_CONF:-/etc/conntrackd/conntrackd.conf}"
case "$1" in
primary)
    $CONNTRACKD -c      # commit the external cache (flows synced from the peer) into the kernel
    $CONNTRACKD -f      # flush the internal and external caches
    $CONNTRACKD -R      # resynchronise the internal cache with the kernel's table
    $CONNTRACKD -B      # send a bulk update to the backup
    ;;
backup)
    $CONNTRACKD -n      # request a resync from the primary
    ;;
fault)
    $CONNTRACKD -t      # shorten the kernel's timers for the flows this node no longer carries
    ;;
esac
exit 0
