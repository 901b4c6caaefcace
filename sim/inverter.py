"""A simulated inverter on the BMS CAN bus: the witness of end-to-end tests.

It listens to the frame set of one dialect (``controller/frames.py`` decodes it with the same DBC),
draws a current that follows a charge/discharge profile but never exceeds the limits it received,
and records every breach of the protocol by the *BMS side* as a :class:`Violation` (the checks of
``inverter-can.md`` §5 that one listener can make). In the broadcast dialects it never transmits.

In a polled dialect (Pylon HV) it asks, as an HV hybrid inverter does: a 0x4200 "ensemble
information" request every ``request_period_s`` and a "system equipment information" request every
``equipment_every`` periods (the first one included). A request whose full answer has not arrived
within ``answer_timeout_s`` is a ``no_answer`` violation; frames the battery sends unasked are
accepted (Pylon HV batteries and emulators send some, e.g. diyBMS's first burst).

Threading: python-can's Notifier runs on the event loop (it hands each message to the loop); our
listener only converts it to a :class:`ReceivedFrame` and puts it into a bounded queue, counting what
it drops. One task consumes the queue, one steps the control loop every ``STEP_INTERVAL_S`` (and
checks the answers), one sends the requests of a polled dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import can

from controller.frames import (
    DIALECT_IDS,
    DIALECT_LIMITS_ID,
    EXTENDED_ID_DIALECTS,
    FRAME_DLC,
    HV_ALLOWED,
    HV_EQUIPMENT_IDS,
    HV_FORBIDDEN,
    ID_ALARMS,
    ID_HV_FORBIDDEN,
    ID_HV_LIMITS,
    ID_HV_REQUEST,
    ID_HV_STATUS,
    ID_LIMITS,
    ID_PROTECTION,
    ID_REQUEST,
    POLLED_DIALECTS,
    WIRE_ALARM_BLOCKS,
    DecodedLimits,
    FrameDecodeError,
    FrameDecoder,
    HvRequest,
    Pair,
    decoded_limits,
    hv_request_frame,
)
from shared.controller_config import Dialect

log = logging.getLogger(__name__)

STEP_INTERVAL_S = 0.1
# SMA-TI §5.1: no value faster than one per 200 ms per ID.
SMA_INHIBIT_S = 0.2
# The current may exceed a freshly lowered limit until the next control step; this much more covers
# the step task's own scheduling jitter before it counts as a violation.
CURRENT_LIMIT_GRACE_S = STEP_INTERVAL_S + 0.1
QUEUE_SIZE = 4096
NOTIFIER_POLL_S = 0.05  # the reader thread's recv timeout: how long stop() may wait for it
REQUEST_SEND_TIMEOUT_S = 0.05  # python-can's send() blocks at most this long on a full queue
# Reserved bits that must be 0 (§5.7, §5.8, §1 0x35A), per frame: one mask byte per payload byte.
# Pylon HV 0x4250: status values 4-7 (bits 0-2, checked apart), bits 5-7 of byte 0 and bits 12-15
# of the alarm and protection words; 0x4280: everything after the two marks.
RESERVED_MASKS: Mapping[Dialect, Mapping[int, bytes]] = {
    Dialect.PYLON: {
        ID_PROTECTION: bytes([0x61, 0xF6, 0x61, 0xF6, 0x00, 0x00, 0x00, 0xFF]),
        ID_REQUEST: bytes([0x07, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
    },
    Dialect.SMA: {ID_ALARMS: bytes([0, 0, 0, 0xFC, 0, 0, 0, 0xFC])},
    Dialect.VICTRON: {ID_ALARMS: bytes([0, 0, 0, 0xFC, 0, 0, 0, 0xFC])},
    Dialect.PYLON_HV: {
        ID_HV_STATUS: bytes([0xE0, 0x00, 0x00, 0x00, 0x00, 0xF0, 0x00, 0xF0]),
        ID_HV_FORBIDDEN: bytes([0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
    },
}
HV_STATUS_MAX = 3  # 0 sleep, 1 charge, 2 discharge, 3 idle; 4-7 reserved


class InverterStatus(StrEnum):
    NORMAL = "Normal"
    DISCONNECTED = "Disconnected"


class ViolationKind(StrEnum):
    HEARTBEAT_GAP = "heartbeat_gap"  # no 0x351 for longer than heartbeat_timeout_s
    NEGATIVE_LIMIT = "negative_limit"  # CCL or DCL < 0
    ZERO_CVL = "zero_cvl"
    DVL_NOT_BELOW_CVL = "dvl_not_below_cvl"
    ENABLE_WITH_ZERO_LIMIT = "enable_with_zero_limit"  # 0x35C enable bit set while the limit is 0
    LIMIT_WITHOUT_ENABLE = "limit_without_enable"  # 0x35C enable bit clear while the limit is > 0
    ALARM_WITH_PERMISSION = "alarm_with_permission"  # a protection bit / alarm pair next to a granted current
    INVALID_ALARM_PAIR = "invalid_alarm_pair"  # a 0x35A pair = 0b11
    RESERVED_BITS = "reserved_bits"
    UNEXPECTED_ID = "unexpected_id"  # not in the dialect's set
    EXTENDED_ID = "extended_id"  # a 29-bit frame in an 11-bit dialect
    STANDARD_ID = "standard_id"  # an 11-bit frame in a 29-bit dialect (Pylon HV)
    INVALID_MARK = "invalid_mark"  # a Pylon HV forbidden mark other than 0x00 / 0xAA
    NO_ANSWER = "no_answer"  # a request's full answer did not arrive within answer_timeout_s
    BAD_FRAME_TYPE = "bad_frame_type"  # remote, error or CAN FD frame
    DLC_MISMATCH = "dlc_mismatch"
    DECODE_ERROR = "decode_error"
    INHIBIT_TIME = "inhibit_time"  # SMA: the same ID again within 200 ms
    CURRENT_BEYOND_LIMIT = "current_beyond_limit"  # our own current stayed beyond a limit (never expected)


@dataclass(frozen=True, slots=True)
class Violation:
    time_s: float  # time.monotonic() when detected
    kind: ViolationKind
    detail: str


class ReceivedFrame(NamedTuple):
    """One frame as the inverter saw it: our own type, made at the python-can edge.

    ``time_s`` is ``time.monotonic()`` when the loop got it; ``bus_timestamp_s`` is python-can's
    timestamp (wall clock, set by the sending virtual bus or the kernel), used for frame spacing.
    python-can does not tell who sent a frame on a shared bus, so there is no sender field.
    """

    time_s: float
    arbitration_id: int
    data: bytes
    bus_timestamp_s: float
    is_extended_id: bool
    dlc: int
    is_remote_frame: bool
    is_error_frame: bool
    is_fd: bool

    @classmethod
    def of(cls, message: can.Message) -> ReceivedFrame:
        return cls(time.monotonic(), message.arbitration_id, bytes(message.data), message.timestamp,
                   message.is_extended_id, message.dlc, message.is_remote_frame, message.is_error_frame,
                   message.is_fd)


@dataclass(frozen=True, slots=True)
class ProfileSegment:
    duration_s: float
    current_a: float  # requested, positive = charging (the 0x356 convention)


@dataclass(frozen=True, slots=True)
class ChargeProfile:
    """What the inverter would like to draw: segments played in a loop from its start."""

    segments: tuple[ProfileSegment, ...] = (ProfileSegment(30.0, 50.0), ProfileSegment(30.0, -50.0))

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a charge profile needs at least one segment")
        for seg in self.segments:
            if not (math.isfinite(seg.duration_s) and seg.duration_s > 0):
                raise ValueError(f"segment duration must be positive seconds, got {seg.duration_s}")
            if not math.isfinite(seg.current_a):
                raise ValueError(f"segment current must be finite, got {seg.current_a}")

    @classmethod
    def parse(cls, text: str) -> ChargeProfile:
        """``"50:30,-50:30"``: amps:seconds segments (positive amps charge). Raises ValueError."""
        segments = []
        for part in text.split(","):
            amps, sep, seconds = part.strip().partition(":")
            if not sep:
                raise ValueError(f"profile segment {part.strip()!r} is not amps:seconds")
            try:
                segments.append(ProfileSegment(float(seconds), float(amps)))
            except ValueError as exc:
                raise ValueError(f"profile segment {part.strip()!r}: {exc}") from exc
        return cls(tuple(segments))

    @classmethod
    def constant(cls, current_a: float) -> ChargeProfile:
        return cls((ProfileSegment(3600.0, current_a),))

    @property
    def period_s(self) -> float:
        return sum(seg.duration_s for seg in self.segments)

    def requested_a(self, elapsed_s: float) -> float:
        t = elapsed_s % self.period_s
        for seg in self.segments:
            if t < seg.duration_s:
                return seg.current_a
            t -= seg.duration_s
        return self.segments[-1].current_a  # float rounding at the period's end


class InverterStartError(RuntimeError):
    """The bus could not be opened (``interface``/``channel`` say which), or the inverter already runs."""

    def __init__(self, message: str, *, interface: str = "", channel: str = "") -> None:
        super().__init__(message)
        self.interface = interface
        self.channel = channel


@dataclass(slots=True)
class _IdStats:
    count: int = 0
    last_time_s: float | None = None
    last_bus_timestamp_s: float | None = None
    max_gap_s: float = 0.0


@dataclass(slots=True)
class _Pending:
    """A request on the bus, waiting for every frame of its answer."""

    kind: HvRequest
    sent_s: float
    expected: frozenset[int]
    received: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Link:
    """Connection state: Normal once a full set arrived, until 0x351 is silent for the timeout."""

    connected: bool = False
    seen: set[int] = field(default_factory=set)
    last_limits_s: float | None = None
    gap_reported: bool = False


class SimulatedInverter:
    """Listens to one dialect, obeys the limits, records protocol violations of the BMS side."""

    def __init__(self, *, dialect: Dialect, heartbeat_timeout_s: float = 60.0,
                 profile: ChargeProfile | None = None, ignore_ids: tuple[int, ...] = (),
                 request_period_s: float = 1.0, answer_timeout_s: float = 1.0,
                 equipment_every: int = 10) -> None:
        """``request_period_s``, ``answer_timeout_s`` and ``equipment_every`` are read in a polled
        dialect only (Pylon HV): how often it asks, how long an answer may take, and every how many
        periods it also asks for the equipment information."""
        for name, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                            ("request_period_s", request_period_s), ("answer_timeout_s", answer_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")
        if equipment_every < 1:
            raise ValueError(f"equipment_every must be >= 1, got {equipment_every}")
        self.dialect = dialect
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.profile = profile or ChargeProfile()
        self.ids: tuple[int, ...] = DIALECT_IDS[dialect]
        self.extended = dialect in EXTENDED_ID_DIALECTS
        self.polled = dialect in POLLED_DIALECTS
        self.limits_id = DIALECT_LIMITS_ID[dialect]
        self.request_period_s = request_period_s
        self.answer_timeout_s = answer_timeout_s
        self.equipment_every = equipment_every
        self.requests_sent: dict[str, int] = {kind.name.lower(): 0 for kind in HvRequest}
        self.request_send_failures = 0
        self.answers = 0
        self.foreign_requests = 0  # 0x4200 heard from someone else
        # IDs a site tolerates beside the set (e.g. the controllers' failover heartbeat): counted only.
        self.ignore_ids = frozenset(ignore_ids)
        self.current_a = 0.0
        self.dropped_frames = 0
        self._decoder = FrameDecoder(dialect)
        self._reserved = RESERVED_MASKS[dialect]
        self._frames: list[ReceivedFrame] = []
        self._violations: list[Violation] = []
        self._stats: dict[int, _IdStats] = {}
        self._latest: dict[int, dict[str, float]] = {}
        self._limits: DecodedLimits | None = None
        self._link = _Link()
        self._beyond_since: float | None = None
        self._pending: list[_Pending] = []
        self._answer_latencies: list[float] = []
        self._started_at = 0.0
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None
        self._queue: asyncio.Queue[ReceivedFrame] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, interface: str, channel: str, **bus_kwargs: Any) -> None:
        """Open the bus and start listening and stepping on the running loop."""
        if self._bus is not None:
            raise InverterStartError(f"already running on {self._bus.channel_info}")
        loop = asyncio.get_running_loop()
        try:
            bus = can.Bus(interface=interface, channel=channel, **bus_kwargs)
        except (can.CanError, OSError, ValueError, ImportError) as exc:
            raise InverterStartError(f"cannot open CAN {interface}:{channel}: {exc}",
                                     interface=interface, channel=channel) from exc
        self._bus = bus
        self._queue = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._started_at = time.monotonic()
        self._notifier = can.Notifier(bus, [self._on_message], timeout=NOTIFIER_POLL_S, loop=loop)
        self._tasks = [
            asyncio.create_task(self._consume(self._queue), name=f"sim-inverter-rx-{channel}"),
            asyncio.create_task(self._run_steps(), name=f"sim-inverter-step-{channel}"),
        ]
        if self.polled:
            self._tasks.append(asyncio.create_task(self._run_requests(), name=f"sim-inverter-ask-{channel}"))

    async def stop(self) -> None:
        """Stop tasks, notifier and bus; safe to call more than once."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.stop(timeout=2 * NOTIFIER_POLL_S + 1.0)
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.shutdown()
        self._queue = None
        self.current_a = 0.0

    # -- observations ------------------------------------------------------------------------------

    @property
    def status(self) -> InverterStatus:
        """Normal after a full set, until no 0x351 came for ``heartbeat_timeout_s``."""
        link = self._link
        if link.connected and link.last_limits_s is not None and (
            time.monotonic() - link.last_limits_s <= self.heartbeat_timeout_s
        ):
            return InverterStatus.NORMAL
        return InverterStatus.DISCONNECTED

    @property
    def limits(self) -> DecodedLimits | None:
        """The latest limits, permissions and alarms received (kept while disconnected)."""
        return self._limits

    @property
    def frames(self) -> list[ReceivedFrame]:
        """Every frame received since start or :meth:`clear` (a copy)."""
        return list(self._frames)

    @property
    def violations(self) -> list[Violation]:
        return list(self._violations)

    def violation_kinds(self) -> dict[ViolationKind, int]:
        counts: dict[ViolationKind, int] = {}
        for violation in self._violations:
            counts[violation.kind] = counts.get(violation.kind, 0) + 1
        return counts

    @property
    def frame_counts(self) -> dict[int, int]:
        """Frames received per arbitration ID (all IDs, including foreign ones)."""
        return {frame_id: stats.count for frame_id, stats in sorted(self._stats.items())}

    def gaps(self, arbitration_id: int | None = None) -> float:
        """Longest interval in seconds between two consecutive frames of one ID; by default the
        dialect's limits frame (0x351, Pylon HV 0x4220), i.e. the longest gap between two sets. 0.0
        before the second frame."""
        stats = self._stats.get(self.limits_id if arbitration_id is None else arbitration_id)
        return 0.0 if stats is None else stats.max_gap_s

    @property
    def answer_latencies(self) -> list[float]:
        """Seconds from each answered request to the last frame of its answer (a copy)."""
        return list(self._answer_latencies)

    def latest(self, arbitration_id: int) -> dict[str, float] | None:
        """The last decoded values of one frame of the dialect, or None."""
        values = self._latest.get(arbitration_id)
        return None if values is None else dict(values)

    def clear(self) -> None:
        """Forget recorded frames, violations, counts and gaps (not the link or the limits)."""
        self._frames.clear()
        self._violations.clear()
        self._stats.clear()
        self._answer_latencies.clear()
        self.dropped_frames = 0

    # -- python-can edge ---------------------------------------------------------------------------

    def _on_message(self, message: can.Message) -> None:
        # Runs on the loop (Notifier(loop=...)); only converts and hands off.
        queue = self._queue
        if queue is None:
            return
        try:
            queue.put_nowait(ReceivedFrame.of(message))
        except asyncio.QueueFull:
            self.dropped_frames += 1

    async def _consume(self, queue: asyncio.Queue[ReceivedFrame]) -> None:
        while True:
            frame = await queue.get()
            try:
                self._handle(frame)
            except Exception:  # a bug here must not end the witness silently mid-test
                log.exception("sim inverter failed to handle frame %#x", frame.arbitration_id)

    async def _run_steps(self) -> None:
        next_at = time.monotonic()
        while True:
            self._step(time.monotonic())
            next_at += STEP_INTERVAL_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _run_requests(self) -> None:
        """Ask on absolute deadlines: the ensemble information every period, the equipment
        information every ``equipment_every`` periods."""
        next_at = time.monotonic()
        for index in itertools.count():
            if index % self.equipment_every == 0:
                self._ask(HvRequest.EQUIPMENT, HV_EQUIPMENT_IDS)
            self._ask(HvRequest.ENSEMBLE, self.ids)
            next_at += self.request_period_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _ask(self, kind: HvRequest, expected: tuple[int, ...]) -> None:
        bus = self._bus
        if bus is None:
            return
        sent_s = time.monotonic()
        try:
            bus.send(hv_request_frame(kind), timeout=REQUEST_SEND_TIMEOUT_S)
        except (can.CanError, OSError) as exc:
            self.request_send_failures += 1
            log.debug("sim inverter: request %s not sent: %s", kind.name, exc)
            return
        self.requests_sent[kind.name.lower()] += 1
        self._pending.append(_Pending(kind, sent_s, frozenset(expected)))

    def _note_answer(self, frame: ReceivedFrame) -> None:
        """A frame of an answer: complete the requests it belongs to (sent before it arrived)."""
        done = []
        for pending in self._pending:
            if frame.arbitration_id in pending.expected and frame.time_s >= pending.sent_s:
                pending.received.add(frame.arbitration_id)
                if pending.received >= pending.expected:
                    done.append(pending)
        for pending in done:
            self._pending.remove(pending)
            self.answers += 1
            self._answer_latencies.append(frame.time_s - pending.sent_s)

    def _expire_requests(self, now: float) -> None:
        late = [p for p in self._pending if now - p.sent_s > self.answer_timeout_s]
        for pending in late:
            self._pending.remove(pending)
            missing = sorted(pending.expected - pending.received)
            waited = now - pending.sent_s
            self._violate(now, ViolationKind.NO_ANSWER,
                          f"{pending.kind.name.lower()} request unanswered after {waited:.3f} s "
                          f"(missing {', '.join(f'{i:#x}' for i in missing)})")

    # -- frame checks ------------------------------------------------------------------------------

    def _violate(self, now: float, kind: ViolationKind, detail: str) -> None:
        self._violations.append(Violation(now, kind, detail))
        log.debug("sim inverter: %s: %s", kind.value, detail)

    def _handle(self, frame: ReceivedFrame) -> None:
        now, frame_id = frame.time_s, frame.arbitration_id
        self._frames.append(frame)
        self._count(frame)
        if frame_id in self.ignore_ids and not frame.is_extended_id:
            return
        if frame.is_extended_id and not self.extended:
            # Venus OS and Deye ignore 29-bit frames (§0): they are not part of the set.
            self._violate(now, ViolationKind.EXTENDED_ID, f"{frame_id:#010x} sent with a 29-bit ID")
            return
        if self.extended and not frame.is_extended_id:
            # Pylon HV inverters read 29-bit frames only: an 11-bit one is not part of the set.
            self._violate(now, ViolationKind.STANDARD_ID, f"{frame_id:#05x} sent with an 11-bit ID")
            return
        if frame.is_remote_frame or frame.is_error_frame or frame.is_fd:
            self._violate(now, ViolationKind.BAD_FRAME_TYPE, f"{frame_id:#05x}: remote, error or FD frame")
            return
        if self.polled and frame_id == ID_HV_REQUEST:
            self.foreign_requests += 1  # another inverter (or tool) asking: not the battery's doing
            return
        if not self._decoder.knows(frame_id):
            self._violate(now, ViolationKind.UNEXPECTED_ID,
                          f"{frame_id:#05x} is not in the {self.dialect.value} set")
            return
        if frame.dlc != FRAME_DLC or len(frame.data) != FRAME_DLC:
            self._violate(now, ViolationKind.DLC_MISMATCH, f"{frame_id:#05x}: DLC {frame.dlc}, expected 8")
        self._check_reserved(frame)
        try:
            values = self._decoder.decode(frame_id, frame.data)
        except FrameDecodeError as exc:
            self._violate(now, ViolationKind.DECODE_ERROR, str(exc))
            return
        self._latest[frame_id] = values
        if self.polled:
            self._note_answer(frame)
            if frame_id in HV_EQUIPMENT_IDS:
                return  # configuration, not limits: the link and the limits are not its business
        if frame_id == self.limits_id:
            self._on_limits(now, values)
        elif frame_id == ID_REQUEST and self.dialect is Dialect.PYLON:
            self._check_enables(now, values)
        elif frame_id == ID_ALARMS:
            self._check_pairs(now, values)
        elif frame_id == ID_HV_STATUS and values.get("BasicStatus", 0) > HV_STATUS_MAX:
            self._violate(now, ViolationKind.RESERVED_BITS, f"{frame_id:#x}: basic status "
                          f"{values['BasicStatus']:g} is reserved")
        elif frame_id == ID_HV_FORBIDDEN:
            self._check_marks(now, values)
        self._limits = decoded_limits(self.dialect, self._latest)
        self._note_beyond(now)
        link = self._link
        link.seen.add(frame_id)
        if not link.connected and link.seen.issuperset(self.ids) and link.last_limits_s is not None:
            link.connected = True
            link.gap_reported = False

    def _count(self, frame: ReceivedFrame) -> None:
        stats = self._stats.setdefault(frame.arbitration_id, _IdStats())
        stats.count += 1
        if stats.last_time_s is not None:
            stats.max_gap_s = max(stats.max_gap_s, frame.time_s - stats.last_time_s)
        if self.dialect is Dialect.SMA and stats.last_bus_timestamp_s is not None:
            spacing = frame.bus_timestamp_s - stats.last_bus_timestamp_s
            if spacing < SMA_INHIBIT_S:
                self._violate(frame.time_s, ViolationKind.INHIBIT_TIME,
                              f"{frame.arbitration_id:#05x} again after {spacing * 1000:.1f} ms (< 200 ms)")
        stats.last_time_s = frame.time_s
        stats.last_bus_timestamp_s = frame.bus_timestamp_s

    def _check_reserved(self, frame: ReceivedFrame) -> None:
        mask = self._reserved.get(frame.arbitration_id)
        if mask is None:
            return
        stray = bytes(b & m for b, m in zip(frame.data, mask, strict=False))
        if any(stray):
            self._violate(frame.time_s, ViolationKind.RESERVED_BITS,
                          f"{frame.arbitration_id:#05x}: reserved bits set {stray.hex(' ')}")

    def _on_limits(self, now: float, values: Mapping[str, float]) -> None:
        # A short frame (already a DLC violation) decodes only the fields it carries: read as 0.
        cvl, ccl = values.get("ChargeVoltageLimit", 0.0), values.get("ChargeCurrentLimit", 0.0)
        dcl, dvl = values.get("DischargeCurrentLimit", 0.0), values.get("DischargeVoltageLimit", 0.0)
        if self.dialect is Dialect.PYLON_HV:
            dcl = -dcl  # sent negative: a positive one is a wrong sign
        if ccl < 0 or dcl < 0:
            self._violate(now, ViolationKind.NEGATIVE_LIMIT, f"CCL {ccl} A, DCL {dcl} A")
        if cvl == 0:
            self._violate(now, ViolationKind.ZERO_CVL, "CVL 0 V")
        elif dvl >= cvl:
            self._violate(now, ViolationKind.DVL_NOT_BELOW_CVL, f"DVL {dvl} V >= CVL {cvl} V")
        link = self._link
        if link.last_limits_s is not None:
            gap = now - link.last_limits_s
            if gap > self.heartbeat_timeout_s and not link.gap_reported:
                self._violate(now, ViolationKind.HEARTBEAT_GAP,
                              f"{self.limits_id:#x} after {gap:.3f} s of silence")
        link.last_limits_s = now
        link.gap_reported = False

    def _check_enables(self, now: float, request: Mapping[str, float]) -> None:
        # 0x35C follows 0x351 and 0x359 in a set: compare with the latest of those (same snapshot, §5.12).
        limits = self._latest.get(ID_LIMITS)
        if limits is not None:
            for direction, enable, limit in (("charge", "ChargeEnable", "ChargeCurrentLimit"),
                                             ("discharge", "DischargeEnable", "DischargeCurrentLimit")):
                enabled, amps = bool(request.get(enable, 0)), limits.get(limit, 0.0)
                if enabled and amps <= 0:
                    self._violate(now, ViolationKind.ENABLE_WITH_ZERO_LIMIT,
                                  f"{direction} enabled with limit {amps} A")
                elif not enabled and amps > 0:
                    self._violate(now, ViolationKind.LIMIT_WITHOUT_ENABLE,
                                  f"{direction} disabled with limit {amps} A")
        protection = self._latest.get(ID_PROTECTION, {})
        raised = [name for name, value in protection.items() if value and name in WIRE_ALARM_BLOCKS]
        self._check_blocks(now, raised, charge_enabled=bool(request.get("ChargeEnable", 0)),
                           discharge_enabled=bool(request.get("DischargeEnable", 0)))

    def _check_marks(self, now: float, marks: Mapping[str, float]) -> None:
        """Pylon HV 0x4280 (it follows 0x4220 and 0x4250 in an answer): each mark 0x00 or 0xAA, a mark
        that agrees with its limit, and no protection bit next to a permission."""
        for name, value in marks.items():
            if value not in (HV_ALLOWED, HV_FORBIDDEN):
                self._violate(now, ViolationKind.INVALID_MARK, f"{name} = {value:#04x}, not 0x00 or 0xAA")
        limits = self._latest.get(ID_HV_LIMITS)
        charge_enabled = marks.get("ChargeForbiddenMark") == HV_ALLOWED
        discharge_enabled = marks.get("DischargeForbiddenMark") == HV_ALLOWED
        if limits is not None:
            for direction, enabled, amps in (
                ("charge", charge_enabled, limits.get("ChargeCurrentLimit", 0.0)),
                ("discharge", discharge_enabled, -limits.get("DischargeCurrentLimit", 0.0)),
            ):
                if enabled and amps <= 0:
                    self._violate(now, ViolationKind.ENABLE_WITH_ZERO_LIMIT,
                                  f"{direction} allowed (mark 0x00) with limit {amps} A")
                elif not enabled and amps > 0:
                    self._violate(now, ViolationKind.LIMIT_WITHOUT_ENABLE,
                                  f"{direction} forbidden (mark 0xAA) with limit {amps} A")
        status = self._latest.get(ID_HV_STATUS, {})
        raised = [name for name, value in status.items() if value and name in WIRE_ALARM_BLOCKS]
        self._check_blocks(now, raised, charge_enabled=charge_enabled, discharge_enabled=discharge_enabled)

    def _check_pairs(self, now: float, pairs: Mapping[str, float]) -> None:
        invalid = [name for name, value in pairs.items() if value == Pair.INVALID]
        if invalid:
            self._violate(now, ViolationKind.INVALID_ALARM_PAIR, f"pairs = 0b11: {', '.join(invalid)}")
        limits = self._latest.get(ID_LIMITS)
        if limits is None:
            return
        raised = [name for name, value in pairs.items() if value == Pair.RAISED and name in WIRE_ALARM_BLOCKS]
        self._check_blocks(now, raised, charge_enabled=limits.get("ChargeCurrentLimit", 0.0) > 0,
                           discharge_enabled=limits.get("DischargeCurrentLimit", 0.0) > 0)

    def _check_blocks(self, now: float, raised: Sequence[str], *, charge_enabled: bool,
                      discharge_enabled: bool) -> None:
        for name in raised:
            if not WIRE_ALARM_BLOCKS[name].satisfied(charge_enabled=charge_enabled,
                                                     discharge_enabled=discharge_enabled):
                self._violate(now, ViolationKind.ALARM_WITH_PERMISSION,
                              f"{name} raised while charge={charge_enabled} discharge={discharge_enabled}")

    # -- control -----------------------------------------------------------------------------------

    def _allowed_range(self) -> tuple[float, float]:
        """(most negative, most positive) current the newest limits allow."""
        limits = self._limits
        if limits is None or self.status is not InverterStatus.NORMAL:
            return 0.0, 0.0
        charge = max(0.0, limits.charge_current_limit_a) if limits.charge_enabled else 0.0
        discharge = max(0.0, limits.discharge_current_limit_a) if limits.discharge_enabled else 0.0
        return -discharge, charge

    def _note_beyond(self, now: float) -> None:
        low, high = self._allowed_range()
        if not low <= self.current_a <= high:
            if self._beyond_since is None:
                self._beyond_since = now
        else:
            self._beyond_since = None

    def _step(self, now: float) -> None:
        self._expire_requests(now)
        link = self._link
        if link.connected and link.last_limits_s is not None:
            silence = now - link.last_limits_s
            if silence > self.heartbeat_timeout_s:
                link.connected = False
                link.seen.clear()  # after a loss, only a complete set reconnects
                if not link.gap_reported:
                    link.gap_reported = True
                    self._violate(now, ViolationKind.HEARTBEAT_GAP,
                                  f"no {self.limits_id:#x} for {silence:.3f} s")
        if self._beyond_since is not None and now - self._beyond_since > CURRENT_LIMIT_GRACE_S:
            low, high = self._allowed_range()
            self._violate(now, ViolationKind.CURRENT_BEYOND_LIMIT,
                          f"{self.current_a:.1f} A outside [{low:.1f}, {high:.1f}] A for "
                          f"{now - self._beyond_since:.3f} s")
        low, high = self._allowed_range()
        requested = self.profile.requested_a(now - self._started_at)
        self.current_a = min(max(requested, low), high)
        self._note_beyond(now)
