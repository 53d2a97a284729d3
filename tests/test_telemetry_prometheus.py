"""The Prometheus exporter, read back from a real ``prometheus_client`` registry.

A scripted run of a retried function (instant retries, a fake clock so every
attempt lasts exactly what the script says) is scraped, and every sample of
the registry is compared with what the script implies: nothing missing,
nothing extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery.telemetry.labels import LabelPolicy
from datapunk_recovery.telemetry.metrics import METRICS
from datapunk_recovery.telemetry.prometheus import PrometheusExporter
from datapunk_recovery.testing import FakeClock, fake_clock, instant_retries

Step = tuple[float, type[Exception] | None]


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the registry except the ``_created`` timestamps."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with instant_retries(), fake_clock() as fake:
        yield fake


def scripted(clock: FakeClock, name: str) -> tuple[object, list[list[Step]]]:
    """A retried function that plays one script per call: (seconds spent, error raised)."""
    scripts: list[list[Step]] = []

    @retry(RetryConfig(max_attempts=3), name=name)
    def call() -> str:
        seconds, error = scripts[0].pop(0)
        clock.advance(seconds)
        if error is not None:
            raise error("boom")
        return "ok"

    return call, scripts


def test_every_number_of_a_scripted_run(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    call, scripts = scripted(clock, "fetch")
    runs: list[list[Step]] = [
        [(0.02, None)],  # success
        [(0.2, ConnectionError), (0.03, None)],  # success after one network retry
        [(0.4, TimeoutError)] * 3,  # three timeouts: gives up, attempts exhausted
        [(0.004, ValueError)],  # not retryable: fails at once
    ]
    with PrometheusExporter(registry).install():
        for run in runs:
            scripts[:] = [list(run)]
            with contextlib.suppress(Exception):
                call()  # type: ignore[operator]
    got = samples(registry)

    hist = "datapunk_recovery_attempt_duration_seconds"
    # 7 attempts: 0.004 | 0.02 | 0.03 | 0.2 | 0.4 x 3
    cumulative = {
        0.001: 0, 0.0025: 0, 0.005: 1, 0.01: 1, 0.025: 2, 0.05: 3, 0.1: 3, 0.25: 4,
        0.5: 7, 1.0: 7, 2.5: 7, 5.0: 7, 10.0: 7, 30.0: 7, 60.0: 7,
    }  # fmt: skip
    expected = {
        key("datapunk_recovery_calls_total", operation="fetch", outcome="success"): 1.0,
        key("datapunk_recovery_calls_total", operation="fetch", outcome="success_after_retry"): 1.0,
        key("datapunk_recovery_calls_total", operation="fetch", outcome="failure_after_retry"): 1.0,
        key("datapunk_recovery_calls_total", operation="fetch", outcome="failure"): 1.0,
        key("datapunk_recovery_retries_total", operation="fetch", category="network"): 1.0,
        key("datapunk_recovery_retries_total", operation="fetch", category="timeout"): 2.0,
        key("datapunk_recovery_giveups_total", operation="fetch", reason="attempts"): 1.0,
        key("datapunk_recovery_giveups_total", operation="fetch", reason="non_retryable"): 1.0,
        **{
            key(f"{hist}_bucket", operation="fetch", le=str(le)): float(n)
            for le, n in cumulative.items()
        },
        key(f"{hist}_bucket", operation="fetch", le="+Inf"): 7.0,
        key(f"{hist}_count", operation="fetch"): 7.0,
    }  # fmt: skip
    total = got.pop(key(f"{hist}_sum", operation="fetch"))
    assert total == pytest.approx(0.02 + 0.2 + 0.03 + 3 * 0.4 + 0.004)
    assert got == expected


def test_every_metric_is_registered_before_any_event() -> None:
    registry = CollectorRegistry()
    PrometheusExporter(registry)
    names = {family.name for family in registry.collect()}
    # prometheus_client names a counter family without its _total suffix
    assert names == {m.prometheus_name for m in METRICS}
    assert "datapunk_recovery_calls" in names
    assert "datapunk_recovery_attempt_duration_seconds" in names


def test_the_exporter_can_watch_one_function(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    watched, scripts = scripted(clock, "watched")
    other, other_scripts = scripted(clock, "other")
    with PrometheusExporter(registry).install(watched.events):  # type: ignore[attr-defined]
        scripts[:] = [[(0.0, None)]]
        other_scripts[:] = [[(0.0, None)]]
        watched()  # type: ignore[operator]
        other()  # type: ignore[operator]
    calls = {
        labels: v for (name, labels), v in samples(registry).items() if name.endswith("calls_total")
    }
    assert calls == {frozenset({("operation", "watched"), ("outcome", "success")}): 1.0}


def test_closing_stops_the_export(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    call, scripts = scripted(clock, "fetch")
    exporter = PrometheusExporter(registry).install()
    exporter.close()
    scripts[:] = [[(0.0, None)]]
    call()  # type: ignore[operator]
    assert (
        registry.get_sample_value(
            "datapunk_recovery_calls_total", {"operation": "fetch", "outcome": "success"}
        )
        is None
    )


def test_an_operation_past_the_cap_is_counted_as_other(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    first, first_scripts = scripted(clock, "first")
    second, second_scripts = scripted(clock, "second")
    with PrometheusExporter(registry, labels=LabelPolicy(limits={"operation": 1})).install():
        first_scripts[:] = [[(0.0, None)]]
        second_scripts[:] = [[(0.0, None)]]
        first()  # type: ignore[operator]
        second()  # type: ignore[operator]
    value = registry.get_sample_value
    labels = {"outcome": "success"}
    assert value("datapunk_recovery_calls_total", {"operation": "first", **labels}) == 1.0
    assert value("datapunk_recovery_calls_total", {"operation": "other", **labels}) == 1.0
    assert value("datapunk_recovery_calls_total", {"operation": "second", **labels}) is None


@pytest.mark.anyio
async def test_async_calls_are_counted_the_same(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    outcomes = [ConnectionError("reset"), None]

    @retry(RetryConfig(max_attempts=3), name="async_fetch")
    async def fetch() -> str:
        error = outcomes.pop(0)
        if error is not None:
            raise error
        return "ok"

    with PrometheusExporter(registry).install():
        assert await fetch() == "ok"
    value = registry.get_sample_value
    assert (
        value(
            "datapunk_recovery_calls_total",
            {"operation": "async_fetch", "outcome": "success_after_retry"},
        )
        == 1.0
    )
    assert (
        value(
            "datapunk_recovery_retries_total", {"operation": "async_fetch", "category": "network"}
        )
        == 1.0
    )
    assert (
        value("datapunk_recovery_attempt_duration_seconds_count", {"operation": "async_fetch"})
        == 2.0
    )


def test_breaker_state_and_rejections(clock: FakeClock) -> None:
    from datapunk_recovery._core.errors import CircuitOpenError
    from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker

    registry = CollectorRegistry()
    breaker = CircuitBreaker("payments", BreakerConfig(consecutive_failures=2, open_duration=10.0))

    def fail() -> None:
        raise ConnectionError("down")

    def state_of() -> dict[str, float]:
        return {
            dict(labels)["state"]: v
            for (name, labels), v in samples(registry).items()
            if name == "datapunk_recovery_breaker_state"
        }

    with PrometheusExporter(registry).install():
        for _ in range(2):
            with pytest.raises(ConnectionError):
                breaker.call(fail)
        assert state_of() == {
            "closed": 0.0, "open": 1.0, "half_open": 0.0,
            "disabled": 0.0, "forced_open": 0.0, "metrics_only": 0.0,
        }  # fmt: skip
        for _ in range(3):
            with pytest.raises(CircuitOpenError):
                breaker.call(fail)
        clock.advance(10.0)
        breaker.call(lambda: None)  # the probe succeeds: half-open, then closed
    states = state_of()
    assert states.pop("closed") == 1.0
    assert set(states.values()) == {0.0}
    assert (
        registry.get_sample_value(
            "datapunk_recovery_breaker_rejections_total", {"breaker": "payments"}
        )
        == 3.0
    )


def area_events() -> list[tuple[object, str, dict[str, str], float]]:
    """(a real event of each area, the sample it moves, its labels, the value after it)."""
    from datapunk_recovery.budget import BudgetRefused
    from datapunk_recovery.cache.recovering import CacheWarmed, StaleServed
    from datapunk_recovery.flow.bulkhead import BulkheadRejected
    from datapunk_recovery.flow.fallback import FallbackUsed
    from datapunk_recovery.flow.hedging import HedgeWon
    from datapunk_recovery.network.router import FailedOver
    from datapunk_recovery.resource.inference import InferenceFallback
    from datapunk_recovery.resource.pool import PoolAcquisition, PoolUsage
    from datapunk_recovery.resource.tracking import LeakKind, ResourceLeaked
    from datapunk_recovery.strategies import RecoveryFallback

    fallbacks = "datapunk_recovery_fallbacks_total"
    return [
        (
            BudgetRefused(operation="api", at=0.0, criticality="normal", level=0.0, limit=5.0),
            "datapunk_recovery_budget_refusals_total",
            {"budget": "api"},
            1.0,
        ),
        (
            BulkheadRejected(operation="db", at=0.0, reason="full", active=10, queued=0),
            "datapunk_recovery_bulkhead_rejections_total",
            {"bulkhead": "db"},
            1.0,
        ),
        (
            FallbackUsed(operation="quote", at=0.0, trigger="error", error_type="E"),
            fallbacks,
            {"operation": "quote", "kind": "fallback"},
            1.0,
        ),
        (
            HedgeWon(operation="search", at=0.0, attempt=1, latency=0.02),
            fallbacks,
            {"operation": "search", "kind": "hedge"},
            1.0,
        ),
        (
            FailedOver(
                operation="users", at=0.0, from_endpoint="a", to_endpoint="b",
                from_priority=0, to_priority=1, attempt=2,
            ),
            fallbacks,
            {"operation": "users", "kind": "failover"},
            1.0,
        ),
        (
            RecoveryFallback(operation="catalog", at=0.0, kind="stale"),
            fallbacks,
            {"operation": "catalog", "kind": "stale"},
            1.0,
        ),
        (
            InferenceFallback(
                operation="embed", at=0.0, from_model="large", to_model="small",
                remaining=3, error_type="OOM",
            ),
            fallbacks,
            {"operation": "embed", "kind": "model"},
            1.0,
        ),
        (
            PoolUsage(operation="gpus", at=0.0, kind="gpu", capacity=4, in_use=3, waiting=1),
            "datapunk_recovery_resource_in_use",
            {"kind": "gpu"},
            3.0,
        ),
        (
            PoolAcquisition(
                operation="gpus", at=0.0, kind="gpu", caller="c", units=1, waited=0.3,
                outcome="acquired",
            ),
            "datapunk_recovery_resource_wait_seconds_sum",
            {"kind": "gpu"},
            0.3,
        ),
        (
            ResourceLeaked(
                operation="tracker", at=0.0, kind="file", resource_id=7,
                problem=LeakKind.NEVER_RELEASED, where="app.py:12 in load",
            ),
            "datapunk_recovery_resource_leaks_total",
            {"kind": "file"},
            1.0,
        ),
        (
            StaleServed(operation="profiles", at=0.0, error_type="ConnectionError"),
            fallbacks,
            {"operation": "profiles", "kind": "stale"},
            1.0,
        ),
        (
            CacheWarmed(operation="profiles", at=0.0, reason="start", requested=10, stored=8),
            "datapunk_recovery_cache_warmed_total",
            {"cache": "profiles"},
            8.0,
        ),
    ]  # fmt: skip


def test_bulkhead_slots_in_use_follow_admissions_and_releases() -> None:
    from datapunk_recovery.flow.bulkhead import Bulkhead, BulkheadConfig

    registry = CollectorRegistry()
    bulkhead = Bulkhead("reports", BulkheadConfig(max_concurrent=3))

    def in_use() -> float | None:
        return registry.get_sample_value(
            "datapunk_recovery_bulkhead_in_use", {"bulkhead": "reports"}
        )

    seen: list[float | None] = []
    with PrometheusExporter(registry).install():
        with bulkhead:
            seen.append(in_use())
            with bulkhead:
                seen.append(in_use())
            seen.append(in_use())
        seen.append(in_use())
    assert seen == [1.0, 2.0, 1.0, 0.0]


def test_every_area_moves_its_metric() -> None:
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry)
    for event, sample, labels, value in area_events():
        exporter(event)  # type: ignore[arg-type]
        assert registry.get_sample_value(sample, labels) == pytest.approx(value), sample


def test_a_hedge_that_lost_to_the_original_is_no_fallback() -> None:
    from datapunk_recovery.flow.hedging import HedgeWon

    registry = CollectorRegistry()
    PrometheusExporter(registry)(HedgeWon(operation="search", at=0.0, attempt=0, latency=0.01))
    assert (
        registry.get_sample_value(
            "datapunk_recovery_fallbacks_total", {"operation": "search", "kind": "hedge"}
        )
        is None
    )
