"""The controller reaction benchmark (entry point: ``bench/controller_reaction.py``), in its parts.

* :mod:`bench.reaction.wire` — what the racks put on the wire: a real ``RackTelemetry`` payload with
  ``seq`` and the charge limit patchable in place, and raw MQTT 3.1.1 CONNECT/PUBLISH packets.
* :mod:`bench.reaction.peers` — the helper processes: the low-CPU raw-socket publisher and the bare
  floor (a plain paho subscriber that sends one 0x351 per lowering), each commanded by lines on stdin.
* :mod:`bench.reaction.rig` — broker, CAN bridge, recorder of 0x351 frames, broker drop counter and
  the children of a phase (on the shared harness, ``bmslink.processes``); the lowering ladder and one
  timed lowering (:func:`~bench.reaction.rig.react`).
* :mod:`bench.reaction.reaction` — reaction latency and CPU share, floor and controller, per roster.
* :mod:`bench.reaction.rates` — the sustained-rate sweep.
* :mod:`bench.reaction.step_cost` — the core (engine, and the reference step beside it) timed in-process.

Each measuring module gives its rows as dataclasses, prints its table and turns its rows into JSON; the
entry point writes them all to one file (``--json``). Design and latest figures: ``docs/performance.md``.
"""
