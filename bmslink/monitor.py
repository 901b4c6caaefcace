"""A live terminal view of what is on the broker (rich), for operators and the demo."""

from __future__ import annotations

import asyncio
import time
import uuid

from rich.console import Console
from rich.live import Live
from rich.table import Table

from shared.codec import DecodeError, telemetry_decoder
from shared.config import MqttConfig
from shared.mqtt import MqttSession
from shared.models import RackTelemetry
from shared.topics import Topics

REFRESH_S = 0.5


class TelemetryView:
    """Latest telemetry and status per rack, fed from MQTT messages."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.decoder = telemetry_decoder()
        self.racks: dict[str, RackTelemetry] = {}
        self.received_at: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.rejected: list[str] = []

    def feed(self, topic: str, payload: bytes, now_s: float) -> None:
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
        t = Table(title=f"bmslink {self.topics.site_id}: racks", expand=False)
        for col in ("rack", "status", "comm", "age s", "V", "A", "SOC %", "cell V min/max", "T °C min/max",
                    "CCL A", "DCL A", "CVL V", "DVL V", "contactor", "alarms", "units"):
            t.add_column(col)
        for rack in sorted(set(self.racks) | set(self.status)):
            tel = self.racks.get(rack)
            status = self.status.get(rack, "?")
            if tel is None:
                t.add_row(rack, status, *[""] * 14)
                continue
            age = f"{now_s - self.received_at[rack]:.1f}"
            units = ", ".join(f"{u.unit}:{u.status.value}" for u in tel.units)
            m = tel.measurements
            if m is None:
                t.add_row(rack, status, tel.comm_state.value, age, *[""] * 11, units)
                continue
            t.add_row(
                rack, status, tel.comm_state.value, age, f"{m.pack_voltage_v:.2f}", f"{m.current_a:.1f}",
                f"{m.soc_pct:.1f}", f"{m.cell_voltage_min_v:.3f}/{m.cell_voltage_max_v:.3f}",
                f"{m.temperature_min_c:.1f}/{m.temperature_max_c:.1f}", f"{m.charge_current_limit_a:.1f}",
                f"{m.discharge_current_limit_a:.1f}", f"{m.charge_voltage_limit_v:.1f}",
                f"{m.discharge_voltage_limit_v:.1f}", m.contactor.value,
                ",".join(m.alarms.raised()) or "-", units,
            )
        return t


async def run_monitor(mqtt: MqttConfig, site_id: str, stop: asyncio.Event, *, once: bool = False) -> int:
    topics = Topics(mqtt.topic_prefix, site_id)
    view = TelemetryView(topics)
    session = MqttSession(mqtt, f"bmslink-monitor-{uuid.uuid4().hex[:8]}")
    session.subscribe(topics.all_rack_telemetry)
    session.subscribe(topics.all_rack_status, qos=1)
    await session.start()
    console = Console()
    deadline = time.monotonic() + 3.0 if once else None
    try:
        with Live(view.table(time.monotonic()), console=console, refresh_per_second=4,
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
                live.update(view.table(time.monotonic()))
        if once:
            console.print(view.table(time.monotonic()))
    finally:
        await session.stop()
    return 0
