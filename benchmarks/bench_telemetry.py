"""What an exporter adds to the retry decorator's happy path, beside stamina's (pyperf).

Run::

    .venv/bin/python benchmarks/bench_telemetry.py -o /tmp/telemetry.json
    .venv/bin/python benchmarks/bench_telemetry.py --ratios /tmp/telemetry.json

Cases, sync and async, all in one pyperf run: a bare call; ``@retry`` with
nobody listening (the engine's fast path: no event is built); ``@retry``
with the Prometheus exporter installed globally (it pulls what the engine
counts at scrape time: the call only times its attempt); the stdlib logging
exporter with its loggers at WARNING (it asks for no event of a successful
call); the OpenTelemetry exporter on the SDK with its default attempt
histogram, ``attempt_histogram="buckets"`` (observable counters of the
engine's buckets: no ``record``), and with the opt-in
``attempt_histogram="synchronous"`` (every duration goes through the SDK's
``record``; the in-memory reader never collects, so past 65,536 waiting
durations the calls record them themselves); a subscriber of every
event that does nothing (the engine's slow path and its one event); and
stamina with its Prometheus hook installed, the peer's instrumented path.

Each sample is the benchmark thread's CPU time (``time.thread_time``), not
wall time: on a shared machine, wall time also counts the moments other
processes held the core.  Every case runs in this one thread (no exporter
here starts one), so nothing is left out.  ``--ratios`` prints each case's
cost above the bare call and the ratios the issue sets targets for.  Results
and their reading are in ``docs/benchmarks/telemetry.md``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pyperf
import stamina
import stamina.instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from datapunk_recovery import retry
from datapunk_recovery.telemetry import Exporter, LoggingExporter
from datapunk_recovery.telemetry.otel import OpenTelemetryExporter
from datapunk_recovery.telemetry.prometheus import PrometheusExporter


def work() -> int:
    return 1


async def awork() -> int:
    return 1


retried = retry(name="bench")(work)
aretried = retry(name="bench_async")(awork)

# stamina's instrumented path: its Prometheus hook, on its own registry.
stamina.instrumentation.set_on_retry_hooks([stamina.instrumentation.PrometheusOnRetryHook])
stamina_retried = stamina.retry(on=Exception, attempts=3)(work)
stamina_aretried = stamina.retry(on=Exception, attempts=3)(awork)

Make = Callable[[], Exporter | None]


def no_exporter() -> None:
    return None


class NoOp(Exporter):
    """A subscriber of every event that does nothing: what the slow path costs the engine."""

    def __call__(self, event: object) -> None:
        return None


def no_op() -> Exporter:
    return NoOp()


def prometheus() -> Exporter:
    return PrometheusExporter(CollectorRegistry())


def logging_silent() -> Exporter:
    return LoggingExporter()


def otel_sdk() -> Exporter:
    """The default: the attempt histogram as counters of the engine's buckets."""
    return OpenTelemetryExporter(
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
    )


def otel_synchronous() -> Exporter:
    """The opt-in: a real SDK histogram, one ``record`` per attempt."""
    return OpenTelemetryExporter(
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        attempt_histogram="synchronous",
    )


def sync_case(fn: Callable[[], int], make: Make) -> Callable[[int], float]:
    def run(loops: int) -> float:
        exporter = make()
        if exporter is not None:
            exporter.install()
        try:
            start = time.thread_time()
            for _ in range(loops):
                fn()
            return time.thread_time() - start
        finally:
            if exporter is not None:
                exporter.close()

    return run


def async_case(fn: Callable[[], Coroutine[Any, Any, int]], make: Make) -> Callable[[int], float]:
    async def measure(loops: int) -> float:
        start = time.thread_time()
        for _ in range(loops):
            await fn()
        return time.thread_time() - start

    def run(loops: int) -> float:
        exporter = make()
        if exporter is not None:
            exporter.install()
        try:
            return asyncio.run(measure(loops))
        finally:
            if exporter is not None:
                exporter.close()

    return run


def main() -> None:
    runner = pyperf.Runner()
    runner.bench_time_func("sync bare call", sync_case(work, no_exporter))
    runner.bench_time_func("sync retry, no exporter", sync_case(retried, no_exporter))
    runner.bench_time_func("sync retry, prometheus", sync_case(retried, prometheus))
    runner.bench_time_func("sync retry, logging (silent)", sync_case(retried, logging_silent))
    runner.bench_time_func("sync retry, otel sdk", sync_case(retried, otel_sdk))
    runner.bench_time_func("sync retry, otel sdk synchronous", sync_case(retried, otel_synchronous))
    runner.bench_time_func("sync retry, no-op subscriber", sync_case(retried, no_op))
    runner.bench_time_func("sync stamina + prometheus", sync_case(stamina_retried, no_exporter))
    runner.bench_time_func("async bare call", async_case(awork, no_exporter))
    runner.bench_time_func("async retry, no exporter", async_case(aretried, no_exporter))
    runner.bench_time_func("async retry, prometheus", async_case(aretried, prometheus))
    runner.bench_time_func("async retry, logging (silent)", async_case(aretried, logging_silent))
    runner.bench_time_func("async retry, otel sdk", async_case(aretried, otel_sdk))
    runner.bench_time_func(
        "async retry, otel sdk synchronous", async_case(aretried, otel_synchronous)
    )
    runner.bench_time_func("async stamina + prometheus", async_case(stamina_aretried, no_exporter))


def ratios(path: str) -> None:
    """Print each case's cost above the bare call (medians) and the targeted ratios."""
    suite = pyperf.BenchmarkSuite.load(path)
    median = {b.get_name(): b.median() for b in suite.get_benchmarks()}
    for face in ("sync", "async"):
        bare = median[f"{face} bare call"]
        above = {
            name[len(face) + 1 :]: value - bare
            for name, value in median.items()
            if name.startswith(face + " ") and name != f"{face} bare call"
        }
        unobserved, peer = above["retry, no exporter"], above["stamina + prometheus"]
        print(f"{face}: bare {bare * 1e9:.0f} ns")
        for case, cost in above.items():
            print(
                f"  {case:32} +{cost * 1e9:8.0f} ns  {cost / unobserved:6.2f}x unobserved"
                f"  {cost / peer:6.3f}x stamina+prometheus"
            )


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--ratios"]:
        ratios(sys.argv[2])
    else:
        main()
