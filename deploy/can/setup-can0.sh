#!/bin/sh
# Configures a SocketCAN interface for the BMS / inverter bus and brings it up. Needs root
# (CAP_NET_ADMIN). Safe to run again: the bit rate can only be set while the link is down.
#   setup-can0.sh [INTERFACE [BITRATE]]     defaults: can0 500000 (Pylontech-style inverter CAN)
# restart-ms 100: after bus-off the controller rejoins the bus by itself 100 ms later instead of
# staying silent until someone runs `ip link set can0 down/up`.
set -eu

iface="${1:-can0}"
bitrate="${2:-500000}"

if ! ip link show "$iface" >/dev/null 2>&1; then
    echo "setup-can0: no network interface '$iface' (adapter plugged in? driver loaded?)" >&2
    exit 1
fi
ip link set "$iface" down
ip link set "$iface" type can bitrate "$bitrate" restart-ms 100
ip link set "$iface" up
echo "setup-can0: $iface up at $bitrate bit/s"
