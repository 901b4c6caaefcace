"""Typed poll errors. Each one carries the facts operators need, and says if it is transient.

Log lines produced from these carry the words operators grep for:
``Timeout`` and ``CRC Error``.
"""

from __future__ import annotations

from shared.models import LinkStatus


class PollError(Exception):
    """A poll of one BMS unit failed. ``status`` is the class reported on the wire."""

    status: LinkStatus = LinkStatus.INVALID_DATA
    transient: bool = True
    # Whether the failure says something about the link: only these count towards comm loss (and so
    # towards a reconnect). A complete answer with refused content proves the link works.
    link_failure: bool = True
    label: str = "Error"

    def __init__(self, detail: str, *, unit: str | None = None, code: int | None = None) -> None:
        self.detail = detail
        self.unit = unit
        self.code = code
        super().__init__(detail)

    def for_unit(self, unit: str) -> PollError:
        self.unit = unit
        return self

    def __str__(self) -> str:
        who = f"unit {self.unit}: " if self.unit else ""
        return f"{who}{self.label}: {self.detail}"


class PollTimeoutError(PollError, TimeoutError):
    """No answer at all within the deadline."""

    status = LinkStatus.TIMEOUT
    label = "Timeout"


class CrcError(PollError):
    """Bytes arrived but never formed a valid frame (bad CRC or framing)."""

    status = LinkStatus.CRC_ERROR
    label = "CRC Error"


class ModbusExceptionError(PollError):
    """The device answered with a Modbus exception response; ``code`` is its exception code."""

    status = LinkStatus.MODBUS_EXCEPTION
    label = "Modbus Exception"


class ConnectionRefusedPollError(PollError):
    """The link could not be opened (TCP refused/closed, serial port missing)."""

    status = LinkStatus.CONNECTION_REFUSED
    label = "Connection Refused"


class InvalidDataError(PollError):
    """The device answered, but what it said is not usable telemetry."""

    status = LinkStatus.INVALID_DATA
    label = "Invalid Data"


class ImplausibleReadingError(InvalidDataError):
    """The device answered in full, but its values are physically impossible (outside the contract's
    bounds) or contradict each other (rack_agent/plausibility.py).

    Not a link failure: the unit is reported invalid with this reason until a plausible reading
    arrives, its link is kept (a new connection would read the same values), and it never becomes
    comm-lost because of it.
    """

    link_failure = False


class DeviceLayoutError(InvalidDataError):
    """The device's register layout does not fit the profile: no SunSpec marker, a model chain without
    an end, a model the profile needs missing or shorter than its points.

    Not transient: it lasts until the device (or its firmware, or the profile) changes, so discovery
    is retried on a bounded backoff instead of at every poll.
    """

    transient = False


class ProfileError(Exception):
    """A profile file cannot be used; permanent until fixed (a device that does not fit a good
    profile is a :class:`DeviceLayoutError` instead)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid profile {source}:\n{lines}")
