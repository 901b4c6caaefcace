"""Known-good contract objects for tests, and a strategy for anything msgpack can carry."""

from __future__ import annotations

from hypothesis import strategies as st

from shared.models import (
    ContactorState,
    LinkStatus,
    ProtectionFlags,
    RackCommState,
    RackMeasurements,
    RackTelemetry,
    UnitLink,
)


def measurements(**overrides: object) -> RackMeasurements:
    values: dict[str, object] = {
        "pack_voltage_v": 52.8,
        "current_a": 12.5,
        "soc_pct": 64.0,
        "soh_pct": 98.0,
        "cell_voltage_max_v": 3.31,
        "cell_voltage_max_location": "cell 4",
        "cell_voltage_min_v": 3.29,
        "cell_voltage_min_location": "cell 9",
        "temperature_max_c": 27.5,
        "temperature_min_c": 24.0,
        "charge_current_limit_a": 140.0,
        "discharge_current_limit_a": 200.0,
        "charge_voltage_limit_v": 55.2,
        "discharge_voltage_limit_v": 46.4,
        "alarms": ProtectionFlags(),
        "warnings": ProtectionFlags(cell_imbalance=True),
        "contactor": ContactorState.CLOSED,
        "capacity_ah": 280.0,
    }
    values.update(overrides)
    return RackMeasurements.model_validate(values)


def telemetry(**overrides: object) -> RackTelemetry:
    values: dict[str, object] = {
        "site_id": "site-a",
        "rack_id": "rack-01",
        "stream_id": "5eed0000000000aa",
        "seq": 7,
        "timestamp_s": 1_790_000_000.25,
        "poll_interval_ms": 500,
        "comm_state": RackCommState.OK,
        "measurements": measurements(),
        "units": (UnitLink(unit="bms", status=LinkStatus.OK),),
    }
    values.update(overrides)
    return RackTelemetry.model_validate(values)


def msgpack_values(
    *, text: int = 20, binary: int = 20, width: int = 5, leaves: int = 30
) -> st.SearchStrategy[object]:
    """Any value msgpack can carry (nil, bool, ints of every width, floats with NaN and ±inf, str,
    bin, arrays, maps), nested: what a broken or hostile publisher may put in a field."""
    leaf = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats()
        | st.text(max_size=text)
        | st.binary(max_size=binary)
    )
    return st.recursive(
        leaf,
        lambda kids: (
            st.lists(kids, max_size=width) | st.dictionaries(st.text(max_size=10), kids, max_size=width)
        ),
        max_leaves=leaves,
    )
