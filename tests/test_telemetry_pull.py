"""Pull what is counted: metrics read from the engine's statistics at scrape time.

A Prometheus scrape after concurrent calls (threads, asyncio and trio tasks)
must show exactly what ``fn.statistics()`` says; an exporter shows only what
happened while it was installed; and a first-try success stays on the
engine's fast path when nobody wants its events.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery._core.events import GaveUp, global_bus, subscribe
from datapunk_recovery._core.stats import DURATION_BOUNDS, Statistics
from datapunk_recovery._execution import engine
from datapunk_recovery.telemetry.logging import LoggingExporter
from datapunk_recovery.telemetry.prometheus import PrometheusExporter
from datapunk_recovery.testing import instant_retries

CALLS = "datapunk_recovery_calls_total"
HIST = "datapunk_recovery_attempt_duration_seconds"


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries():
        yield


@pytest.fixture
def slow_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call the engine hands to its slow loops, by operation name."""
    seen: list[str] = []
    run_sync, run_async = engine._run_sync, engine._run_async

    def spy_sync(e: Any, *args: Any) -> Any:
        seen.append(e.name)
        return run_sync(e, *args)

    def spy_async(e: Any, *args: Any) -> Any:
        seen.append(e.name)
        return run_async(e, *args)

    monkeypatch.setattr(engine, "_run_sync", spy_sync)
    monkeypatch.setattr(engine, "_run_async", spy_async)
    return seen


def call_from_threads(call: Callable[[int], str], threads: int, calls_each: int) -> None:
    """Call ``call(i)`` ``calls_each`` times from each of ``threads`` threads at once.

    Thread ``k`` passes ``i`` from ``k * 1000`` on; the ``ConnectionError``s
    that ``call`` raises are expected and ignored.
    """

    def worker(offset: int) -> None:
        for i in range(offset, offset + calls_each):
            with contextlib.suppress(ConnectionError):
                call(i)

    started = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()


def failing_every(n: int, name: str) -> Callable[[int], str]:
    """Call ``i`` fails once with a network error when ``i % n == 0``, twice when ``i % 7 == 0``."""
    lock = threading.Lock()
    tries: dict[int, int] = {}

    @retry(RetryConfig(max_attempts=2), name=name)
    def call(i: int) -> str:
        with lock:
            tries[i] = tries.get(i, 0) + 1
            n_try = tries[i]
        if (i % 7 == 0) or (i % n == 0 and n_try == 1):
            raise ConnectionError("reset")
        return "ok"

    return call


def scraped(registry: CollectorRegistry, operation: str) -> dict[str, float]:
    value = registry.get_sample_value
    out = {
        outcome: value(CALLS, {"operation": operation, "outcome": outcome}) or 0.0
        for outcome in ("success", "success_after_retry", "failure", "failure_after_retry")
    }
    labels = {"operation": operation, "category": "network"}
    out["retries"] = value("datapunk_recovery_retries_total", labels) or 0.0
    labels = {"operation": operation, "reason": "attempts"}
    out["giveups"] = value("datapunk_recovery_giveups_total", labels) or 0.0
    out["attempts"] = value(f"{HIST}_count", {"operation": operation}) or 0.0
    return out


def expected(stats: Statistics) -> dict[str, float]:
    # every call here either succeeds, or fails after its two attempts
    return {
        "success": stats.successes - stats.retries + stats.failures,
        "success_after_retry": stats.retries - stats.failures,
        "failure": 0.0,
        "failure_after_retry": stats.failures,
        "retries": stats.retries,
        "giveups": stats.failures,
        "attempts": stats.attempts,
    }


def test_a_scrape_after_calls_from_many_threads_matches_the_statistics() -> None:
    registry = CollectorRegistry()
    call = failing_every(5, "threads")
    with PrometheusExporter(registry).install():
        call_from_threads(call, threads=6, calls_each=300)
        got = scraped(registry, "threads")
    stats = call.statistics()  # type: ignore[attr-defined]
    assert stats.calls == 1800
    assert got == expected(stats)


@pytest.mark.anyio
async def test_a_scrape_after_concurrent_tasks_matches_the_statistics() -> None:
    registry = CollectorRegistry()
    calls = [0]

    @retry(RetryConfig(max_attempts=2), name="tasks")
    async def call(i: int) -> str:
        calls[0] += 1
        await anyio.lowlevel.checkpoint()
        if i % 7 == 0:
            raise ConnectionError("reset")
        return "ok"

    async def one(i: int) -> None:
        with contextlib.suppress(ConnectionError):
            await call(i)

    with PrometheusExporter(registry).install():
        async with anyio.create_task_group() as tasks:
            for i in range(400):
                tasks.start_soon(one, i)
        got = scraped(registry, "tasks")
    stats = call.statistics()  # type: ignore[attr-defined]
    assert stats.calls == 400 and calls[0] == stats.attempts
    assert got == expected(stats)


def test_an_exporter_shows_only_what_happened_while_it_was_installed() -> None:
    registry = CollectorRegistry()
    call = failing_every(2, "window")
    for i in range(1, 6):
        call(i)  # before: not shown
    exporter = PrometheusExporter(registry).install()
    for i in range(10, 14):
        call(i)  # 10, 12 retried once; 11, 13 succeed at once
    exporter.close()
    for i in range(15, 20):
        call(i)  # after: not shown
    got = scraped(registry, "window")
    assert got["success"] == 2 and got["success_after_retry"] == 2
    assert got["retries"] == 2 and got["attempts"] == 6


def test_attempt_durations_fall_in_the_engine_buckets_exactly() -> None:
    registry = CollectorRegistry()
    with PrometheusExporter(registry, buckets=(0.5, 60.0)).install():

        @retry(name="buckets")
        def call() -> str:
            return "ok"

        for _ in range(3 * 256):  # several folds of the pending durations
            call()
    value = registry.get_sample_value
    labels = {"operation": "buckets"}
    assert value(f"{HIST}_count", labels) == 768
    assert value(f"{HIST}_bucket", {**labels, "le": "+Inf"}) == 768
    assert value(f"{HIST}_bucket", {**labels, "le": "0.5"}) == 768
    assert value(f"{HIST}_bucket", {**labels, "le": "0.001"}) is None  # not asked for
    assert 0.0 <= (value(f"{HIST}_sum", labels) or 0.0) < 768 * 0.5


def test_buckets_the_engine_does_not_keep_are_recorded_from_events(
    slow_paths: list[str],
) -> None:
    assert 0.3 not in DURATION_BOUNDS
    registry = CollectorRegistry()
    with PrometheusExporter(registry, buckets=(0.3, 1.0)).install():

        @retry(name="own-buckets")
        def call() -> str:
            return "ok"

        call()
        call()
    value = registry.get_sample_value
    assert value(f"{HIST}_bucket", {"operation": "own-buckets", "le": "0.3"}) == 2
    assert value(CALLS, {"operation": "own-buckets", "outcome": "success"}) == 2
    assert slow_paths == ["own-buckets"] * 2  # the durations come from events


def test_with_prometheus_installed_a_first_try_success_stays_on_the_fast_path(
    slow_paths: list[str],
) -> None:
    with PrometheusExporter(CollectorRegistry()).install():
        assert global_bus.mode == 1

        @retry(name="fast")
        def call() -> str:
            return "ok"

        call()
    assert slow_paths == []
    assert global_bus.mode == 0


def test_a_subscriber_of_rare_events_leaves_successes_on_the_fast_path(
    slow_paths: list[str],
) -> None:
    gave_up: list[GaveUp] = []
    unsubscribe = subscribe(gave_up.append, kinds={GaveUp})
    try:
        left = [1]

        @retry(RetryConfig(max_attempts=1), name="rare")
        def call() -> str:
            if left[0]:
                left[0] -= 1
                raise ConnectionError("reset")
            return "ok"

        with pytest.raises(ConnectionError):
            call()
        call()
    finally:
        unsubscribe()
    assert [e.attempts for e in gave_up] == [1]
    assert slow_paths == ["rare"]  # the failure, handed over by the fast path


def test_a_logging_exporter_at_warning_asks_for_no_success_event_until_levels_change(
    slow_paths: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="datapunk_recovery.retry")
    retry_logger = logging.getLogger("datapunk_recovery.retry")
    retry_logger.setLevel(logging.WARNING)

    @retry(name="logged")
    def call() -> str:
        return "ok"

    with LoggingExporter().install():
        call()
        assert slow_paths == [] and global_bus.mode == 0
        retry_logger.setLevel(logging.DEBUG)
        try:
            assert global_bus.mode == 2
            call()
        finally:
            retry_logger.setLevel(logging.WARNING)
        assert global_bus.mode == 0
    assert slow_paths == ["logged"]
    # A first-try success is one event: the call's, standing for its one attempt.
    assert [r.getMessage().split()[0] for r in caplog.records] == ["retry.call"]


def otel_points(reader: Any) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
    """Every data point the in-memory reader collects now, by (name, sorted attributes)."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (m.name, tuple(sorted(p.attributes.items()))): p
        for r in data.resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
        for p in m.data.data_points
    }


def otel_scraped(
    points: dict[Any, Any], operation: str, attempt_histogram: str
) -> dict[str, float]:
    """What ``scraped()`` reads from Prometheus, read from OpenTelemetry points."""
    op = ("operation", operation)

    def value(name: str, *labels: tuple[str, str]) -> float:
        point = points.get((f"datapunk.recovery.{name}", tuple(sorted((op, *labels)))))
        return 0.0 if point is None else float(point.value)

    out = {
        outcome: value("calls", ("outcome", outcome))
        for outcome in ("success", "success_after_retry", "failure", "failure_after_retry")
    }
    out["retries"] = value("retries", ("category", "network"))
    out["giveups"] = value("giveups", ("reason", "attempts"))
    histogram = points.get(("datapunk.recovery.attempt.duration", (op,)))
    if attempt_histogram == "synchronous":  # an SDK histogram
        out["attempts"] = float(histogram.count)
    else:  # the default, "buckets": the +Inf bucket and the count agree
        assert histogram is None
        out["attempts"] = value("attempt.duration.count")
        assert value("attempt.duration.bucket", ("le", "+Inf")) == out["attempts"]
    return out


def otel_exporter(reader: Any, attempt_histogram: str) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider

    from datapunk_recovery.telemetry.otel import OpenTelemetryExporter

    provider = MeterProvider(metric_readers=[reader])
    if attempt_histogram == "default":
        return OpenTelemetryExporter(meter_provider=provider)
    return OpenTelemetryExporter(meter_provider=provider, attempt_histogram=attempt_histogram)


@pytest.mark.parametrize("attempt_histogram", ["default", "synchronous"])
def test_otel_metrics_after_calls_from_many_threads_match_the_statistics(
    attempt_histogram: str,
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    call = failing_every(3, "otel-threads")
    call(1)  # before the exporter: not shown
    with otel_exporter(reader, attempt_histogram).install():
        call_from_threads(call, threads=4, calls_each=200)
        got = otel_scraped(otel_points(reader), "otel-threads", attempt_histogram)
    want = expected(call.statistics())  # type: ignore[attr-defined]
    want["success"] -= 1  # call(1), before the exporter
    want["attempts"] -= 1
    assert got == want


@pytest.mark.anyio
@pytest.mark.parametrize("attempt_histogram", ["default", "synchronous"])
async def test_otel_metrics_after_concurrent_tasks_match_the_statistics(
    attempt_histogram: str,
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()

    @retry(RetryConfig(max_attempts=2), name="otel-tasks")
    async def call(i: int) -> str:
        await anyio.lowlevel.checkpoint()
        if i % 7 == 0:
            raise ConnectionError("reset")
        return "ok"

    async def one(i: int) -> None:
        with contextlib.suppress(ConnectionError):
            await call(i)

    with otel_exporter(reader, attempt_histogram).install():
        async with anyio.create_task_group() as tasks:
            for i in range(400):
                tasks.start_soon(one, i)
        got = otel_scraped(otel_points(reader), "otel-tasks", attempt_histogram)
    stats = call.statistics()  # type: ignore[attr-defined]
    assert stats.calls == 400
    assert got == expected(stats)


@pytest.mark.parametrize("attempt_histogram", ["default", "synchronous"])
def test_with_otel_installed_a_first_try_success_stays_on_the_fast_path(
    slow_paths: list[str], attempt_histogram: str
) -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()

    @retry(name="otel-fast")
    def call() -> str:
        return "ok"

    with otel_exporter(reader, attempt_histogram).install():
        for _ in range(300):  # past FOLD_AT: a fold hands durations over before collection
            call()
        first = otel_points(reader)
        again = otel_points(reader)  # nothing counted twice
    assert slow_paths == []
    for points in (first, again):
        assert otel_scraped(points, "otel-fast", attempt_histogram)["attempts"] == 300


@pytest.mark.parametrize("seconds", [0.005, 0.1, 60.0])
def test_an_attempt_lasting_exactly_a_bound_falls_in_that_bound(seconds: float) -> None:
    from datapunk_recovery.testing import fake_clock

    registry = CollectorRegistry()
    with fake_clock() as clock, PrometheusExporter(registry).install():

        @retry(name=f"bound-{seconds}")
        def call() -> str:
            clock.advance(seconds)
            return "ok"

        call()
    value = registry.get_sample_value
    labels = {"operation": f"bound-{seconds}"}
    index = DURATION_BOUNDS.index(seconds)
    below = str(DURATION_BOUNDS[index - 1]) if index else None
    assert value(f"{HIST}_bucket", {**labels, "le": str(seconds)}) == 1
    if below is not None:
        assert value(f"{HIST}_bucket", {**labels, "le": below}) == 0
