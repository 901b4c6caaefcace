"""The controller's event counters, one table shared by the parts that count them.

The control loop counts cycles and sets, the MQTT ingest messages, the failover link heartbeat
frames; the metrics endpoint reads it when scraped (``bmslink_controller_cycles_total``,
``..._frame_sets_sent_total{trigger}``, ..., ``..._errors_total{kind}``: controller/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ControllerStats:
    cycles: int = 0
    sets_sent: int = 0
    urgent_sets: int = 0
    heartbeat_sets: int = 0
    messages: int = 0
    cycle_errors: int = 0
    failsafe_errors: int = 0  # cycles whose fail-safe set could not be made or sent either
    sends_refused: int = 0  # frames the role machine did not let out (standby, fenced)
    heartbeats_sent: int = 0
    heartbeats_skipped: int = 0  # heartbeat deadlines passed over because a set was more than a period late
    resumed_sets: int = 0  # sets sent at once because the CAN bus was (re)opened
