"""What chaos injection costs when it is switched off, in one pyperf run.

Cases (ns per call), sync and async:

- ``bare``: the function itself;
- ``chaos_off``: decorated by a :class:`~datapunk_recovery.chaos.Chaos`
  injector that is switched off (``enabled=False``);
- ``chaos_killed``: the injector is on but the global kill switch is thrown;
- ``chaos_rate0``: the injector is on with ``rate=0`` (active, never injects):
  what an armed-but-idle experiment costs;
- ``retry``: decorated by ``datapunk_recovery.retry`` (the default policy);
- ``retry_chaos_off``: ``retry`` around a switched-off injector, the way a
  service would keep chaos in its code.

A *disarmed* process (``DATAPUNK_RECOVERY_CHAOS=off``) is not measured: there
the decorator returns the function object itself, so it costs exactly ``bare``
(``tests/test_chaos.py::test_a_disarmed_process_returns_functions_untouched``).

Sync calls are timed in a plain loop; async calls in a loop inside one
coroutine on a running asyncio event loop.

Run: ``python benchmarks/bench_chaos.py --fast -o chaos.json`` then
``python benchmarks/report.py chaos.json``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyperf

import datapunk_recovery as dr
from datapunk_recovery import chaos


def _sync_loop(fn: Callable[[int], Any], killed: bool = False) -> Callable[[int], float]:
    def run(loops: int) -> float:
        if killed:
            chaos.disable_all()
        try:
            rng = range(loops)
            t0 = time.perf_counter()
            for i in rng:
                fn(i)
            return time.perf_counter() - t0
        finally:
            chaos.enable_all()

    return run


def _async_loop(
    fn: Callable[[int], Awaitable[Any]], killed: bool = False
) -> Callable[[int], float]:
    def run(loops: int) -> float:
        async def body() -> float:
            rng = range(loops)
            t0 = time.perf_counter()
            for i in rng:
                await fn(i)
            return time.perf_counter() - t0

        if killed:
            chaos.disable_all()
        try:
            return asyncio.run(body())
        finally:
            chaos.enable_all()

    return run


def ok(x: int) -> int:
    return x


async def aok(x: int) -> int:
    return x


def _off() -> chaos.Chaos:
    return chaos.Chaos(chaos.Fault(ConnectionError), enabled=False, name="bench")


def _killed() -> chaos.Chaos:
    return chaos.Chaos(chaos.Fault(ConnectionError), name="bench")


def _idle() -> chaos.Chaos:
    return chaos.Chaos(chaos.Fault(ConnectionError), rate=0.0, name="bench")


def main() -> None:
    runner = pyperf.Runner()
    for kind, fn, loop in (("sync", ok, _sync_loop), ("async", aok, _async_loop)):
        cases: dict[str, tuple[Any, bool]] = {
            "bare": (fn, False),
            "chaos_off": (_off()(fn), False),
            "chaos_killed": (_killed()(fn), True),
            "chaos_rate0": (_idle()(fn), False),
            "retry": (dr.retry(fn), False),
            "retry_chaos_off": (dr.retry(_off()(fn)), False),
        }
        for name, (target, killed) in cases.items():
            runner.bench_time_func(f"chaos-{kind}-{name}", loop(target, killed))


if __name__ == "__main__":
    main()
