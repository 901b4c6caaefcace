#!/usr/bin/env bash
# Rolling upgrade of the bmslink services on this gateway, without a gap in what the inverter is told.
#
#   deploy/upgrade.sh (--tarball FILE | --git REF) [--dry-run] [--controller NAME]... [--agent NAME]...
#                     [--peer HOST:PORT]... [--allow-gap] [--prefix DIR] [--etc DIR] [--timeout SECONDS]
#
# In order, stopping at the first step that fails (nothing after it is touched):
#   1. read the role of every controller from its metrics endpoint ([metrics] in its config);
#   2. install the new code into PREFIX (the release tarball, or REF from the checkout's git remote)
#      and its virtualenv; print the new version;
#   3. check every instance's configuration with the new code (--check-config);
#   4. install the unit files, systemctl daemon-reload;
#   5. restart each controller that is not the active one (standbys first), and wait until it is back
#      as a healthy standby (role standby, broker and CAN links up);
#   6. handover: stop the active controller, so that a standby takes over (its clean stop sends the
#      "releasing" heartbeat; docs/failover.md), wait until a standby reports role active, start the
#      old active again and wait until it is back as a healthy standby;
#   7. restart the agents one at a time (controllers first: a newer agent's telemetry may carry what
#      an older controller refuses; shared/models.py, SCHEMA_MINOR).
#
# Controllers on other gateways: run this script on each gateway, the standbys' gateways first. Name
# a standby on another gateway with --peer HOST:PORT (its metrics endpoint, reachable from here) so
# that step 6 can see it take over. A lone controller (no standby anywhere) cannot hand over: the
# script refuses unless --allow-gap, and then restarts it (the inverter hears nothing meanwhile and
# falls back to its own battery-silence behaviour).
#
# --dry-run prints every step and the commands it would run, and runs nothing but the reads of step 1.
# Exit status: 0 done, 1 a step failed (the message says which and what was left as it was), 2 usage
# or configuration error. Needs root (systemctl, /opt, the credentials under /run/credentials).
set -euo pipefail

PREFIX=/opt/bmslink
ETC=/etc/bmslink
TIMEOUT_S=120
DRY_RUN=0
ALLOW_GAP=0
TARBALL=""
GIT_REF=""
CONTROLLERS=()
AGENTS=()
PEERS=()

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    echo "See the comments at the top of $0 and deploy/README.md, section 8."
}

fail_usage() {
    echo "upgrade.sh: $*" >&2
    usage >&2
    exit 2
}

need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || fail_usage "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tarball) need_value "$@"; TARBALL=$2; shift 2 ;;
        --git) need_value "$@"; GIT_REF=$2; shift 2 ;;
        --controller) need_value "$@"; CONTROLLERS+=("$2"); shift 2 ;;
        --agent) need_value "$@"; AGENTS+=("$2"); shift 2 ;;
        --peer) need_value "$@"; PEERS+=("$2"); shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --etc) need_value "$@"; ETC=$2; shift 2 ;;
        --timeout) need_value "$@"; TIMEOUT_S=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --allow-gap) ALLOW_GAP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail_usage "unknown argument: $1" ;;
    esac
done

if [[ -n "$TARBALL" && -n "$GIT_REF" ]] || [[ -z "$TARBALL" && -z "$GIT_REF" ]]; then
    fail_usage "give the new code: --tarball FILE or --git REF (one of them)"
fi
[[ "$TIMEOUT_S" =~ ^[0-9]+$ && "$TIMEOUT_S" -gt 0 ]] || fail_usage "--timeout takes whole seconds above 0"
if [[ -n "$TARBALL" && ! -f "$TARBALL" ]]; then
    echo "upgrade.sh: $TARBALL: no such file" >&2
    exit 2
fi
for peer in "${PEERS[@]}"; do
    [[ "$peer" =~ ^[^:]+:[0-9]+$ ]] || fail_usage "--peer takes HOST:PORT (got $peer)"
done

PY="$PREFIX/.venv/bin/python"
BMSLINK="$PREFIX/.venv/bin/bmslink"
[[ -x "$PY" ]] || { echo "upgrade.sh: $PY not found: is bmslink installed in $PREFIX (deploy/README.md, section 1)?" >&2; exit 2; }

# With no instance named, the ones systemd knows on this gateway.
discover() {
    systemctl list-units --all --plain --no-legend --type=service "bmslink-$1@*" 2>/dev/null \
        | awk '{print $1}' | sed -e "s/^bmslink-$1@//" -e 's/\.service$//'
}
if [[ ${#CONTROLLERS[@]} -eq 0 && ${#AGENTS[@]} -eq 0 ]]; then
    mapfile -t CONTROLLERS < <(discover controller)
    mapfile -t AGENTS < <(discover agent)
fi
[[ ${#CONTROLLERS[@]} -gt 0 || ${#AGENTS[@]} -gt 0 ]] \
    || fail_usage "no bmslink instance on this gateway: name them with --controller / --agent"

step() { echo; echo "==> $*"; }
run() {
    echo "+ $*"
    if [[ $DRY_RUN -eq 0 ]]; then
        "$@"
    fi
}
abort() {
    echo "upgrade.sh: $*" >&2
    exit 1
}

# "yes|no HOST PORT" of a controller's [metrics] (its defaults where the file is silent).
metrics_of() {
    "$PY" - "$1" <<'PYEOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    metrics = tomllib.load(f).get("metrics", {})
print("yes" if metrics.get("enabled") else "no", metrics.get("host", "127.0.0.1"), metrics.get("port", 9109))
PYEOF
}

# "ROLE MQTT CAN" of the controller whose metrics endpoint is HOST:PORT ("unreachable - -" if none).
role_at() {
    "$PY" - "$1" <<'PYEOF'
import sys
import urllib.request

try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=3) as response:
        text = response.read().decode()
except OSError:
    print("unreachable - -")
    raise SystemExit(0)
role, links = "unknown", {}
for line in text.splitlines():
    name, _, value = line.rpartition(" ")
    if name.startswith("bmslink_controller_role{") and float(value) == 1.0:
        role = name.split('role="')[1].split('"')[0]
    elif name.startswith("bmslink_controller_link_up{"):
        links[name.split('link="')[1].split('"')[0]] = "up" if float(value) == 1.0 else "down"
print(role, links.get("mqtt", "down"), links.get("can", "down"))
PYEOF
}

declare -A ENDPOINT
for name in "${CONTROLLERS[@]}"; do
    config="$ETC/controller-$name.toml"
    [[ -f "$config" ]] || { echo "upgrade.sh: $config: no such file (controller $name)" >&2; exit 2; }
    read -r enabled host port < <(metrics_of "$config")
    if [[ "$enabled" != yes ]]; then
        echo "upgrade.sh: $config: [metrics] is not enabled; the upgrade reads the controller's role there" >&2
        exit 2
    fi
    ENDPOINT[$name]="$host:$port"
done
for name in "${AGENTS[@]}"; do
    [[ -f "$ETC/agent-$name.toml" ]] || { echo "upgrade.sh: $ETC/agent-$name.toml: no such file (agent $name)" >&2; exit 2; }
done

healthy_standby() {  # HOST:PORT
    read -r role mqtt can < <(role_at "$1")
    [[ "$role" == standby && "$mqtt" == up && "$can" == up ]]
}

wait_for() {  # DESCRIPTION COMMAND...
    local what=$1
    shift
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "  (would wait up to ${TIMEOUT_S} s until $what)"
        return 0
    fi
    local deadline=$((SECONDS + TIMEOUT_S))
    until "$@"; do
        if [[ $SECONDS -ge $deadline ]]; then
            return 1
        fi
        sleep 1
    done
    echo "  $what"
}

any_active() {  # HOST:PORT...
    local endpoint
    for endpoint in "$@"; do
        read -r role _ _ < <(role_at "$endpoint")
        [[ "$role" == active ]] && return 0
    done
    return 1
}

# -- 1. roles ---------------------------------------------------------------------------------------------
step "1. roles"
ACTIVE=()
OTHERS=()
for name in "${CONTROLLERS[@]}"; do
    read -r role mqtt can < <(role_at "${ENDPOINT[$name]}")
    echo "  controller $name (${ENDPOINT[$name]}): $role, broker $mqtt, CAN $can"
    if [[ "$role" == active ]]; then ACTIVE+=("$name"); else OTHERS+=("$name"); fi
done
PEER_STANDBYS=()
for peer in "${PEERS[@]}"; do
    read -r role mqtt can < <(role_at "$peer")
    echo "  peer $peer: $role, broker $mqtt, CAN $can"
    if [[ "$role" == active ]]; then
        abort "peer $peer is the active controller: upgrade its gateway last (run this script there after this one)"
    fi
    [[ "$role" == standby ]] && PEER_STANDBYS+=("$peer")
done
if [[ ${#ACTIVE[@]} -gt 0 && ${#OTHERS[@]} -eq 0 && ${#PEER_STANDBYS[@]} -eq 0 ]]; then
    if [[ $ALLOW_GAP -eq 0 ]]; then
        abort "controller ${ACTIVE[*]} is active and no standby is known (here or --peer): restarting it leaves" \
              "the inverter without limits until it is back. Give --allow-gap to accept that gap."
    fi
    echo "  warning: no standby: the inverter hears nothing while ${ACTIVE[*]} restarts (--allow-gap)"
fi

# -- 2. new code ------------------------------------------------------------------------------------------
step "2. install the new code into $PREFIX"
if [[ -n "$TARBALL" ]]; then
    STAGING=$(mktemp -d)
    trap 'rm -rf "$STAGING"' EXIT
    run tar -xzf "$TARBALL" -C "$STAGING"
    if [[ $DRY_RUN -eq 0 ]]; then
        TOP=$(find "$STAGING" -mindepth 1 -maxdepth 1 -type d)
        [[ $(echo "$TOP" | wc -l) -eq 1 && -f "$TOP/pyproject.toml" ]] \
            || abort "$TARBALL: expected one top directory with pyproject.toml in it (git archive --prefix=bmslink/)"
    else
        TOP="$STAGING/bmslink"
    fi
    run cp -a "$TOP/." "$PREFIX/"
else
    run git -C "$PREFIX" fetch --tags origin
    run git -C "$PREFIX" checkout --detach "$GIT_REF"
fi
run "$PREFIX/.venv/bin/pip" install --quiet "$PREFIX"
run "$BMSLINK" --version

# -- 3. configurations ------------------------------------------------------------------------------------
step "3. check every configuration with the new code"
for name in "${CONTROLLERS[@]}"; do
    run "$BMSLINK" controller --check-config --config "$ETC/controller-$name.toml" \
        || abort "controller $name: its configuration does not pass the new code; nothing was restarted"
done
for name in "${AGENTS[@]}"; do
    run "$BMSLINK" agent --check-config --config "$ETC/agent-$name.toml" \
        || abort "agent $name: its configuration does not pass the new code; nothing was restarted"
done

# -- 4. units ---------------------------------------------------------------------------------------------
step "4. unit files"
run cp "$PREFIX/deploy/systemd/bmslink-agent@.service" "$PREFIX/deploy/systemd/bmslink-controller@.service" \
    /etc/systemd/system/
run systemctl daemon-reload

# -- 5. standbys ------------------------------------------------------------------------------------------
step "5. controllers that are not active, one at a time"
for name in "${OTHERS[@]}"; do
    run systemctl restart "bmslink-controller@$name"
    wait_for "controller $name is back as a healthy standby" healthy_standby "${ENDPOINT[$name]}" \
        || abort "controller $name did not come back as a healthy standby within ${TIMEOUT_S} s" \
                 "(journalctl -u bmslink-controller@$name); the active was left running"
done

# -- 6. handover ------------------------------------------------------------------------------------------
step "6. handover from the active controller"
STANDBY_ENDPOINTS=()
for name in "${OTHERS[@]}"; do STANDBY_ENDPOINTS+=("${ENDPOINT[$name]}"); done
STANDBY_ENDPOINTS+=("${PEER_STANDBYS[@]}")
for name in "${ACTIVE[@]}"; do
    if [[ ${#STANDBY_ENDPOINTS[@]} -eq 0 ]]; then
        run systemctl restart "bmslink-controller@$name"
        wait_for "controller $name is back" any_active "${ENDPOINT[$name]}" \
            || abort "controller $name did not come back as the active within ${TIMEOUT_S} s"
        continue
    fi
    echo "  a standby takes over from $name: ${STANDBY_ENDPOINTS[*]}"
    run systemctl stop "bmslink-controller@$name"
    wait_for "a standby has taken over" any_active "${STANDBY_ENDPOINTS[@]}" \
        || { run systemctl start "bmslink-controller@$name";
             abort "no standby took over within ${TIMEOUT_S} s; controller $name was started again"; }
    run systemctl start "bmslink-controller@$name"
    wait_for "controller $name is back as a healthy standby" healthy_standby "${ENDPOINT[$name]}" \
        || abort "controller $name did not come back as a healthy standby within ${TIMEOUT_S} s" \
                 "(journalctl -u bmslink-controller@$name)"
done

# -- 7. agents --------------------------------------------------------------------------------------------
step "7. rack agents, one at a time"
for name in "${AGENTS[@]}"; do
    # Type=notify: restart returns once the agent said READY (or fails if it did not).
    run systemctl restart "bmslink-agent@$name" \
        || abort "agent $name did not start again (journalctl -u bmslink-agent@$name)"
done

step "done$([[ $DRY_RUN -eq 1 ]] && echo ' (dry run: nothing was changed)')"
