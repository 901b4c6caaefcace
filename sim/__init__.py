"""Simulated rack BMS units for tests, demos and commissioning rehearsals.

* :mod:`sim.battery` — pure, deterministic LFP rack + BMS model (``step(dt_s)``, no clock).
* :mod:`sim.faults` — injectable battery and link faults (:class:`sim.faults.FaultState`).
* :mod:`sim.registers` — flat (``acme_flat``) and SunSpec 1/802/803 register images.
* :mod:`sim.can_frames` — the Pylon CAN frame set, encoded from ``shared/dbc/pylon.dbc``.
* :mod:`sim.bms_server` — :class:`sim.bms_server.SimulatedBms`: the model on Modbus TCP/RTU and CAN.
* :mod:`sim.scenario` — timed fault/load events from TOML; :mod:`sim.cli` — ``bmslink sim bms``.
"""
