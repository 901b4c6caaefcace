"""The DBC files of the CAN frame sets (shipped as package data)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import cantools
from cantools.database.can import Database
from cantools.typechecking import DecodeResultType


@cache
def load_dbc(name: str) -> Database:
    """Load a shipped DBC by name (``pylon``); cached: databases are immutable once loaded."""
    text = (resources.files("shared.dbc") / f"{name}.dbc").read_text(encoding="utf-8")
    db = cantools.database.load_string(text, database_format="dbc")
    assert isinstance(db, Database)
    return db


class SignalDecodeError(ValueError):
    """A frame decoded to something other than plain numeric signals.

    A ``ValueError``, like the other bad-data errors our decoders already catch.
    """


def numeric_signals(decoded: DecodeResultType) -> dict[str, float]:
    """The signal values of a plain frame as numbers.

    cantools types a decode as "signal dict or container list" with values "number, string or
    named choice"; decoded with containers and choices off (our DBCs define no containers), only
    numbers occur. The values are returned as decoded (ints stay ints); anything else raises
    :class:`SignalDecodeError`.
    """
    if not isinstance(decoded, dict):
        raise SignalDecodeError("decoded as a container message")
    values: dict[str, float] = {}
    for name, value in decoded.items():
        if not isinstance(value, int | float):
            raise SignalDecodeError(f"signal {name} decoded to {value!r}")
        values[name] = value
    return values
