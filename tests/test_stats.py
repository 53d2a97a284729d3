"""Statistics snapshots: what users print and compare."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from datapunk_recovery._core.events import GiveUpReason
from datapunk_recovery._core.stats import DURATION_BOUNDS, OperationStats, Statistics


def test_statistics_without_give_ups_print_readably() -> None:
    stats = Statistics(calls=1, successes=1, failures=0, attempts=3, retries=2)
    assert repr(stats) == (
        "Statistics(calls=1, successes=1, failures=0, attempts=3, retries=2, giveups={})"
    )


def test_give_ups_print_as_a_plain_mapping_of_reasons() -> None:
    stats = Statistics(
        calls=2,
        successes=0,
        failures=2,
        attempts=6,
        retries=4,
        giveups=MappingProxyType({GiveUpReason.ATTEMPTS: 2, GiveUpReason.DEADLINE: 1}),
    )
    assert repr(stats).endswith("giveups={'attempts': 2, 'deadline': 1})")
    assert "mappingproxy" not in repr(stats) and "GiveUpReason" not in repr(stats)


def test_statistics_still_compare_by_value() -> None:
    one = Statistics(calls=1, successes=1, failures=0, attempts=1, retries=0)
    assert one == Statistics(calls=1, successes=1, failures=0, attempts=1, retries=0)


def _folded(durations: list[float]) -> tuple[list[int], float]:
    stats = OperationStats("fold")
    for seconds in durations:
        stats.observe(seconds)
    reading = stats.reading()
    return reading.buckets, reading.duration_sum


def test_folding_puts_each_duration_in_its_bucket_a_bound_in_its_own() -> None:
    durations = [0.0005, 0.001, 0.0011, 0.3, 60.0, 61.0]
    buckets, total = _folded(durations)
    expected = [0] * (len(DURATION_BOUNDS) + 1)
    expected[0] = 2  # 0.0005 and 0.001 (a bound is inclusive)
    expected[DURATION_BOUNDS.index(0.0025)] = 1
    expected[DURATION_BOUNDS.index(0.5)] = 1
    expected[DURATION_BOUNDS.index(60.0)] = 1
    expected[-1] = 1  # above every bound
    assert buckets == expected
    assert total == sum(durations)


def test_folding_durations_that_sum_under_the_first_bound_puts_all_in_the_first_bucket() -> None:
    buckets, total = _folded([0.0002, 0.0003, 0.0005])  # sum: exactly the first bound
    assert buckets == [3] + [0] * len(DURATION_BOUNDS)
    assert total == 0.0002 + 0.0003 + 0.0005


def test_a_tap_that_raises_is_logged_and_never_breaks_the_call_that_folds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import CollectorRegistry

    from datapunk_recovery import retry
    from datapunk_recovery._core.stats import FOLD_AT, add_tap, remove_tap
    from datapunk_recovery.telemetry.prometheus import PrometheusExporter

    taken: list[int] = []

    def broken(stats: object, durations: list[float]) -> None:
        raise RuntimeError("tap broke")

    def counting(stats: object, durations: list[float]) -> None:
        taken.append(len(durations))

    @retry(name="tapped")
    def call() -> str:
        return "ok"

    add_tap(broken)
    add_tap(counting)
    try:
        with PrometheusExporter(CollectorRegistry()).install():  # attempts are timed
            results = [call() for _ in range(FOLD_AT + 1)]  # the fast path folds once
    finally:
        remove_tap(broken)
        remove_tap(counting)
    assert results == ["ok"] * (FOLD_AT + 1)
    assert sum(taken) == FOLD_AT + 1  # the next tap still got every duration
    assert "tap broke" in caplog.text
