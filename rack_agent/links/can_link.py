"""A rack BMS that broadcasts the Pylon-family frame set on its own CAN bus.

Decoded with the same DBC the controller uses (``shared/dbc/pylon.dbc``).
The python-can callback only hands frames to the event loop; a poll reads the
latest complete, fresh set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import can
import cantools

from rack_agent.errors import ConnectionRefusedPollError, InvalidDataError, PollTimeoutError
from rack_agent.links.base import BmsLink
from rack_agent.plausibility import validated_measurements
from rack_agent.unit import UnitRuntime
from shared.agent_config import CanLink
from shared.dbc import load_dbc, numeric_signals
from shared.models import ContactorState, ProtectionFlags, RackMeasurements

log = logging.getLogger(__name__)

ID_LIMITS = 0x351
ID_SOC = 0x355
ID_MEASURE = 0x356
ID_PROTECTION = 0x359
ID_REQUEST = 0x35C
ID_CELLS = 0x373
ID_CAPACITY = 0x379
REQUIRED_IDS = (ID_LIMITS, ID_SOC, ID_MEASURE, ID_PROTECTION, ID_CELLS)

# Pylon 0x359 protection bits -> our named flags (temperature bits carry no direction: both).
_ALARMS = {
    "ProtCellOverVoltage": ("cell_over_voltage",),
    "ProtCellUnderVoltage": ("cell_under_voltage",),
    "ProtOverTemperature": ("charge_over_temperature", "discharge_over_temperature"),
    "ProtUnderTemperature": ("charge_under_temperature", "discharge_under_temperature"),
    "ProtDischargeOverCurrent": ("discharge_over_current",),
    "ProtChargeOverCurrent": ("charge_over_current",),
    "ProtSystemError": ("internal_fault",),
}
_WARNINGS = {
    "WarnHighVoltage": ("cell_over_voltage",),
    "WarnLowVoltage": ("cell_under_voltage",),
    "WarnHighTemperature": ("charge_over_temperature", "discharge_over_temperature"),
    "WarnLowTemperature": ("charge_under_temperature", "discharge_under_temperature"),
    "WarnDischargeHighCurrent": ("discharge_over_current",),
    "WarnChargeHighCurrent": ("charge_over_current",),
    "WarnInternalCommFail": ("internal_fault",),
}


def _flags(decoded: Mapping[str, float], table: dict[str, tuple[str, ...]]) -> ProtectionFlags:
    raised = {name for signal, names in table.items() if decoded.get(signal) for name in names}
    return ProtectionFlags(**dict.fromkeys(raised, True))


class CanBmsLink(BmsLink):
    def __init__(self, config: CanLink, *, reconnect_initial_s: float, reconnect_max_s: float) -> None:
        super().__init__(
            config.name, reconnect_initial_s=reconnect_initial_s, reconnect_max_s=reconnect_max_s
        )
        self.config = config
        self._db: cantools.database.can.Database = load_dbc("pylon")
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None
        self._latest: dict[int, tuple[bytes, float]] = {}
        self.frames_received = 0
        self.error_frames = 0

    def _on_frame(self, msg: can.Message) -> None:
        # Runs on the event loop (the notifier hands over with call_soon_threadsafe or add_reader).
        if msg.is_error_frame:
            self.error_frames += 1
            return
        self.frames_received += 1
        self._latest[msg.arbitration_id] = (bytes(msg.data), time.monotonic())

    async def _connect(self) -> None:
        kwargs: dict[str, Any] = {"interface": self.config.interface, "channel": self.config.channel}
        if self.config.interface not in ("virtual", "remote", "socketcan"):
            kwargs["bitrate"] = self.config.bitrate  # socketcan's bitrate is set by `ip link`
        try:
            bus = can.Bus(**kwargs)
        except (can.CanError, OSError, ValueError) as exc:
            raise ConnectionRefusedPollError(
                f"cannot open CAN {self.config.interface}:{self.config.channel}: {exc}"
            ) from exc
        loop = asyncio.get_running_loop()
        self._bus = bus
        self._notifier = can.Notifier(bus, [self._on_frame], timeout=0.2, loop=loop)

    async def _disconnect(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    async def _read(self, unit: UnitRuntime, timeout_s: float) -> RackMeasurements:
        now = time.monotonic()
        stale_s = self.config.stale_after_ms / 1000.0
        missing = [
            hex(i) for i in REQUIRED_IDS if i not in self._latest or now - self._latest[i][1] > stale_s
        ]
        if missing:
            raise PollTimeoutError(f"no fresh frames {missing} from the BMS on CAN {self.config.channel}")
        try:
            d = {
                i: numeric_signals(self._db.decode_message(i, self._latest[i][0], decode_choices=False))
                for i in REQUIRED_IDS
            }
            request = (
                numeric_signals(
                    self._db.decode_message(ID_REQUEST, self._latest[ID_REQUEST][0], decode_choices=False)
                )
                if ID_REQUEST in self._latest else None
            )
            capacity = (
                float(numeric_signals(
                    self._db.decode_message(ID_CAPACITY, self._latest[ID_CAPACITY][0])
                )["InstalledCapacity"])
                if ID_CAPACITY in self._latest else unit.config.capacity_ah
            )
        except (KeyError, ValueError, cantools.database.errors.DecodeError) as exc:
            raise InvalidDataError(f"undecodable frame: {exc}") from exc
        if capacity is None:
            raise InvalidDataError("BMS sends no 0x379 capacity and the unit config gives none")
        limits, soc, meas, prot, cells = (d[i] for i in REQUIRED_IDS)
        current = float(meas["PackCurrent"])
        contactor = ContactorState.UNKNOWN
        if request is not None:
            enabled = bool(request["ChargeEnable"]) or bool(request["DischargeEnable"])
            contactor = ContactorState.CLOSED if enabled else ContactorState.OPEN
        values = {
            "pack_voltage_v": float(meas["PackVoltage"]),
            "current_a": -current if unit.invert_current else current,
            "soc_pct": float(soc["StateOfCharge"]),
            "soh_pct": float(soc["StateOfHealth"]),
            "cell_voltage_max_v": float(cells["CellVoltageMax"]),
            "cell_voltage_min_v": float(cells["CellVoltageMin"]),
            "temperature_max_c": float(cells["CellTemperatureMax"]),
            "temperature_min_c": float(cells["CellTemperatureMin"]),
            # Old emitters send DCL negative; the magnitude is what the BMS means.
            "charge_current_limit_a": abs(float(limits["ChargeCurrentLimit"])),
            "discharge_current_limit_a": abs(float(limits["DischargeCurrentLimit"])),
            "charge_voltage_limit_v": float(limits["ChargeVoltageLimit"]),
            "discharge_voltage_limit_v": float(limits["DischargeVoltageLimit"]),
            "alarms": _flags(prot, _ALARMS),
            "warnings": _flags(prot, _WARNINGS),
            "contactor": contactor,
            "capacity_ah": capacity,
        }
        return validated_measurements(values, unit.rules)
