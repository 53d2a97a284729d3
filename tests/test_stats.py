"""Statistics snapshots: what users print and compare."""

from __future__ import annotations

from types import MappingProxyType

from datapunk_recovery._core.events import GiveUpReason
from datapunk_recovery._core.stats import Statistics


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
