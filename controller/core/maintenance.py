"""Maintenance mode: a rack an operator has taken out of the bank for service.

An operator's accepted command (``bmslink cmd maintenance on RACK``) puts a rack in maintenance; only
another accepted command (``... off RACK``) takes it out. The controller cannot open a rack's
contactor: the BMS and the technician do. So maintenance changes what the rack is *granted*, never
what it *constrains*:

- **It adds no capacity and does not count toward ``min_racks``.** Its admission is that of a rack
  in its re-admission hold, indefinitely (share 0, not eligible). If the racks left are fewer than
  ``min_racks``, the bank gets zero current: a quorum means racks carrying current, and a rack under
  service is not one.
- **While it may be in parallel, its limits still bind.** A rack in maintenance that is ``ok``
  (contactor closed, or unknown: counted as closed) constrains the bank as any rack in its hold does:
  its current limits, the zero-limit rule, its voltage ceiling and floor. A rack in maintenance that
  is lost from sight is held at its last limits until isolation, as any other (``isolation``).
- **Once it is known out of the bank, it is left alone.** A rack in maintenance whose current
  telemetry reports its contactor open cannot take current, and a technician working on it will raise
  alarms: its alarms then neither latch nor reach the inverter, its readings do not enter the bank's
  SOC, voltage or temperatures, and the latches it already held are *suspended* (kept, not
  released: they bind again the moment it closes its contactor or leaves maintenance, until an
  operator's clear releases them). This is what lets a site run on the other racks while one is
  serviced.
- **Leaving maintenance is a return like any other:** the rack goes through the re-admission hold
  and ramp from the first ``ok`` cycle after the command (its ``ok_since_s`` is not kept while in
  maintenance).

The set of racks in maintenance is an input of the cycle (``Snapshot.maintenance``), like the clear
commands: the controller persists it and shares it with the standbys (``controller/maintenance.py``),
so neither a restart nor a takeover returns a rack to the bank.
"""

from __future__ import annotations

from controller.core.admission import Admission
from shared.models import ContactorState
from shared.records import MeasurementsRecord

MAINTENANCE_NOTE = "in maintenance: adds no capacity; its limits bind while it may be in parallel"
NOT_ADMITTED = Admission(None, eligible=False, share=0.0, note=MAINTENANCE_NOTE)


def known_out(in_maintenance: bool, measurements: MeasurementsRecord | None) -> bool:
    """Whether a rack is in maintenance and its current telemetry says its contactor is open: then it
    is left alone (see the module docstring)."""
    return in_maintenance and measurements is not None and measurements.contactor is ContactorState.OPEN
