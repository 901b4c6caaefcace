"""A live view of what is on the broker, for operators and the demo: a terminal view (rich), or JSON.

One broker may carry several sites (a central broker fed by site bridges, docs/fleet.md): ``--site``
is repeatable, and ``--site '+'`` watches every site that publishes under the prefix; each site gets
its own section (terminal) or object (JSON).

* Terminal: the racks table and the consolidated battery per site. On a terminal the view takes its
  width; piped or redirected it is ``--width`` columns (``PIPED_WIDTH`` by default), every line cut
  with ``…`` rather than wrapped, so a long reason never breaks a panel.
* ``--json``: one JSON object per ``--interval`` on stdout (one line each), or one object with
  ``--once``: ``{"timestamp_s", "prefix", "sites": [{"site_id", "racks": [...], "bank": {...} | null,
  "controllers": {...}, "rejected": [...]}]}``. A rack and the bank are the documents the JSON bridge
  publishes (bmslink/bridge/render.py: the same field names and units), a rack with ``agent``
  (its status topic: online, offline or unknown) and ``age_s`` (seconds since its last reading) added.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from bmslink.bridge.render import ControllerSeen, bank_document, rack_document
from shared.cluster import ConsolidatedState, ControllerStatus, RackView
from shared.codec import DecodeError, Decoder, telemetry_decoder
from shared.config import ConfigError, MqttConfig
from shared.models import RackTelemetry
from shared.mqtt import Message, MqttSession
from shared.topics import STATUS_OFFLINE, Topics

REFRESH_S = 0.5
ONCE_COLLECT_S = 3.0  # --once: what arrives in this long is the snapshot
CONNECT_TIMEOUT_S = 5.0  # --once: no broker within this is an error (exit 1), not an empty table
MIN_WIDTH = 40
PIPED_WIDTH = 160  # columns when stdout is not a terminal (a log file, a pipe, a CI job)
ANY_SITE = "+"
MAX_SITES = 256  # sites a wildcard view keeps (a broker full of junk must not grow it without bound)


class TelemetryView:
    """Latest telemetry and status per rack of one site, fed from MQTT messages."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.decoder = telemetry_decoder()
        self.racks: dict[str, RackTelemetry] = {}
        self.received_at: dict[str, float] = {}
        self.received_wall: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.rejected: list[str] = []
        self.cluster_decoder: Decoder[ConsolidatedState] = Decoder(ConsolidatedState)
        self.cluster: ConsolidatedState | None = None
        self.cluster_at = 0.0
        self.cluster_wall = 0.0
        self.inverter_status: str = ""
        self.controller_decoder: Decoder[ControllerStatus] = Decoder(ControllerStatus)
        self.controllers: dict[str, str] = {}
        self.controllers_seen: dict[str, ControllerSeen] = {}

    def feed(self, topic: str, payload: bytes, now_s: float, wall_s: float | None = None) -> None:
        wall_s = time.time() if wall_s is None else wall_s
        node = self.topics.controller_id_from_status_topic(topic)
        if node is not None:
            if payload == STATUS_OFFLINE or not payload:
                self.controllers[node] = "offline"
                self.controllers_seen[node] = ControllerSeen(online=False)
                return
            try:
                st = self.controller_decoder.decode(payload, topic)
            except DecodeError:
                return
            heard = "" if st.since_active_heard_s is None or st.role == "active" else \
                f", heard active {st.since_active_heard_s:.1f} s ago"
            self.controllers[node] = f"{st.role} (epoch {st.epoch}{heard}): {st.last_change_reason}"
            self.controllers_seen[node] = ControllerSeen(online=True, role=st.role, epoch=st.epoch)
            return
        if topic == self.topics.cluster_state:
            try:
                self.cluster = self.cluster_decoder.decode(payload, topic)
                self.cluster_at, self.cluster_wall = now_s, wall_s
            except DecodeError as exc:
                self.rejected = [*self.rejected[-4:], str(exc)]
            return
        rack = self.topics.rack_id_from_topic(topic)
        if rack is None:
            return
        if topic == self.topics.rack_status(rack):
            self.status[rack] = payload.decode("utf-8", "replace")
            return
        if topic != self.topics.rack_telemetry(rack):
            return
        try:
            telemetry = self.decoder.decode(payload, topic)
        except DecodeError as exc:
            self.rejected = [*self.rejected[-4:], str(exc)]
            return
        self.racks[rack] = telemetry
        self.received_at[rack] = now_s
        self.received_wall[rack] = wall_s

    # -- terminal ---------------------------------------------------------------------------------

    def table(self, now_s: float) -> Table:
        t = Table(title=f"bmslink {self.topics.site_id}: racks", expand=False, pad_edge=False)
        # "BMS" is what the rack's BMS allows; "granted" what the controller let the rack add to the
        # bank this cycle (after derates, holds, maintenance; 0 when it is not in parallel).
        for col in ("rack", "link", "age", "V", "A", "SOC", "cell V", "T max", "BMS CCL/DCL A", "granted",
                    "contactor", "alarms"):
            t.add_column(col, no_wrap=True, overflow="ellipsis")
        for rack in sorted(set(self.racks) | set(self.status)):
            tel = self.racks.get(rack)
            status = self.status.get(rack, "?")
            if tel is None:
                t.add_row(rack, status, *[""] * 10)
                continue
            age = f"{now_s - self.received_at[rack]:.1f}s"
            link = tel.comm_state.value if status == "online" else f"{status}/{tel.comm_state.value}"
            units = {u.status.value for u in tel.units} - {"ok"}
            if units:
                link += f" ({','.join(sorted(units))})"
            m = tel.measurements
            if m is None:
                t.add_row(rack, link, age, *[""] * 9)
                continue
            view = self._views().get(rack)
            granted = "" if view is None else (
                f"{view.charge_current_limit_a:.0f}/{view.discharge_current_limit_a:.0f}"
                + (" maint" if view.maintenance else ""))
            t.add_row(
                rack, link, age, f"{m.pack_voltage_v:.2f}", f"{m.current_a:.1f}", f"{m.soc_pct:.1f}%",
                f"{m.cell_voltage_min_v:.3f}-{m.cell_voltage_max_v:.3f}", f"{m.temperature_max_c:.1f}",
                f"{m.charge_current_limit_a:.0f}/{m.discharge_current_limit_a:.0f}", granted,
                m.contactor.value, ",".join(m.alarms.raised()) or "-",
            )
        return t

    def _views(self) -> dict[str, RackView]:
        return {view.rack_id: view for view in self.cluster.racks} if self.cluster is not None else {}

    def render(self, now_s: float) -> Group:
        parts: list[RenderableType] = [self.table(now_s)]
        c = self.cluster
        if c is not None:
            lines = [
                f"[b]CCL {c.charge_current_limit_a:.1f} A[/b]  {_plain(_why(c.ccl_reason))}",
                f"[b]DCL {c.discharge_current_limit_a:.1f} A[/b]  {_plain(_why(c.dcl_reason))}",
                f"CVL {c.charge_voltage_limit_v:.1f} V  {_plain(_why(c.cvl_reason))}",
                f"DVL {c.discharge_voltage_limit_v:.1f} V  {_plain(_why(c.dvl_reason))}",
                f"SOC {c.soc_pct:.1f} %  V {c.pack_voltage_v:.2f}  I {c.current_a:.1f} A  "
                f"eligible {c.eligible_racks}/{c.roster_size}  node {_plain(c.node_id)}  "
                f"age {now_s - self.cluster_at:.1f} s",
                "racks: " + _plain(", ".join(
                    f"{r.rack_id}:{r.state.value}"
                    + (f"({r.share:.0%})" if r.eligible and r.share < 1 else "")
                    + ("[maintenance]" if r.maintenance else "")
                    for r in c.racks
                )),
                "alarms: " + (", ".join((*c.alarms.raised(), *c.cluster.raised())) or "none")
                + ("  unknown racks: " + _plain(", ".join(c.unknown_racks)) if c.unknown_racks else ""),
            ]
            parts.append(Panel(_lines(lines), title="consolidated battery (what the inverter is told)"))
        if self.controllers:
            parts.append(Panel(
                _lines([_plain(f"{node}: {text}") for node, text in sorted(self.controllers.items())]),
                title="controllers",
            ))
        if self.inverter_status:
            parts.append(Panel(_lines([_plain(line) for line in self.inverter_status.splitlines()]),
                               title="simulated inverter"))
        if self.rejected:
            parts.append(Panel(_lines([_plain(r) for r in self.rejected[-3:]]), title="rejected payloads"))
        return Group(*parts)

    # -- JSON -------------------------------------------------------------------------------------

    def snapshot(self, now_s: float) -> dict[str, Any]:
        """This site as one JSON-able object (see the module docstring)."""
        state = self.cluster
        views = {v.rack_id: v for v in state.racks} if state is not None else {}
        racks = []
        for rack in sorted(set(self.racks) | set(self.status) | set(views)):
            doc = rack_document(rack, self.topics.site_id, self.racks.get(rack), view=views.get(rack),
                                state=state, received_s=self.received_wall.get(rack))
            doc["agent"] = self.status.get(rack, "unknown")
            doc["age_s"] = round(now_s - self.received_at[rack], 3) if rack in self.received_at else None
            racks.append(doc)
        bank = None
        if state is not None:
            bank = bank_document(state, self.controllers_seen, self.cluster_wall)
            bank["age_s"] = round(now_s - self.cluster_at, 3)
        return {
            "site_id": self.topics.site_id,
            "racks": racks,
            "bank": bank,
            "controllers": {node: {"online": s.online, "role": s.role, "epoch": s.epoch}
                            for node, s in sorted(self.controllers_seen.items())},
            "rejected": list(self.rejected),
        }


# A reason starts with the limit it explains ("CCL 560.0 A = rack-01 ..."); the line shows the value.
_REASON_HEAD = re.compile(r"^[CD][CV]L [0-9.]+ [AV](?: = |: | )?")


def _why(reason: str) -> str:
    """``reason`` without its leading "CCL 560.0 A = " (the line already shows the value)."""
    return _REASON_HEAD.sub("", reason, count=1)


def _plain(text: str) -> str:
    """``text`` shown as it is: the names and reasons on the broker are not rich markup."""
    return escape(text)


def _lines(lines: Sequence[str]) -> Group:
    """Panel content, one line each: cut with ``…`` at the panel's width, never wrapped."""
    texts = []
    for line in lines:
        text = Text.from_markup(line, overflow="ellipsis")
        text.no_wrap = True
        texts.append(text)
    return Group(*texts)


class SiteViews:
    """The views of the watched sites, messages routed to each by the site level of their topic."""

    def __init__(self, prefix: str, sites: Sequence[str]) -> None:
        self.prefix = prefix
        self.wildcard = ANY_SITE in sites
        self.views: dict[str, TelemetryView] = {
            site: TelemetryView(Topics(prefix, site)) for site in sites if site != ANY_SITE}
        self._head = f"{prefix}/"
        self.ignored_sites = 0

    def subscriptions(self) -> list[tuple[str, int]]:
        sites = [ANY_SITE] if self.wildcard else list(self.views)
        subs = []
        for site in sites:
            t = Topics(self.prefix, site)
            subs += [(t.all_rack_telemetry, 0), (t.all_rack_status, 1), (t.cluster_state, 0),
                     (t.all_controller_status, 1)]
        return subs

    def feed(self, msg: Message) -> None:
        if not msg.topic.startswith(self._head):
            return
        site = msg.topic[len(self._head):].split("/", 1)[0]
        view = self.views.get(site)
        if view is None:
            if not self.wildcard or not site:
                return
            if len(self.views) >= MAX_SITES:
                self.ignored_sites += 1
                return
            view = self.views[site] = TelemetryView(Topics(self.prefix, site))
        view.feed(msg.topic, msg.payload, msg.received_monotonic_s)

    def render(self, now_s: float) -> Group:
        if not self.views:
            return Group(Text(f"no site has published under {self.prefix}/ yet"))
        return Group(*(self.views[site].render(now_s) for site in sorted(self.views)))

    def snapshot(self, now_s: float) -> dict[str, Any]:
        return {
            "timestamp_s": time.time(),
            "prefix": self.prefix,
            "sites": [self.views[site].snapshot(now_s) for site in sorted(self.views)],
        }


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The monitor's own options (the broker's are the shared ones, bmslink/cli.py)."""
    parser.add_argument("--site", action="append", required=True, metavar="SITE",
                        help=f"a site to watch (repeatable); '{ANY_SITE}' watches every site on the broker")
    parser.add_argument("--once", action="store_true",
                        help=f"print one snapshot after {ONCE_COLLECT_S:g} s and exit")
    parser.add_argument("--json", action="store_true",
                        help="JSON instead of the terminal view: one object per --interval (one line "
                             "each), or one object with --once")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between two JSON objects (default 1)")
    parser.add_argument("--width", type=int, default=None,
                        help=f"columns of the terminal view (default: the terminal's, {PIPED_WIDTH} when "
                             "stdout is not a terminal)")


def _console(width: int | None) -> Console:
    """A terminal's own width; piped, ``PIPED_WIDTH`` unless ``COLUMNS`` says otherwise (rich reads it),
    rather than rich's 80, which squeezes the racks table."""
    probe = Console()
    if width is None and not probe.is_terminal and "COLUMNS" not in os.environ:
        width = PIPED_WIDTH
    return Console(width=width) if width is not None else probe


async def run_monitor(
    mqtt: MqttConfig,
    site_id: str | Sequence[str],
    stop: asyncio.Event,
    *,
    once: bool = False,
    inverter_status: Callable[[], str] | None = None,
    as_json: bool = False,
    interval_s: float = 1.0,
    width: int | None = None,
) -> int:
    problems = []
    if width is not None and width < MIN_WIDTH:
        problems.append(f"--width {width}: at least {MIN_WIDTH} columns")
    if not 0 < interval_s <= 3600:
        problems.append(f"--interval {interval_s:g}: above 0 and at most 3600 seconds")
    if problems:
        raise ConfigError("<command line>", problems)
    sites = [site_id] if isinstance(site_id, str) else list(site_id)
    views = SiteViews(mqtt.topic_prefix, sites)
    session = MqttSession(mqtt, f"bmslink-monitor-{uuid.uuid4().hex[:8]}")
    for topic, qos in views.subscriptions():
        session.subscribe(topic, qos=qos)
    await session.start()
    try:
        if once and not await session.wait_connected(CONNECT_TIMEOUT_S):
            why = session.stats.last_disconnect_reason or "no answer"
            print(f"bmslink monitor: cannot connect to the broker at {mqtt.host}:{mqtt.port} ({why}; "
                  f"{session.stats.connect_failures} failed attempt(s))", file=sys.stderr)
            return 1
        if as_json:
            await _json_lines(session, views, stop, once=once, interval_s=interval_s)
        else:
            await _terminal(session, views, stop, once=once, inverter_status=inverter_status, width=width)
    finally:
        await session.stop()
    return 0


async def _pump(session: MqttSession, views: SiteViews, timeout_s: float) -> None:
    """Feed what arrives within ``timeout_s`` (at least one message or the timeout) to the views."""
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            views.feed(await session.messages.get())
    except TimeoutError:
        return
    while not session.messages.empty():
        views.feed(session.messages.get_nowait())


async def _json_lines(session: MqttSession, views: SiteViews, stop: asyncio.Event, *, once: bool,
                      interval_s: float) -> None:
    period_s = ONCE_COLLECT_S if once else interval_s
    while not stop.is_set():
        due = time.monotonic() + period_s
        while not stop.is_set() and (left := due - time.monotonic()) > 0:
            await _pump(session, views, min(left, REFRESH_S))
        if stop.is_set() and not once:
            return
        print(json.dumps(views.snapshot(time.monotonic()), ensure_ascii=False), flush=True)
        if once:
            return


async def _terminal(session: MqttSession, views: SiteViews, stop: asyncio.Event, *, once: bool,
                    inverter_status: Callable[[], str] | None, width: int | None) -> None:
    console = _console(width)

    def refreshed() -> Group:
        if inverter_status is not None:
            for view in views.views.values():
                view.inverter_status = inverter_status()
        return views.render(time.monotonic())

    if once:
        deadline = time.monotonic() + ONCE_COLLECT_S
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            await _pump(session, views, min(left, REFRESH_S))
        console.print(refreshed())
        return
    with Live(refreshed(), console=console, refresh_per_second=4) as live:
        while not stop.is_set():
            await _pump(session, views, REFRESH_S)
            live.update(refreshed())
