"""Adversarial drills on shedding: every bound that refuses work shows it in a metric.

"A bound that sheds counts it and reports an event and a metric."  A drill
author overloads each bound and scrapes a real ``prometheus_client`` registry.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from datapunk_recovery.flow.ratelimit import RateLimiter, RateLimiterConfig, RateLimitExceeded
from datapunk_recovery.resource.pool import PoolConfig, PoolFull, ResourcePool
from datapunk_recovery.telemetry.prometheus import PrometheusExporter
from datapunk_recovery.testing import fake_clock


def test_rate_limited_calls_are_counted_in_a_metric() -> None:
    registry = CollectorRegistry()
    limiter = RateLimiter("search", RateLimiterConfig(rate=1, burst=2))
    with fake_clock(), PrometheusExporter(registry).install():
        refused = 0
        for _ in range(5):
            try:
                limiter.acquire()
            except RateLimitExceeded:
                refused += 1
    assert refused == 3
    value = registry.get_sample_value(
        "datapunk_recovery_ratelimit_rejections_total", {"operation": "search"}
    )
    assert value == 3.0


@pytest.mark.anyio
async def test_a_resource_pool_turning_callers_away_is_counted_by_outcome() -> None:
    registry = CollectorRegistry()
    pool: ResourcePool[None] = ResourcePool("gpu", PoolConfig(capacity=1, max_waiting=0))
    with PrometheusExporter(registry).install():
        async with pool.acquire():
            for _ in range(2):
                with pytest.raises(PoolFull):
                    await pool.acquire()
    sample = "datapunk_recovery_resource_acquisitions_total"
    assert registry.get_sample_value(sample, {"kind": "gpu", "outcome": "rejected"}) == 2.0
    assert registry.get_sample_value(sample, {"kind": "gpu", "outcome": "acquired"}) == 1.0
