"""A unit the agent reports as ``invalid_data`` makes the rack ``invalid``, not ``comm_lost`` (issue 12).

The agent refuses a reading whose fields contradict each other and says so in the unit's status,
with the link up (``comm_state`` ok, limits zeroed). The controller shows such a rack as invalid and
keeps it out of the bank like any lost rack; ``comm_lost`` stays for a BMS the agent cannot hear.
"""

from __future__ import annotations

import pytest

from controller.core.classify import read_rack
from controller.core.snapshot import RackInput
from shared.cluster import RackState
from shared.controller_config import RosterRack
from shared.models import LinkStatus, RackCommState, RackMeasurements, RackTelemetry, UnitLink
from shared.records import TelemetryRecord, record_of
from tests.controller.core.builders import SITE, Cycle, config, run_table, telemetry

MEASUREMENTS = RackMeasurements(
    pack_voltage_v=52.0, current_a=0.0, soc_pct=50.0, soh_pct=100.0,
    cell_voltage_max_v=3.30, cell_voltage_min_v=3.25, temperature_max_c=25.0, temperature_min_c=20.0,
    # Zero: the agent grants nothing from a rack whose newest reading it refused.
    charge_current_limit_a=0.0, discharge_current_limit_a=0.0,
    charge_voltage_limit_v=56.0, discharge_voltage_limit_v=44.0, capacity_ah=100.0,
)


def reported(
    rack_id: str, *statuses: LinkStatus, comm_lost: bool = False, heard: bool = True, detail: str = ""
) -> TelemetryRecord:
    """Telemetry of a rack whose units' last polls ended in ``statuses`` (units u1, u2, ...)."""
    return record_of(RackTelemetry(
        site_id=SITE,
        rack_id=rack_id,
        stream_id="5eed0000000000bb",
        seq=1,
        timestamp_s=1_700_000_000.0,
        poll_interval_ms=1000,
        comm_state=RackCommState.COMM_LOST if comm_lost else RackCommState.OK,
        measurements=MEASUREMENTS if heard else None,
        units=tuple(
            UnitLink(unit=f"u{i}", status=s, consecutive_failures=int(s is not LinkStatus.OK),
                     detail=detail if s is LinkStatus.INVALID_DATA else "")
            for i, s in enumerate(statuses, start=1)
        ),
    ))


def _read(t: TelemetryRecord) -> tuple[RackState | None, str]:
    reading = read_rack(RackInput(t.rack_id, telemetry=t, received_s=10.0),
                        RosterRack(rack_id=t.rack_id, capacity_ah=100.0), SITE, 10.0)
    return reading.link_state, reading.reason


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (reported("r1", LinkStatus.INVALID_DATA),
         (RackState.INVALID, "invalid: the agent refuses the data of unit u1")),
        (reported("r1", LinkStatus.OK, LinkStatus.INVALID_DATA),
         (RackState.INVALID, "invalid: the agent refuses the data of unit u2")),
        (reported("r1", LinkStatus.INVALID_DATA, LinkStatus.INVALID_DATA),
         (RackState.INVALID, "invalid: the agent refuses the data of unit u1; unit u2")),
        (reported("r1", LinkStatus.INVALID_DATA, detail="cell_voltage_min_v 3.400 V above 3.300 V"),
         (RackState.INVALID, "invalid: the agent refuses the data of unit u1: cell_voltage_min_v 3.400 V "
                             "above 3.300 V")),
        # Invalid ranks above comm_lost: a unit never read, or a comm-lost one beside it.
        (reported("r1", LinkStatus.INVALID_DATA, comm_lost=True, heard=False),
         (RackState.INVALID, "invalid: the agent refuses the data of unit u1")),
        (reported("r1", LinkStatus.TIMEOUT, LinkStatus.INVALID_DATA, comm_lost=True),
         (RackState.INVALID, "invalid: the agent refuses the data of unit u2")),
        # A BMS the agent cannot hear is still comm_lost; a failed poll short of comm loss is not news.
        (reported("r1", LinkStatus.TIMEOUT, comm_lost=True),
         (RackState.COMM_LOST, "comm_lost: the agent reports the BMS link lost")),
        (reported("r1", LinkStatus.CRC_ERROR), (None, "")),
        (reported("r1", LinkStatus.OK), (None, "")),
    ],
    ids=["one", "second-of-two", "both", "with-why", "never-read", "beside-comm-lost", "comm-lost", "crc",
         "ok"],
)
def test_agent_reported_invalid_data(t: TelemetryRecord, expected: tuple[RackState | None, str]) -> None:
    assert _read(t) == expected


def test_invalid_rack_is_out_of_the_bank_and_back_when_valid() -> None:
    refused = reported("r3", LinkStatus.INVALID_DATA)
    run_table(
        config(3),
        [
            Cycle(0, {"r1": telemetry("r1"), "r2": telemetry("r2"), "r3": telemetry("r3")},
                  states="ok ok ok", eligible=3),
            Cycle(1, {"r1": telemetry("r1"), "r2": telemetry("r2"), "r3": refused},
                  states="ok ok invalid", eligible=2, ccl=200.0),
            Cycle(2, {"r1": telemetry("r1"), "r2": telemetry("r2"), "r3": telemetry("r3", seq=2)},
                  states="ok ok ok", eligible=3, ccl=300.0),
        ],
    )
