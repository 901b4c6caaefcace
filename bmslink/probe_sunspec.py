"""Every point of one SunSpec model, decoded for ``bmslink probe --sunspec``.

pysunspec2 (1.3) decodes a model from its registers: ``sunspec2.device.Model(model_id, address, L,
data=bytes)`` lays out the fixed part and the repeating groups from the shipped JSON definitions, marks
"not implemented" values as None, and ``Point.cvalue`` applies the scale factor. Its Modbus client is
blocking, so the registers come from the agent's own link; only the definitions and the decoding are
pysunspec2's. Enumerations and bitfields are shown by their symbol names as well.
"""

from __future__ import annotations

from typing import Any

from bmslink.probe import Row

_BITFIELDS = ("bitfield16", "bitfield32")
_ENUMS = ("enum16", "enum32")


def _symbols(pdef: dict[str, Any], value: object) -> str:
    symbols = {int(s["value"]): str(s["name"]) for s in pdef.get("symbols", ()) if "value" in s}
    if not symbols or not isinstance(value, int):
        return ""
    if pdef.get("type") in _ENUMS:
        return symbols.get(value, "")
    if pdef.get("type") in _BITFIELDS:
        return " ".join(name for bit, name in sorted(symbols.items()) if value >> bit & 1)
    return ""


def _rows_of(group: Any, address: int, words: list[int], prefix: str) -> list[Row]:
    rows: list[Row] = []
    for name, point in group.points.items():
        pdef: dict[str, Any] = point.pdef
        offset, size = int(point.offset), int(point.len)
        row = Row(f"{prefix}{name}", "sunspec", None, str(pdef.get("units", "") or ""),
                  [f"holding:{address + offset} (0x{address + offset:04X})"], words[offset:offset + size],
                  addresses=[("holding", a) for a in range(address + offset, address + offset + size)])
        try:
            value = point.cvalue
        except Exception as exc:  # pysunspec2 raises its ModelError or plain errors for bad data
            row.error = f"cannot decode: {exc}"
        else:
            if value is None:
                row.error = "not implemented"
            else:
                row.value = value if isinstance(value, int | float | str) else str(value)
                symbol = _symbols(pdef, point.value)
                if symbol:
                    row.unit = f"{row.unit} {symbol}".strip()
        rows.append(row)
    for gname, sub in group.groups.items():
        if isinstance(sub, list):
            for i, g in enumerate(sub):
                rows += _rows_of(g, address, words, f"{prefix}{gname}[{i}].")
        else:
            rows += _rows_of(sub, address, words, f"{prefix}{gname}.")
    return rows


def model_rows(
    model_id: int, address: int, length: int, words: list[int]
) -> tuple[str, list[Row], str | None]:
    """(model name, one row per point, what pysunspec2 found wrong) of the model at ``address``.

    ``words`` are the model's registers from its ID register on (``length`` + 2 of them).
    """
    from sunspec2 import device  # noqa: PLC0415 - heavy import, only for --sunspec

    data = b"".join((w & 0xFFFF).to_bytes(2, "big") for w in words)
    try:
        model = device.Model(model_id, address, length, data=data)
    except Exception as exc:  # an id pysunspec2 has no definition for, or data it cannot lay out
        return f"model {model_id}", [], f"cannot decode model {model_id}: {exc}"
    name = str(model.gname or f"model {model_id}")
    error = str(model.error_info).strip() or None
    if model.gdef is None:
        return name, [], error or f"no definition of model {model_id} (a vendor model?)"
    return name, _rows_of(model, address, words, ""), error
