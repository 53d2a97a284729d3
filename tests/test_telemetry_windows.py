"""Every exporter that counts the retry engine shows exactly its own window.

Prometheus and OpenTelemetry pull the engine's statistics with a baseline
taken at ``install()``; the callback exporter and the ``StatisticsCollector``
count events.  Whichever way, what an exporter shows must equal the change
of ``fn.statistics()`` between its ``install()`` and its ``close()``: after
concurrent calls from threads, asyncio tasks and trio tasks; for two
exporters installed at different times; for an exporter closed and a new one
installed; for operations created after ``install()``; and for an exporter
installed on one function's bus rather than globally.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery._core.events import EventBus
from datapunk_recovery._core.stats import Statistics
from datapunk_recovery.telemetry import CallbackExporter, StatisticsCollector, Update
from datapunk_recovery.telemetry.exporter import Exporter
from datapunk_recovery.telemetry.prometheus import PrometheusExporter
from datapunk_recovery.testing import instant_retries

Numbers = dict[str, Any]
"""calls, successes, failures, attempts, retries and give-ups by reason of one operation."""


@pytest.fixture(autouse=True)
def _instant() -> Iterator[None]:
    with instant_retries():
        yield


def numbers(stats: Statistics) -> Numbers:
    return {
        "calls": stats.calls,
        "successes": stats.successes,
        "failures": stats.failures,
        "attempts": stats.attempts,
        "retries": stats.retries,
        "giveups": {str(r): n for r, n in stats.giveups.items() if n},
    }


def change(before: Statistics, after: Statistics) -> Numbers:
    """What ``fn.statistics()`` counted between two snapshots."""
    old, new = numbers(before), numbers(after)
    out = {k: new[k] - old[k] for k in ("calls", "successes", "failures", "attempts", "retries")}
    giveups = {r: n - old["giveups"].get(r, 0) for r, n in new["giveups"].items()}
    out["giveups"] = {r: n for r, n in giveups.items() if n}
    return out


class View:
    """One exporter under test and how to read one operation's numbers from it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._sums: dict[tuple[str, tuple[str, ...]], float] = {}
        self._counts: dict[tuple[str, tuple[str, ...]], int] = {}
        self.registry = CollectorRegistry()
        self.exporter: Exporter
        if kind == "prometheus":
            self.exporter = PrometheusExporter(self.registry)
        elif kind.startswith("otel-"):
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            from datapunk_recovery.telemetry.otel import OpenTelemetryExporter

            self.reader = InMemoryMetricReader()
            self.exporter = OpenTelemetryExporter(
                meter_provider=MeterProvider(metric_readers=[self.reader]),
                attempt_histogram=kind.removeprefix("otel-"),
            )
        elif kind == "callback":
            self.exporter = CallbackExporter(on_update=self._add)
        else:
            self.exporter = StatisticsCollector()

    def _add(self, update: Update) -> None:
        key = (update.metric.name, update.labels)
        with self._lock:
            self._sums[key] = self._sums.get(key, 0.0) + update.value
            self._counts[key] = self._counts.get(key, 0) + 1

    def read(self, operation: str) -> Numbers:
        if self.kind == "statistics":
            assert isinstance(self.exporter, StatisticsCollector)
            s = self.exporter.snapshot(operation)
            giveups = {r: n for r, n in s.giveups.items() if n}
            return {
                "calls": s.calls,
                "successes": s.successes,
                "failures": s.failures,
                "attempts": s.attempts,
                "retries": s.retries,
                "giveups": giveups,
            }
        outcomes, retries, giveups, attempts = self._series(operation)
        successes = outcomes.get("success", 0) + outcomes.get("success_after_retry", 0)
        failures = outcomes.get("failure", 0) + outcomes.get("failure_after_retry", 0)
        return {
            "calls": successes + failures,
            "successes": successes,
            "failures": failures,
            "attempts": attempts,
            "retries": sum(retries.values()),
            "giveups": {r: n for r, n in giveups.items() if n},
        }

    def _series(self, operation: str) -> tuple[dict[str, int], dict[str, int], dict[str, int], int]:
        by: dict[str, dict[str, int]] = {"calls": {}, "retries": {}, "giveups": {}}
        attempts = 0
        if self.kind == "prometheus":
            for family in self.registry.collect():
                for s in family.samples:
                    if s.labels.get("operation") != operation:
                        continue
                    if s.name == "datapunk_recovery_attempt_duration_seconds_count":
                        attempts += int(s.value)
                    for metric, label in (
                        ("calls", "outcome"),
                        ("retries", "category"),
                        ("giveups", "reason"),
                    ):
                        if s.name == f"datapunk_recovery_{metric}_total":
                            by[metric][s.labels[label]] = int(s.value)
        elif self.kind.startswith("otel-"):
            data = self.reader.get_metrics_data()
            points = [
                (m.name.removeprefix("datapunk.recovery."), p)
                for r in (data.resource_metrics if data is not None else ())
                for sm in r.scope_metrics
                for m in sm.metrics
                for p in m.data.data_points
                if p.attributes.get("operation") == operation
            ]
            for metric, point in points:
                if metric == "attempt.duration":  # "synchronous": a histogram
                    attempts += point.count
                elif metric == "attempt.duration.count":  # "buckets": counters
                    attempts += int(point.value)
                for label, series in (("outcome", "calls"), ("category", "retries")):
                    if metric == series:
                        by[series][str(point.attributes[label])] = int(point.value)
                if metric == "giveups":
                    by["giveups"][str(point.attributes["reason"])] = int(point.value)
        else:
            with self._lock:
                sums, counts = dict(self._sums), dict(self._counts)
            for (metric, labels), value in sums.items():
                if labels[0] != operation:
                    continue
                if metric == "attempt.duration":
                    attempts += counts[(metric, labels)]
                elif metric in by:
                    by[metric][labels[1]] = int(value)
        return by["calls"], by["retries"], by["giveups"], attempts


KINDS = ["prometheus", "otel-synchronous", "otel-buckets", "callback", "statistics"]


def flaky(name: str, bus: EventBus | None = None) -> Callable[[int], str]:
    """Call ``i`` fails once when ``i % 3 == 0`` and on every attempt when ``i % 7 == 0``."""
    lock = threading.Lock()
    tries: dict[int, int] = {}

    @retry(RetryConfig(max_attempts=2), name=name, bus=bus)
    def call(i: int) -> str:
        with lock:
            tries[i] = n = tries.get(i, 0) + 1
        if i % 7 == 0 or (i % 3 == 0 and n == 1):
            raise ConnectionError("reset")
        return "ok"

    return call


def run(call: Callable[[int], str], calls: range) -> None:
    for i in calls:
        with contextlib.suppress(ConnectionError):
            call(i)


def run_in_threads(call: Callable[[int], str], threads: int, each: int, offset: int = 0) -> None:
    workers = [
        threading.Thread(target=run, args=(call, range(offset + k * each, offset + (k + 1) * each)))
        for k in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@pytest.mark.parametrize("kind", KINDS)
def test_an_exporter_after_calls_from_many_threads_matches_the_statistics(kind: str) -> None:
    call = flaky(f"threads-{kind}")
    run(call, range(1, 20))  # before install: not shown
    view = View(kind)
    before = call.statistics()  # type: ignore[attr-defined]
    with view.exporter.install():
        run_in_threads(call, threads=6, each=250, offset=100)
        got = view.read(f"threads-{kind}")
        after = call.statistics()  # type: ignore[attr-defined]
    want = change(before, after)
    assert want["calls"] == 1500 and want["retries"] and want["giveups"]
    assert got == want


@pytest.mark.anyio
@pytest.mark.parametrize("kind", KINDS)
async def test_an_exporter_after_concurrent_tasks_matches_the_statistics(kind: str) -> None:
    # Run under asyncio and under trio (the anyio_backend fixture).
    name = f"tasks-{kind}"

    @retry(RetryConfig(max_attempts=2), name=name)
    async def call(i: int) -> str:
        await anyio.lowlevel.checkpoint()
        if i % 7 == 0:
            raise ConnectionError("reset")
        await anyio.lowlevel.checkpoint()
        return "ok"

    async def one(i: int) -> None:
        with contextlib.suppress(ConnectionError):
            await call(i)

    await one(7)  # before install: not shown
    view = View(kind)
    before = call.statistics()
    with view.exporter.install():
        async with anyio.create_task_group() as tasks:
            for i in range(300):
                tasks.start_soon(one, i)
        got = view.read(name)
        after = call.statistics()
    want = change(before, after)
    assert want["calls"] == 300 and want["giveups"] == {"attempts": 43}
    assert got == want


@pytest.mark.parametrize("kind", KINDS)
def test_two_exporters_installed_at_different_times_each_see_their_own_window(
    kind: str,
) -> None:
    name = f"two-{kind}"
    call = flaky(name)
    first, second = View(kind), View(kind)
    run(call, range(0, 10))  # neither
    s0 = call.statistics()  # type: ignore[attr-defined]
    first.exporter.install()
    run(call, range(10, 30))  # first only
    s1 = call.statistics()  # type: ignore[attr-defined]
    second.exporter.install()
    run_in_threads(call, threads=3, each=40, offset=30)  # both
    s2 = call.statistics()  # type: ignore[attr-defined]
    first.exporter.close()
    run(call, range(150, 171))  # second only
    s3 = call.statistics()  # type: ignore[attr-defined]
    second.exporter.close()
    run(call, range(200, 210))  # neither
    assert first.read(name) == change(s0, s2)
    assert second.read(name) == change(s1, s3)
    assert change(s1, s3) != change(s0, s2)


@pytest.mark.parametrize("kind", KINDS)
def test_an_exporter_closed_then_a_new_one_installed_do_not_share_numbers(kind: str) -> None:
    name = f"again-{kind}"
    call = flaky(name)
    old = View(kind)
    s0 = call.statistics()  # type: ignore[attr-defined]
    with old.exporter.install():
        run(call, range(0, 21))
    s1 = call.statistics()  # type: ignore[attr-defined]
    run(call, range(21, 30))  # between the two: nobody's
    new = View(kind)
    s2 = call.statistics()  # type: ignore[attr-defined]
    with new.exporter.install():
        run(call, range(30, 44))
        shown_while_open = new.read(name)
    s3 = call.statistics()  # type: ignore[attr-defined]
    run(call, range(44, 60))  # after both: frozen
    assert old.read(name) == change(s0, s1)
    assert new.read(name) == shown_while_open == change(s2, s3)


@pytest.mark.parametrize("kind", KINDS)
def test_operations_created_after_install_are_counted_from_their_first_call(kind: str) -> None:
    view = View(kind)
    with view.exporter.install():
        late = flaky(f"late-{kind}")
        run_in_threads(late, threads=2, each=30)
        after = late.statistics()  # type: ignore[attr-defined]
        got = view.read(f"late-{kind}")
    assert got == numbers(after) and after.calls == 60


@pytest.mark.parametrize("kind", KINDS)
def test_an_exporter_on_one_bus_sees_only_its_operations_and_a_global_one_sees_all(
    kind: str,
) -> None:
    shared = EventBus()
    watched = flaky(f"watched-{kind}", bus=shared)
    sibling = flaky(f"sibling-{kind}", bus=shared)  # a pipeline's second stage: same bus
    other = flaky(f"other-{kind}")
    scoped, everywhere = View(kind), View(kind)
    stats = [f.statistics() for f in (watched, sibling, other)]  # type: ignore[attr-defined]
    with scoped.exporter.install(shared), everywhere.exporter.install():
        for fn in (watched, sibling, other):
            run(fn, range(0, 25))
        after = [f.statistics() for f in (watched, sibling, other)]  # type: ignore[attr-defined]
    want = [change(b, a) for b, a in zip(stats, after, strict=True)]
    names = [f"watched-{kind}", f"sibling-{kind}", f"other-{kind}"]
    nothing = View(kind).read("nobody")
    assert [scoped.read(n) for n in names] == [want[0], want[1], nothing]
    assert [everywhere.read(n) for n in names] == want


@pytest.mark.parametrize("scope", ["global", "bus"])
@pytest.mark.parametrize("kind", KINDS)
def test_retrying_blocks_are_counted_alive_and_once_collected(kind: str, scope: str) -> None:
    import gc

    from datapunk_recovery import retrying

    name = f"blocks-{kind}-{scope}"
    view = View(kind)
    bus = EventBus() if scope == "bus" else None
    elsewhere = flaky(name)  # same name, not on the bus: only a global exporter counts it
    run(elsewhere, range(1, 3))
    with view.exporter.install(*(() if bus is None else (bus,))):
        run(elsewhere, range(1, 3))  # two first-try successes: a global exporter's only
        for i in range(30):
            failures = [ConnectionError("reset")] if i % 3 == 0 else []
            if i == 0:
                failures *= 2  # both attempts fail: a give-up
            with contextlib.suppress(ConnectionError):
                for attempt in retrying(RetryConfig(max_attempts=2), name=name, bus=bus):
                    with attempt:
                        if failures:
                            raise failures.pop()
        gc.collect()  # the blocks' engines are gone: their counts must stay
        got = view.read(name)
    extra = 2 if bus is None else 0
    assert got == {
        "calls": 30 + extra,
        "successes": 29 + extra,
        "failures": 1,
        "attempts": 30 + 10 + extra,
        "retries": 10,
        "giveups": {"attempts": 1},
    }
