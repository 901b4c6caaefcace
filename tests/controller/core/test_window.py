"""The thermal window's sample sequence is a tuple in all but cost: model-checked against tuples,
with older versions reused (the core is pure; tests and the cache replay memories), which must never
see their samples change."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.window import COMPACT_AFTER, EMPTY_WINDOW, Window

Op = tuple[int, bool, int]  # (which version, append (else drop), count or gap)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.booleans(), st.integers(0, 5)), min_size=1,
                max_size=400))
def test_every_version_stays_the_tuple_it_models(ops: list[Op]) -> None:
    versions: list[tuple[Window, tuple[tuple[float, float], ...]]] = [(EMPTY_WINDOW, ())]
    clock = 0.0
    for pick, append, amount in ops:
        # Mostly the newest version (as the core runs), sometimes an older one (a replayed memory).
        window, model = versions[-1] if pick % 4 else versions[pick % len(versions)]
        if append:
            clock += 0.5 + amount
            sample = (clock, float(amount))
            window, model = window.appended(sample), (*model, sample)
        else:
            window, model = window.dropped(amount), model[amount:]
        versions.append((window, model))
        for w, m in versions[-8:] + versions[:3]:
            assert tuple(w) == m
            assert len(w) == len(m)
            assert list(w.oldest(2)) == list(m[:2])
            if m:
                assert w[0] == m[0] and w[-1] == m[-1]
                assert w[1:] == m[1:]
    for w, m in versions:
        assert tuple(w) == m
        assert w == Window(m)
        assert hash(w) == hash(Window(m))


def test_a_long_run_keeps_its_list_short() -> None:
    window = EMPTY_WINDOW
    longest = 0
    for k in range(10_000):  # as derates runs it: drop what left the 30 s window, append the newest
        window = window.dropped(window.count_before(float(k) - 30.0)).appended((float(k), 20.0))
        longest = max(longest, len(window._items))
        assert len(window) == min(k + 1, 31)
    assert longest <= 2 * 31 + COMPACT_AFTER + 1  # compacted as it went


def test_count_before_and_index_errors() -> None:
    window = Window([(1.0, 20.0), (2.0, 21.0), (3.0, 22.0)])
    assert window.count_before(0.5) == 0
    assert window.count_before(2.0) == 1
    assert window.count_before(9.0) == 3
    with pytest.raises(IndexError):
        window[3]
    assert EMPTY_WINDOW.appended((1.0, 2.0)) == Window([(1.0, 2.0)])
    assert len(EMPTY_WINDOW) == 0  # appending to the shared empty window never changes it
