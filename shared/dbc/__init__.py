"""The DBC files of the CAN frame sets (shipped as package data)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import cantools
from cantools.database.can import Database


@cache
def load_dbc(name: str) -> Database:
    """Load a shipped DBC by name (``pylon``); cached: databases are immutable once loaded."""
    text = (resources.files("shared.dbc") / f"{name}.dbc").read_text(encoding="utf-8")
    db = cantools.database.load_string(text, database_format="dbc")
    assert isinstance(db, Database)
    return db
