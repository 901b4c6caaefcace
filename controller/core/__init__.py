"""The pure aggregation core: (rack inputs, config, now, memory) -> (consolidated state, memory).

No sockets, no clocks, no randomness: the same inputs always give the same output.

Where to start reading:

- ``step``: the reference cycle, the spec in code: every roster rack's outcome, then the bank;
- ``rack_outcome``: one rack's outcome — state, admission, derated limits, hold — and until when
  it stands;
- ``bank``: the outcomes consolidated into the one battery the inverter is told about;
- ``engine``: what the controller runs: the reference's result, recomputing only what changed
  (its property tests hold it equal to ``step``);
- ``memory``: what a cycle carries to the next; ``snapshot``: the input.

The parts they are made of, one job per module:

- ``classify``: rack states and their precedence, staleness;
- ``faults``: fault arbitration by direction, alarm latching and the clear command;
- ``admission``: quorum, re-admission hold and share ramp, cold start;
- ``isolation``: a rack lost from sight while in parallel held at its last limits until known out;
- ``derates``: per-rack thermal rate-of-rise derate and cell-voltage taper (``tables``: the
  piecewise-linear tables and their hysteresis; ``window``: the thermal sample window);
- ``policies``: the aggregation table (one row per consolidated quantity) and the CCL/DCL
  policies with their physics;
- ``slew`` and ``bounds``: ramped increases, immediate decreases, the frame grid, CVL/DVL
  invariants;
- ``provenance``: the reason strings.
"""
