"""Configuration of a cluster controller: roster, aggregation policies, derates, CAN feed, failover."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from shared.config import (
    CanInterfaceName,
    Frozen,
    ListenAddress,
    MetricsConfig,
    MqttConfig,
    Port,
    ReadableFile,
    WritableDir,
)
from shared.models import Identifier

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class CurrentPolicy(StrEnum):
    """How rack current limits combine into the bank limit.

    See controller/core/policies.py for the physics.
    """

    N_TIMES_MIN = "n_times_min"
    SUM = "sum"
    MIN = "min"


class RosterRack(Frozen):
    rack_id: Identifier
    capacity_ah: Annotated[float, Field(gt=0, le=100_000)]
    # Default: 3 × the rack's own poll interval as it reports it, bounded to 1–10 s.
    stale_after_ms: Annotated[int, Field(ge=1000, le=10_000)] | None = None
    # This rack's own isolation time (default: aggregation.isolation_s): see AggregationConfig.
    isolation_s: Annotated[float, Field(ge=0.0, le=3600.0)] | None = None


class Breakpoint(Frozen):
    """One point of a piecewise-linear table: at ``x`` the factor is ``factor`` (0..1)."""

    x: float
    factor: Annotated[float, Field(ge=0.0, le=1.0)]


def _check_table(points: tuple[Breakpoint, ...], name: str) -> None:
    xs = [p.x for p in points]
    if xs != sorted(xs) or len(set(xs)) != len(xs):
        raise ValueError(f"{name}: breakpoints must have strictly increasing x, got {xs}")


class ThermalDerateConfig(Frozen):
    """Rate-of-rise derate: the table applies to the max cell temperature projected ``horizon_s`` ahead."""

    enabled: bool = True
    window_s: Annotated[float, Field(ge=1.0, le=600.0)] = 30.0
    horizon_s: Annotated[float, Field(ge=0.0, le=600.0)] = 60.0
    # Only rising temperature projects forward; a cooling pack is judged on its present temperature.
    table: Annotated[tuple[Breakpoint, ...], Field(min_length=2)] = (
        Breakpoint(x=40.0, factor=1.0),
        Breakpoint(x=45.0, factor=0.5),
        Breakpoint(x=50.0, factor=0.25),
        Breakpoint(x=55.0, factor=0.0),
    )
    hysteresis_c: Annotated[float, Field(ge=0.0, le=10.0)] = 1.0

    @model_validator(mode="after")
    def _table(self) -> ThermalDerateConfig:
        _check_table(self.table, "thermal_derate.table")
        return self


class CellTaperConfig(Frozen):
    """CCL tapers to 0 as the max cell nears its charge limit; DCL as the min cell nears cut-off."""

    enabled: bool = True
    charge_table: Annotated[tuple[Breakpoint, ...], Field(min_length=2)] = (
        Breakpoint(x=3.40, factor=1.0),
        Breakpoint(x=3.45, factor=0.1),
        Breakpoint(x=3.55, factor=0.0),
    )
    discharge_table: Annotated[tuple[Breakpoint, ...], Field(min_length=2)] = (
        Breakpoint(x=2.80, factor=0.0),
        Breakpoint(x=2.90, factor=0.1),
        Breakpoint(x=3.00, factor=1.0),
    )
    hysteresis_v: Annotated[float, Field(ge=0.0, le=0.2)] = 0.01

    @model_validator(mode="after")
    def _tables(self) -> CellTaperConfig:
        _check_table(self.charge_table, "cell_taper.charge_table")
        _check_table(self.discharge_table, "cell_taper.discharge_table")
        return self


class AggregationConfig(Frozen):
    ccl_policy: CurrentPolicy = CurrentPolicy.N_TIMES_MIN
    dcl_policy: CurrentPolicy = CurrentPolicy.N_TIMES_MIN
    min_racks: Annotated[int, Field(ge=1, le=1000)] = 1
    # A returning rack must stay ok this long before it counts, then its share ramps in over ramp_in_s.
    readmit_hold_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 10.0
    readmit_ramp_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 10.0
    # A rack that was in parallel and is lost from sight (stale, invalid, comm-lost) may still be in
    # parallel, taking its share: its exclusion lowers the bank at once but never raises it until the
    # rack is known out of the bank, by its agent reporting the contactor open or by this time passing
    # (the time within which the rack's own BMS opens its contactor on loss of communication).
    isolation_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 60.0
    # Increases of CCL/DCL ramp at this rate; decreases apply at once.
    ramp_up_a_per_s: Positive = 10.0
    # Bank-level ceilings: the inverter never gets more than this whatever the racks say.
    max_charge_current_a: Annotated[float, Field(gt=0, le=3276.0)] = 1000.0
    max_discharge_current_a: Annotated[float, Field(gt=0, le=3276.0)] = 1000.0
    # Used for CVL when no rack has ever reported (CVL is never 0: an inverter reads 0 V as over-voltage).
    fallback_voltage_v: Annotated[float, Field(gt=0, le=1000)] = 51.2
    thermal_derate: ThermalDerateConfig = ThermalDerateConfig()
    cell_taper: CellTaperConfig = CellTaperConfig()


class Dialect(StrEnum):
    PYLON = "pylon"
    VICTRON = "victron"
    SMA = "sma"
    # High-voltage racks to HV hybrid inverters: 29-bit frames, answered when the inverter asks
    # (docs/inverter-dialects.md).
    PYLON_HV = "pylon_hv"


# LFP nominal cell voltage: the default "voltage level" of the Pylon HV equipment frame 0x7320.
LFP_NOMINAL_CELL_V = 3.2


class PylonHvConfig(Frozen):
    """What the Pylon HV "system equipment information" (0x7320) tells the inverter about the bank.

    Some HV inverters check these against the voltages they see and raise a voltage-range fault on a
    mismatch (Battery-Emulator's PYLON-CAN.h: "change only if your inverter is generating fault codes
    about voltage range"), so they describe the real racks: cells and modules in series of one rack.
    """

    cells_in_series: Annotated[int, Field(ge=1, le=2000)]
    modules_in_series: Annotated[int, Field(ge=1, le=255)]
    # The nominal pack voltage in whole volts; unset: cells_in_series × 3.2 V (LFP).
    nominal_voltage_v: Annotated[int, Field(ge=1, le=2000)] | None = None
    # Also send the frame set every can.period_ms unasked. Off: the set goes out when the inverter
    # asks (0x4200), and unasked only when a limit falls or an alarm rises, as real Pylon HV
    # batteries and the public emulators do.
    broadcast: bool = False

    @property
    def cells_per_module(self) -> int:
        return self.cells_in_series // self.modules_in_series

    @property
    def voltage_level_v(self) -> int:
        if self.nominal_voltage_v is not None:
            return self.nominal_voltage_v
        return round(self.cells_in_series * LFP_NOMINAL_CELL_V)

    @model_validator(mode="after")
    def _modules(self) -> PylonHvConfig:
        if self.cells_in_series % self.modules_in_series:
            raise ValueError(f"cells_in_series ({self.cells_in_series}) must be a whole multiple of "
                             f"modules_in_series ({self.modules_in_series})")
        if self.cells_per_module > 255:
            raise ValueError(f"cells per module ({self.cells_per_module}) exceeds 255, what 0x7320 carries: "
                             "raise modules_in_series")
        return self


class InverterCanConfig(Frozen):
    interface: CanInterfaceName = "socketcan"
    channel: str = "can0"
    bitrate: Annotated[int, Field(ge=10_000, le=1_000_000)] = 500_000
    dialect: Dialect = Dialect.PYLON
    # The full frame set goes out every period, and at once when a limit falls or an alarm rises.
    period_ms: Annotated[int, Field(ge=100, le=1000)] = 1000
    manufacturer: Annotated[str, Field(min_length=1, max_length=8, pattern=r"^[\x20-\x7e]+$")] = "PYLON"
    # After this many consecutive send failures the transmitter is considered failed (bus-off, no ACK).
    send_failures_before_fault: Annotated[int, Field(ge=1, le=100)] = 5
    # The bank as the pylon_hv dialect describes it; required by that dialect, refused by the others.
    pylon_hv: PylonHvConfig | None = None

    @model_validator(mode="after")
    def _sma_inhibit(self) -> InverterCanConfig:
        if self.dialect is Dialect.SMA and self.period_ms < 200:
            raise ValueError("the SMA dialect allows at most one value per 200 ms per ID: period_ms >= 200")
        return self

    @model_validator(mode="after")
    def _pylon_hv(self) -> InverterCanConfig:
        if self.dialect is Dialect.PYLON_HV and self.pylon_hv is None:
            raise ValueError('dialect "pylon_hv" needs a [can.pylon_hv] table with cells_in_series and '
                             "modules_in_series of one rack")
        if self.dialect is not Dialect.PYLON_HV and self.pylon_hv is not None:
            raise ValueError(f'[can.pylon_hv] is read only by dialect "pylon_hv", not "{self.dialect.value}"')
        return self


class ModbusServerConfig(Frozen):
    """Optional read-only SunSpec 802 view of the consolidated battery for EMS/inverters that read Modbus."""

    enabled: bool = False
    host: ListenAddress = "127.0.0.1"
    port: Port = 1502
    device_id: Annotated[int, Field(ge=1, le=247)] = 1
    allowed_clients: tuple[ListenAddress, ...] = ("127.0.0.1",)
    # A connection that sends no complete request for this long is closed (a reader that vanished
    # without a FIN, or a client that only connects, must not hold a slot for ever).
    idle_timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 30.0
    # Connections beyond this are closed at once (counted): a flood of clients cannot exhaust the
    # controller's file descriptors, whose loop also drives the inverter.
    max_connections: Annotated[int, Field(ge=1, le=256)] = 8


class CommandsConfig(Frozen):
    """Operator commands (shared/commands.py): who may give them, and for how long one stays valid."""

    # TOML with a [keys] table of key_id = "<64 hex digits>", readable by the service user only.
    # Unset: systemd's credential $CREDENTIALS_DIRECTORY/bmslink-command-keys, if there is one; with
    # no keys at all every command is refused.
    keys_file: ReadableFile | None = None
    # A command's timestamp must be within this of the controller's clock, either way.
    window_s: Annotated[float, Field(ge=1.0, le=600.0)] = 30.0


class FailoverConfig(Frozen):
    """Master-role failover between controllers on the same inverter CAN bus (see docs/failover.md).

    The CAN bus is the arbiter: the active sends a heartbeat frame every ``heartbeat_period_ms``; a
    standby takes over after ``silence_periods`` heartbeat periods of silence (plus a stagger for
    each better-ranked standby it hears), never because MQTT says so.
    """

    enabled: bool = False
    # Unique per controller of a site, 1..254: carried in the heartbeat frame.
    node_number: Annotated[int, Field(ge=1, le=254)] = 1
    # 0 = preferred. Distinct ranks make simultaneous starts resolve without overlap.
    rank: Annotated[int, Field(ge=0, le=15)] = 0
    # Off for an inverter that objects to unknown IDs: detection then relies on the limits frames
    # (silence = silence_periods × can.period_ms) and the orderly handover is unavailable.
    heartbeat_enabled: bool = True
    heartbeat_id: Annotated[int, Field(ge=0x001, le=0x7FF)] = 0x6E0
    heartbeat_period_ms: Annotated[int, Field(ge=20, le=1000)] = 100
    silence_periods: Annotated[int, Field(ge=2, le=50)] = 3
    stagger_ms: Annotated[int, Field(ge=0, le=5000)] = 150
    standby_heartbeat_period_ms: Annotated[int, Field(ge=50, le=5000)] = 200
    # An active with stale telemetry hands over to a standby with fresher data after this long.
    handover_hold_ms: Annotated[int, Field(ge=0, le=60_000)] = 2000
    # Consecutive failed CAN sends after which the active fences itself and lets a standby take over.
    send_failures_before_fence: Annotated[int, Field(ge=1, le=100)] = 3

    @property
    def silence_s(self) -> float:
        return self.silence_periods * self.heartbeat_period_ms / 1000.0


class ControllerMqttConfig(MqttConfig):
    """The controller's MQTT settings: as everywhere, but MQTT 3.1.1 unless ``protocol = "5"``.

    The controller receives every rack's telemetry, and under MQTT 5 the client parses the properties
    of every received message (docs/performance.md), for nothing the controller reads. The Message
    Expiry the agents set still holds: the broker applies it whatever the subscriber's protocol
    (checked with mosquitto 2.0.11). What 3.1.1 costs: the controller's own publishes carry no
    expiry, so its retained leader record stays until the next active replaces it (the record is
    advisory, docs/failover.md).
    """

    protocol: Annotated[str, Field(pattern=r"^(5|3\.1\.1)$")] = "3.1.1"


class WebConfig(Frozen):
    """The read-only web page of this controller (controller/web/): off unless enabled.

    It runs on the controller's own event loop, so what it may hold is bounded here: the history of
    the plots (one sample a second) and the live clients (each has a bounded queue of updates).
    """

    enabled: bool = False
    host: ListenAddress = "127.0.0.1"
    port: Port = 8080
    # How far back the plots go: one sample a second is kept this long (a ring buffer), at most a day.
    history_s: Annotated[int, Field(ge=60, le=86_400)] = 3600
    # Pages open at once (live update streams); one more is refused with 503 until one closes.
    max_clients: Annotated[int, Field(ge=1, le=64)] = 8


class ControllerConfig(Frozen):
    site_id: Identifier
    node_id: Identifier
    priority: Annotated[int, Field(ge=0, le=255)] = 100
    mqtt: ControllerMqttConfig = ControllerMqttConfig()
    roster: Annotated[tuple[RosterRack, ...], Field(min_length=1, max_length=1000)]
    aggregation: AggregationConfig = AggregationConfig()
    can: InverterCanConfig = InverterCanConfig()
    modbus_server: ModbusServerConfig = ModbusServerConfig()
    metrics: MetricsConfig = MetricsConfig(port=9109)
    max_payload_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    # A reading stamped further ahead of this controller's clock than this is refused (counted as
    # future_timestamp): a far-future stamp is a lie or a broken clock, never a reading to act on.
    max_clock_ahead_s: Annotated[float, Field(ge=0.1, le=3600.0)] = 5.0
    # Publish the consolidated state on the cluster topic (for monitoring), at most this often.
    state_publish_period_ms: Annotated[int, Field(ge=100, le=60_000)] = 1000
    failover: FailoverConfig = FailoverConfig()
    commands: CommandsConfig = CommandsConfig()
    # Where this controller keeps what must outlive a restart (the commands' replay memory). Unset:
    # kept in memory only, and said so at every start.
    state_dir: WritableDir | None = None
    web: WebConfig = WebConfig()

    def listeners(self) -> list[tuple[str, str]]:
        """(what, address) of every enabled listener, for the warning about exposed ones."""
        found = []
        if self.metrics.enabled:
            found.append(("metrics", self.metrics.host))
        if self.modbus_server.enabled:
            found.append(("modbus_server", self.modbus_server.host))
        if self.web.enabled:
            found.append(("web", self.web.host))
        return found

    @model_validator(mode="after")
    def _roster(self) -> ControllerConfig:
        ids = [r.rack_id for r in self.roster]
        if len(set(ids)) != len(ids):
            raise ValueError(f"roster rack_id values must be unique, got {ids}")
        inverter_ids = {0x305, 0x306, 0x307, 0x351, 0x355, 0x356, 0x359, 0x35A, 0x35B, 0x35C, 0x35E, 0x35F,
                        *range(0x370, 0x383)}
        if self.failover.enabled and self.failover.heartbeat_id in inverter_ids:
            raise ValueError(
                f"failover.heartbeat_id {self.failover.heartbeat_id:#x} collides with the inverter frame set"
            )
        if self.aggregation.min_racks > len(ids):
            raise ValueError(
                f"aggregation.min_racks ({self.aggregation.min_racks}) exceeds the roster size ({len(ids)})"
            )
        return self
