"""What an exporter adds to the retry decorator's happy path (pyperf).

Run::

    .venv/bin/python benchmarks/bench_telemetry.py -o /tmp/telemetry.json
    .venv/bin/python -m pyperf stats /tmp/telemetry.json

Cases, sync and async: a bare call; ``@retry`` with nobody listening (the
engine's fast path: no event is built); ``@retry`` with the Prometheus
exporter subscribed globally (two events per call: the attempt and the call,
a counter increment and a histogram observation); a subscriber that does
nothing (what observation costs the engine: it leaves its fast path and
builds two events); and, for scale, the
stdlib logging exporter with its loggers at the default WARNING level and the
OpenTelemetry exporter on the SDK.  Results and their reading are in
``docs/benchmarks/telemetry.md``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pyperf
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

Make = Callable[[], Exporter | None]


def no_exporter() -> None:
    return None


class NoOp(Exporter):
    """A subscriber that does nothing: what observation costs the engine itself."""

    def __call__(self, event: object) -> None:
        return None


def no_op() -> Exporter:
    return NoOp()


def prometheus() -> Exporter:
    return PrometheusExporter(CollectorRegistry())


def logging_silent() -> Exporter:
    return LoggingExporter()


def otel_sdk() -> Exporter:
    return OpenTelemetryExporter(
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
    )


def sync_case(fn: Callable[[], int], make: Make) -> Callable[[int], float]:
    def run(loops: int) -> float:
        exporter = make()
        if exporter is not None:
            exporter.install()
        try:
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            return time.perf_counter() - start
        finally:
            if exporter is not None:
                exporter.close()

    return run


def async_case(fn: Callable[[], Coroutine[Any, Any, int]], make: Make) -> Callable[[int], float]:
    async def measure(loops: int) -> float:
        start = time.perf_counter()
        for _ in range(loops):
            await fn()
        return time.perf_counter() - start

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
    runner.bench_time_func("sync retry, no-op subscriber", sync_case(retried, no_op))
    runner.bench_time_func("sync retry, prometheus", sync_case(retried, prometheus))
    runner.bench_time_func("sync retry, logging (silent)", sync_case(retried, logging_silent))
    runner.bench_time_func("sync retry, otel sdk", sync_case(retried, otel_sdk))
    runner.bench_time_func("async bare call", async_case(awork, no_exporter))
    runner.bench_time_func("async retry, no exporter", async_case(aretried, no_exporter))
    runner.bench_time_func("async retry, prometheus", async_case(aretried, prometheus))


if __name__ == "__main__":
    main()
