#!/bin/bash
# Configures a CAN interface for the BMS / inverter bus and brings it up (or down). Needs root
# (CAP_NET_ADMIN) unless --dry-run. Safe to run again: the bit rate is only set while the link is down.
#
#   setup-can.sh [OPTIONS] [INTERFACE]              INTERFACE defaults to can0
#
#   --kind native|slcan    native (default): a kernel SocketCAN driver, e.g. an MCP2515 HAT on SPI
#                          (mcp251x) or a candleLight/CANable USB adapter (gs_usb). slcan: a
#                          serial-line adapter (LAWICEL/slcan firmware) run through slcand.
#   --bitrate BPS          default 500000 (Pylontech-style inverter CAN). slcan knows 10k, 20k, 50k,
#                          100k, 125k, 250k, 500k, 800k and 1M only (slcand -s0 .. -s8).
#   --restart-ms MS        default 100: after bus-off the controller rejoins the bus by itself this
#                          long after, instead of staying silent until someone runs ip link down/up.
#                          0 turns it off. Native only (slcan adapters recover in their firmware).
#   --txqueuelen N         default 32: frames the kernel queues for sending. Enough for a full frame
#                          set or two (a burst is about 10 frames), short enough that when nobody
#                          acknowledges (inverter off, cable out) sending fails (ENOBUFS) within
#                          seconds instead of queueing minutes of stale limits to send later.
#   --serial-device PATH   slcan: the adapter's tty, preferably /dev/serial/by-id/... (required)
#   --down                 take the interface down (slcan: and end its slcand)
#   --dry-run              print the commands instead of running them (no root, nothing changed)
#
# The same settings may come from the environment, for systemd's EnvironmentFile (options win):
#   CAN_KIND, CAN_BITRATE, CAN_RESTART_MS, CAN_TXQUEUELEN, CAN_SERIAL_DEVICE
# See deploy/README.md, section 5.
set -euo pipefail

prog="setup-can"
kind="${CAN_KIND:-native}"
bitrate="${CAN_BITRATE:-500000}"
restart_ms="${CAN_RESTART_MS:-100}"
txqueuelen="${CAN_TXQUEUELEN:-32}"
serial_device="${CAN_SERIAL_DEVICE:-}"
iface="can0"
action="up"
dry_run=0
# How long slcand may take to create the interface.
SLCAN_APPEAR_TIMEOUT_S=5

usage() {  # the comment block at the top of this file
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {  # message, exit status (2: usage, 1: the system refused)
    echo "$prog: $1" >&2
    exit "${2:-1}"
}

need_value() {  # option, remaining argument count
    [ "$2" -ge 2 ] || die "$1 needs a value (see --help)" 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --kind) need_value "$1" $#; kind="$2"; shift 2 ;;
        --bitrate) need_value "$1" $#; bitrate="$2"; shift 2 ;;
        --restart-ms) need_value "$1" $#; restart_ms="$2"; shift 2 ;;
        --txqueuelen) need_value "$1" $#; txqueuelen="$2"; shift 2 ;;
        --serial-device) need_value "$1" $#; serial_device="$2"; shift 2 ;;
        --down) action="down"; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" 2 ;;
        *) break ;;
    esac
done
if [ $# -gt 1 ]; then
    die "one interface at a time (got: $*)" 2
fi
if [ $# -eq 1 ]; then
    iface="$1"
fi

is_number() {
    case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac
}

# An interface name: at most 15 characters (IFNAMSIZ), nothing a shell or ip would read otherwise.
if ! [[ "$iface" =~ ^[A-Za-z0-9_.-]{1,15}$ ]]; then
    die "'$iface' is not an interface name (1-15 letters, digits, '_', '.', '-')" 2
fi
case "$kind" in
    native|slcan) ;;
    *) die "--kind must be native or slcan (got '$kind')" 2 ;;
esac
if ! is_number "$bitrate" || [ "$bitrate" -lt 1 ] || [ "$bitrate" -gt 1000000 ]; then
    die "--bitrate must be a number of bit/s up to 1000000 (got '$bitrate')" 2
fi
if ! is_number "$restart_ms"; then
    die "--restart-ms must be a number of milliseconds (got '$restart_ms')" 2
fi
if ! is_number "$txqueuelen" || [ "$txqueuelen" -lt 1 ]; then
    die "--txqueuelen must be a number of frames, at least 1 (got '$txqueuelen')" 2
fi

# slcand's speed codes (can-utils slcand -s): the adapter firmware knows these rates only.
slcan_speed_code() {
    case "$1" in
        10000) echo 0 ;; 20000) echo 1 ;; 50000) echo 2 ;; 100000) echo 3 ;; 125000) echo 4 ;;
        250000) echo 5 ;; 500000) echo 6 ;; 800000) echo 7 ;; 1000000) echo 8 ;;
        *) return 1 ;;
    esac
}

if [ "$kind" = "slcan" ] && [ "$action" = "up" ]; then
    if ! speed_code="$(slcan_speed_code "$bitrate")"; then
        die "slcan adapters take 10000, 20000, 50000, 100000, 125000, 250000, 500000, 800000 or 1000000 bit/s (got $bitrate)" 2
    fi
    if [ -z "$serial_device" ]; then
        die "--kind slcan needs --serial-device PATH (or CAN_SERIAL_DEVICE), e.g. /dev/serial/by-id/usb-...-if00" 2
    fi
fi

run() {  # a command, printed instead of run with --dry-run
    if [ "$dry_run" -eq 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

require_root() {
    if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        die "configuring $iface needs root (or try --dry-run)"
    fi
}

interface_exists() {
    ip link show "$1" >/dev/null 2>&1
}

up_native() {
    if [ "$dry_run" -eq 0 ] && ! interface_exists "$iface"; then
        die "no network interface '$iface' (adapter plugged in? driver loaded? 'ip -br link' lists them; for an MCP2515 HAT see dmesg | grep mcp251x)"
    fi
    run ip link set "$iface" down
    if [ "$restart_ms" -gt 0 ]; then
        if ! run ip link set "$iface" type can bitrate "$bitrate" restart-ms "$restart_ms"; then
            # Some USB adapters' drivers leave bus-off recovery to their firmware and refuse restart-ms.
            echo "$prog: $iface refuses restart-ms; setting the bit rate alone (its firmware recovers from bus-off)" >&2
            run ip link set "$iface" type can bitrate "$bitrate"
        fi
    else
        run ip link set "$iface" type can bitrate "$bitrate"
    fi
    run ip link set "$iface" txqueuelen "$txqueuelen"
    run ip link set "$iface" up
    echo "$prog: $iface up at $bitrate bit/s, restart-ms $restart_ms, txqueuelen $txqueuelen"
}

up_slcan() {
    if [ "$dry_run" -eq 0 ]; then
        [ -e "$serial_device" ] || die "serial device $serial_device does not exist (ls -l /dev/serial/by-id/)"
        command -v slcand >/dev/null || die "slcand not found: apt-get install can-utils"
    fi
    if [ "$dry_run" -eq 1 ] || ! interface_exists "$iface"; then
        # -o open the channel, -c close it when slcand ends, -f read the status flags (clears the
        # adapter's error state), -s the bit rate code. slcand daemonizes and creates the interface.
        run slcand -o -c -f -s"$speed_code" "$serial_device" "$iface"
    fi
    if [ "$dry_run" -eq 0 ]; then
        waited=0
        until interface_exists "$iface"; do
            [ "$waited" -lt $((SLCAN_APPEAR_TIMEOUT_S * 10)) ] || die "slcand did not create $iface within ${SLCAN_APPEAR_TIMEOUT_S} s"
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    run ip link set "$iface" txqueuelen "$txqueuelen"
    run ip link set "$iface" up
    echo "$prog: $iface up through slcand on $serial_device at $bitrate bit/s (-s$speed_code), txqueuelen $txqueuelen"
}

down() {
    if [ "$dry_run" -eq 1 ] || interface_exists "$iface"; then
        run ip link set "$iface" down
    fi
    if [ "$kind" = "slcan" ]; then
        # The slcand serving this interface only (its command line ends with the interface name).
        if [ "$dry_run" -eq 1 ]; then
            echo "+ pkill -TERM -f '^slcand .* $iface\$'"
        else
            pkill -TERM -f "^slcand .* $iface\$" || true
        fi
    fi
    echo "$prog: $iface down"
}

require_root
if [ "$action" = "down" ]; then
    down
elif [ "$kind" = "slcan" ]; then
    up_slcan
else
    up_native
fi
