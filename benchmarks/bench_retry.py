"""Retry overhead, side by side with tenacity, stamina and backoff, in one pyperf run.

Cases (ns per call):

- ``happy``: the call succeeds at once; each library with its default-ish
  bounded configuration (3 attempts, exponential backoff with jitter).
- ``fail2``: the call fails twice, then succeeds; every library is set to
  wait zero between attempts, so what is measured is the machinery.

Sync calls are timed in a plain loop; async calls in a loop inside one
coroutine on a running asyncio event loop (the way a service calls them).

Run: ``python benchmarks/bench_retry.py --fast -o retry.json`` then
``python benchmarks/report.py retry.json``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pyperf
from _timing import time_async, time_sync

import datapunk_recovery as dr


def _flaky_sync() -> Callable[[], int]:
    state = {"n": 0}

    def call() -> int:
        state["n"] += 1
        if state["n"] % 3:
            raise ConnectionError
        return 1

    return call


def _flaky_async() -> Callable[[], Awaitable[int]]:
    state = {"n": 0}

    async def call() -> int:
        state["n"] += 1
        if state["n"] % 3:
            raise ConnectionError
        return 1

    return call


def ok() -> int:
    return 1


async def aok() -> int:
    return 1


def main() -> None:
    import backoff
    import stamina
    import tenacity

    runner = pyperf.Runner()
    zero = dr.RetryConfig(base_delay=0.0, max_delay=0.0)

    # -- happy path, sync ---------------------------------------------------------------
    happy_sync: dict[str, Callable[[], Any]] = {
        "bare": ok,
        "datapunk": dr.retry(ok),
        "tenacity": tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
        )(ok),
        "stamina": stamina.retry(on=Exception, attempts=3)(ok),
        "backoff": backoff.on_exception(backoff.expo, Exception, max_tries=3)(ok),
    }
    for name, fn in happy_sync.items():
        runner.bench_time_func(f"happy-sync-{name}", time_sync(fn))

    # -- happy path, async ---------------------------------------------------------------
    happy_async: dict[str, Callable[[], Callable[[], Awaitable[Any]]]] = {
        "bare": lambda: aok,
        "datapunk": lambda: dr.retry(aok),
        "tenacity": lambda: tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
        )(aok),
        "stamina": lambda: stamina.retry(on=Exception, attempts=3)(aok),
        "backoff": lambda: backoff.on_exception(backoff.expo, Exception, max_tries=3)(aok),
    }
    for name, make in happy_async.items():
        runner.bench_time_func(f"happy-async-{name}", time_async(make))

    # -- fail twice, then succeed; zero waits ---------------------------------------------
    fail_sync: dict[str, Callable[[], Any]] = {
        "handwritten": _handwritten(_flaky_sync()),
        "datapunk": dr.retry(zero)(_flaky_sync()),
        "tenacity": tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none())(
            _flaky_sync()
        ),
        "stamina": stamina.retry(
            on=Exception, attempts=3, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0
        )(_flaky_sync()),
        "backoff": backoff.on_exception(backoff.constant, Exception, max_tries=3, interval=0)(
            _flaky_sync()
        ),
    }
    for name, fn in fail_sync.items():
        runner.bench_time_func(f"fail2-sync-{name}", time_sync(fn))

    fail_async: dict[str, Callable[[], Callable[[], Awaitable[Any]]]] = {
        "handwritten": lambda: _ahandwritten(_flaky_async()),
        "datapunk": lambda: dr.retry(zero)(_flaky_async()),
        "tenacity": lambda: tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none()
        )(_flaky_async()),
        "stamina": lambda: stamina.retry(
            on=Exception, attempts=3, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0
        )(_flaky_async()),
        "backoff": lambda: backoff.on_exception(
            backoff.constant, Exception, max_tries=3, interval=0
        )(_flaky_async()),
    }
    for name, make in fail_async.items():
        runner.bench_time_func(f"fail2-async-{name}", time_async(make))


def _handwritten(fn: Callable[[], int]) -> Callable[[], int]:
    def call() -> int:
        for attempt in range(3):
            try:
                return fn()
            except ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError

    return call


def _ahandwritten(fn: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[int]]:
    async def call() -> int:
        for attempt in range(3):
            try:
                return await fn()
            except ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError

    return call


if __name__ == "__main__":
    main()
