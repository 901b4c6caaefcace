"""The pure aggregation core: (snapshot, config, now, memory) -> (consolidated state, memory).

No sockets, no clocks, no randomness: the same inputs always give the same output.

Entry point: :func:`controller.core.engine.step` with :class:`controller.core.engine.CoreMemory`.
One job per module, each documented in its docstring:

- ``snapshot``: the input (one consistent view of the rack table per cycle);
- ``classify``: rack states and their precedence, staleness;
- ``faults``: fault arbitration by direction, alarm latching and the clear command;
- ``admission``: quorum, re-admission hold and share ramp, cold start;
- ``isolation``: a rack lost from sight while in parallel held at its last limits until known out;
- ``derates``: per-rack thermal rate-of-rise derate and cell-voltage taper (``tables``: the
  piecewise-linear tables and their hysteresis);
- ``policies``: the aggregation table (one row per consolidated quantity) and the CCL/DCL
  policies with their physics;
- ``slew`` and ``bounds``: ramped increases, immediate decreases, the frame grid, CVL/DVL
  invariants;
- ``provenance``: the reason strings;
- ``engine``: one cycle, putting the above together.
"""
