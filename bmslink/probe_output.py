"""How ``bmslink probe`` shows its report: rich tables for a person, JSON for a program."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bmslink.probe import Dump, ProbeReport, Row, SunSpecModel

# Raw words shown per row (JSON keeps them all): a reduce over 32 cells, a 16-register string.
RAW_SHOWN_WORDS = 8
SUNSPEC_RAW_SHOWN_WORDS = 4
# Redirected output is not wrapped at 80 columns, so that every row stays one greppable line.
PIPE_WIDTH = 220


def _console() -> Console:
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(width=PIPE_WIDTH, highlight=False)


def format_value(row: Row) -> str:
    """The decoded value with its unit, as the table shows it."""
    value = row.value
    if row.error is not None:
        return f"— ({row.error})"
    if isinstance(value, bool):
        text = "SET" if value else "clear"
    elif isinstance(value, float):
        text = f"{round(value, 6):g}"
    elif isinstance(value, list):
        text = ", ".join(value) if value else "none"
    elif value is None:
        text = "—"
    else:
        text = str(value)
    return f"{text} {row.unit}".strip()


BIT_TABLES = ("coil", "discrete")


def format_raw(row: Row, limit: int | None = None) -> str:
    """The raw words in hex; coils and discrete inputs as their bits, the first coil first."""
    words = row.raw if limit is None else row.raw[:limit]
    bits = bool(row.addresses) and all(table in BIT_TABLES for table, _ in row.addresses)
    text = ("bits " + "".join(str(w) for w in words)) if bits else " ".join(f"0x{w:04X}" for w in words)
    return text + (" …" if limit is not None and len(row.raw) > limit else "")


def _points_table(title: str, rows: list[Row], *, raw_limit: int | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("point")
    table.add_column("value")
    table.add_column("registers")
    table.add_column("raw")
    for row in rows:
        style = "red" if row.error is not None and row.error != "not implemented" else None
        if row.kind in ("alarm", "warning") and row.value is True:
            style = "bold yellow"
        name = row.name if row.kind not in ("alarm", "warning") else f"{row.kind}s.{row.name}"
        table.add_row(name, Text(format_value(row), style=style or ""), ", ".join(row.registers),
                      format_raw(row, raw_limit))
    return table


def _dump_table(dump: Dump) -> Table:
    table = Table(title=f"registers {dump.table} {dump.address}+{dump.count} ({dump.spec})",
                  title_justify="left")
    bits = dump.table in BIT_TABLES
    columns = ["address", "hex address", "value"] + ([] if bits else ["hex", "signed"])
    for column in columns:
        table.add_column(column, justify="right")
    for i, value in enumerate(dump.values):
        address = dump.address + i
        if bits:
            table.add_row(str(address), f"0x{address:04X}", str(value))
            continue
        signed = value - 0x10000 if value & 0x8000 else value
        table.add_row(str(address), f"0x{address:04X}", str(value), f"0x{value:04X}", str(signed))
    return table


def _model_table(model: SunSpecModel) -> Table | Text:
    title = f"model {model.model_id} ({model.name}) at {model.address}, L={model.length}"
    if model.instance:
        title += f", instance {model.instance}"
    if not model.rows:
        return Text(f"{title}: {model.error}", style="red")
    return _points_table(title, model.rows, raw_limit=SUNSPEC_RAW_SHOWN_WORDS)


def print_report(report: ProbeReport) -> None:
    """The report as tables on stdout."""
    console = _console()
    target = report.target
    where = f"{target['link']} {target['address']}"
    if "device_id" in target:
        where += f" device {target['device_id']}"
    if "line" in target:
        where += f" ({target['line']})"
    console.print(f"bmslink probe: unit {target['unit']} on {where} — from {target['source']}")
    for note in report.notes:
        console.print(f"note: {note}")
    if report.points:
        reads = ", ".join(f"{b['table']} {b['address']}+{b['count']}" for b in report.blocks)
        title = f"profile {report.profile} (reads: {reads})" if report.profile else "reading"
        console.print(_points_table(title, report.points, raw_limit=RAW_SHOWN_WORDS))
    if report.reading is not None:
        if report.reading.accepted:
            m = report.reading.measurements or {}
            console.print(
                f"reading: accepted, as the agent would publish it (current + = charging): "
                f"current_a {m.get('current_a', 0):+g} A, pack_voltage_v {m.get('pack_voltage_v')} V, "
                f"soc_pct {m.get('soc_pct')} %, CCL {m.get('charge_current_limit_a')} A, "
                f"DCL {m.get('discharge_current_limit_a')} A"
            )
        else:
            console.print(Text(f"reading: REFUSED by the agent's checks ({report.reading.status}): "
                               f"{report.reading.detail}", style="bold red"))
    if report.sunspec_base is not None:
        ids = ", ".join(str(m.model_id) for m in report.sunspec_models)
        console.print(f"SunSpec: SunS marker at {report.sunspec_base}; models {ids}")
        for model in report.sunspec_models:
            console.print(_model_table(model))
    for dump in report.dumps:
        console.print(_dump_table(dump))
    if report.error is not None:
        e = report.error
        code = f" (code {e.code:#04x})" if e.code is not None else ""
        console.print(Text(f"error: {e.label}{code} [{e.status}]: {e.detail}", style="bold red"))
        if e.advice:
            console.print(f"what to check: {e.advice}")


def print_json(report: ProbeReport) -> None:
    print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
