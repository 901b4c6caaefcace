"""A live terminal view of what is on the broker (rich), for operators and the demo."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from shared.cluster import ConsolidatedState, ControllerStatus
from shared.codec import DecodeError, Decoder, telemetry_decoder
from shared.config import MqttConfig
from shared.models import RackTelemetry
from shared.mqtt import MqttSession
from shared.topics import Topics

REFRESH_S = 0.5
CONNECT_TIMEOUT_S = 5.0  # --once: no broker within this is an error (exit 1), not an empty table


class TelemetryView:
    """Latest telemetry and status per rack, fed from MQTT messages."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.decoder = telemetry_decoder()
        self.racks: dict[str, RackTelemetry] = {}
        self.received_at: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.rejected: list[str] = []
        self.cluster_decoder: Decoder[ConsolidatedState] = Decoder(ConsolidatedState)
        self.cluster: ConsolidatedState | None = None
        self.cluster_at = 0.0
        self.inverter_status: str = ""
        self.controller_decoder: Decoder[ControllerStatus] = Decoder(ControllerStatus)
        self.controllers: dict[str, str] = {}

    def feed(self, topic: str, payload: bytes, now_s: float) -> None:
        node = self.topics.controller_id_from_status_topic(topic)
        if node is not None:
            if payload == b"offline" or not payload:
                self.controllers[node] = "offline"
                return
            try:
                st = self.controller_decoder.decode(payload, topic)
            except DecodeError:
                return
            heard = "" if st.since_active_heard_s is None or st.role == "active" else \
                f", heard active {st.since_active_heard_s:.1f} s ago"
            self.controllers[node] = f"{st.role} (epoch {st.epoch}{heard}): {st.last_change_reason}"
            return
        if topic == self.topics.cluster_state:
            try:
                self.cluster = self.cluster_decoder.decode(payload, topic)
                self.cluster_at = now_s
            except DecodeError as exc:
                self.rejected = [*self.rejected[-4:], str(exc)]
            return
        rack = self.topics.rack_id_from_topic(topic)
        if rack is None:
            return
        if topic == self.topics.rack_status(rack):
            self.status[rack] = payload.decode("utf-8", "replace")
            return
        try:
            telemetry = self.decoder.decode(payload, topic)
        except DecodeError as exc:
            self.rejected = [*self.rejected[-4:], str(exc)]
            return
        self.racks[rack] = telemetry
        self.received_at[rack] = now_s

    def table(self, now_s: float) -> Table:
        t = Table(title=f"bmslink {self.topics.site_id}: racks", expand=False, pad_edge=False)
        for col in ("rack", "link", "age", "V", "A", "SOC", "cell V", "T max", "CCL/DCL A", "contactor",
                    "alarms"):
            t.add_column(col, no_wrap=True)
        for rack in sorted(set(self.racks) | set(self.status)):
            tel = self.racks.get(rack)
            status = self.status.get(rack, "?")
            if tel is None:
                t.add_row(rack, status, *[""] * 9)
                continue
            age = f"{now_s - self.received_at[rack]:.1f}s"
            link = tel.comm_state.value if status == "online" else f"{status}/{tel.comm_state.value}"
            units = {u.status.value for u in tel.units} - {"ok"}
            if units:
                link += f" ({','.join(sorted(units))})"
            m = tel.measurements
            if m is None:
                t.add_row(rack, link, age, *[""] * 8)
                continue
            t.add_row(
                rack, link, age, f"{m.pack_voltage_v:.2f}", f"{m.current_a:.1f}", f"{m.soc_pct:.1f}%",
                f"{m.cell_voltage_min_v:.3f}-{m.cell_voltage_max_v:.3f}", f"{m.temperature_max_c:.1f}",
                f"{m.charge_current_limit_a:.0f}/{m.discharge_current_limit_a:.0f}", m.contactor.value,
                ",".join(m.alarms.raised()) or "-",
            )
        return t

    def render(self, now_s: float) -> Group:
        parts: list[Table | Panel] = [self.table(now_s)]
        c = self.cluster
        if c is not None:
            lines = [
                f"[b]CCL {c.charge_current_limit_a:.1f} A[/b]  {c.ccl_reason}",
                f"[b]DCL {c.discharge_current_limit_a:.1f} A[/b]  {c.dcl_reason}",
                f"CVL {c.charge_voltage_limit_v:.1f} V  {c.cvl_reason}",
                f"DVL {c.discharge_voltage_limit_v:.1f} V  {c.dvl_reason}",
                f"SOC {c.soc_pct:.1f} %  V {c.pack_voltage_v:.2f}  I {c.current_a:.1f} A  "
                f"eligible {c.eligible_racks}/{c.roster_size}  node {c.node_id}  "
                f"age {now_s - self.cluster_at:.1f} s",
                "racks: " + ", ".join(
                    f"{r.rack_id}:{r.state.value}"
                    + (f"({r.share:.0%})" if r.eligible and r.share < 1 else "")
                    + ("[maintenance]" if r.maintenance else "")
                    for r in c.racks
                ),
                "alarms: " + (", ".join((*c.alarms.raised(), *c.cluster.raised())) or "none")
                + ("  unknown racks: " + ", ".join(c.unknown_racks) if c.unknown_racks else ""),
            ]
            parts.append(Panel("\n".join(lines), title="consolidated battery (what the inverter is told)"))
        if self.controllers:
            parts.append(Panel(
                "\n".join(f"{node}: {text}" for node, text in sorted(self.controllers.items())),
                title="controllers",
            ))
        if self.inverter_status:
            parts.append(Panel(self.inverter_status, title="simulated inverter"))
        if self.rejected:
            parts.append(Panel("\n".join(self.rejected[-3:]), title="rejected payloads"))
        return Group(*parts)


async def run_monitor(
    mqtt: MqttConfig,
    site_id: str,
    stop: asyncio.Event,
    *,
    once: bool = False,
    inverter_status: Callable[[], str] | None = None,
) -> int:
    topics = Topics(mqtt.topic_prefix, site_id)
    view = TelemetryView(topics)
    session = MqttSession(mqtt, f"bmslink-monitor-{uuid.uuid4().hex[:8]}")
    session.subscribe(topics.all_rack_telemetry)
    session.subscribe(topics.all_rack_status, qos=1)
    session.subscribe(topics.cluster_state)
    session.subscribe(topics.all_controller_status, qos=1)
    await session.start()
    console = Console()
    deadline = time.monotonic() + 3.0 if once else None
    try:
        if once and not await session.wait_connected(CONNECT_TIMEOUT_S):
            why = session.stats.last_disconnect_reason or "no answer"
            print(f"bmslink monitor: cannot connect to the broker at {mqtt.host}:{mqtt.port} ({why}; "
                  f"{session.stats.connect_failures} failed attempt(s))", file=sys.stderr)
            return 1
        with Live(view.render(time.monotonic()), console=console, refresh_per_second=4,
                  transient=once) as live:
            while not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                try:
                    async with asyncio.timeout(REFRESH_S):
                        msg = await session.messages.get()
                    view.feed(msg.topic, msg.payload, msg.received_monotonic_s)
                    while not session.messages.empty():
                        msg = session.messages.get_nowait()
                        view.feed(msg.topic, msg.payload, msg.received_monotonic_s)
                except TimeoutError:
                    pass
                if inverter_status is not None:
                    view.inverter_status = inverter_status()
                live.update(view.render(time.monotonic()))
        if once:
            console.print(view.render(time.monotonic()))
    finally:
        await session.stop()
    return 0
