"""The breaker's sliding windows agree with a naive model of "the last N calls / T seconds"."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from datapunk_recovery._core.windows import CountWindow, TimeWindow

calls = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=300)


def test_count_window_counts_the_last_n_calls() -> None:
    w = CountWindow(3)
    for failed in (True, True, False, False):
        w.add(failed, False, 0.0)
    # the first failure fell out of the window
    assert w.totals(0.0) == (3, 1, 0)
    w.reset()
    assert w.totals(0.0) == (0, 0, 0)


@given(size=st.integers(1, 20), outcomes=calls)
def test_count_window_matches_naive_model(size: int, outcomes: list[tuple[bool, bool]]) -> None:
    w = CountWindow(size)
    for failed, slow in outcomes:
        w.add(failed, slow, 0.0)
    last = outcomes[-size:]
    assert w.totals(0.0) == (len(last), sum(f for f, _ in last), sum(s for _, s in last))


def test_time_window_forgets_old_buckets() -> None:
    w = TimeWindow(10.0, 10)  # ten 1-second buckets
    w.add(True, False, 0.5)
    w.add(False, True, 5.2)
    assert w.totals(9.9) == (2, 1, 1)
    assert w.totals(10.0) == (1, 0, 1)  # bucket [0, 1) is stale now
    assert w.totals(100.0) == (0, 0, 0)


@given(
    buckets=st.integers(1, 12),
    width=st.sampled_from([0.25, 1.0, 3.0]),
    steps=st.lists(
        st.tuples(st.floats(0, 5, allow_nan=False), st.booleans(), st.booleans()), max_size=200
    ),
)
def test_time_window_matches_naive_model(
    buckets: int, width: float, steps: list[tuple[float, bool, bool]]
) -> None:
    w = TimeWindow(width * buckets, buckets)
    now = 0.0
    seen: list[tuple[int, bool, bool]] = []
    for dt, failed, slow in steps:
        now += dt
        w.add(failed, slow, now)
        seen.append((math.floor(now / width), failed, slow))
        epoch = math.floor(now / width)
        live = [(f, s) for e, f, s in seen if e > epoch - buckets]
        assert w.totals(now) == (len(live), sum(f for f, _ in live), sum(s for _, s in live))
