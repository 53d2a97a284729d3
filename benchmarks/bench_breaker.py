"""Circuit-breaker overhead beside pybreaker, aiobreaker, purgatory and circuitbreaker.

Groups (ns per call; ``bare`` is the undecorated call, the baseline):

- ``breaker-closed-sync`` / ``breaker-closed-async``: a call through a closed
  breaker with each library's default, consecutive-failure configuration
  (threshold 5, open 30 s).  Ours as ``call()`` (``datapunk``) and as a
  decorator (``datapunk_deco``).
- ``breaker-policies-sync`` / ``breaker-policies-async``: our other trip
  policies, closed, as decorators: failure rate over a count window, over a
  time window, slow-call rate (which reads the clock twice a call), a custom
  policy, the default with a listener subscribed (events built), the count
  window with a subscriber that wants only other kinds (``rate_count_other_kinds``:
  an installed exporter), and ``hand_window``: a minimal hand-written
  failure-rate check over a 100-call ring under a lock, the floor for ``rate_count``.
  ``rate_count_one_failure`` is ``rate_count`` over a function that fails once
  every 100 calls, so that its 100-call window always holds one failure (a
  production service's usual state); beside it ``bare_one_failure`` (the same
  function, caught, unguarded) and ``hand_window_one_failure`` (the same
  function through ``hand_window``'s check).
- ``breaker-open-sync`` / ``breaker-open-async``: refusing a call while open
  (raise and catch the library's open error).  Every breaker stays open for
  30 s (ours with ``open_duration=30``: its default 1 s would end during a
  worker's run and time closed calls instead).
- ``breaker-redis-async`` (only with ``--redis-url URL``): a call through a
  closed breaker whose state lives in Redis, with the store's defaults, on
  the path users run: the called function yields to the event loop once (as
  real I/O does), so the store's cache refreshes (every ``cache_ttl``) and
  background batch sends run between calls and are paid for.  Beside it the
  same call through a local breaker (``datapunk_local``), the decorator
  (``datapunk_deco``) and a count-window breaker (``datapunk_window``, whose
  successes are batched and sent every ``flush_max`` calls).

Sync calls are timed in a plain loop; async calls in a loop inside one
coroutine on a running asyncio event loop.

Run: ``python benchmarks/bench_breaker.py --fast -o breaker.json`` (add
``--redis-url redis://127.0.0.1:6379/0`` for the Redis group, ``--groups
closed,open`` to run only some groups) then ``python benchmarks/report.py
breaker.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiobreaker
import circuitbreaker
import purgatory
import pybreaker
import pyperf
from _timing import time_async, time_sync

from datapunk_recovery._core import events
from datapunk_recovery._core.errors import CircuitOpenError
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker


def _refusing_sync(fn: Callable[[], Any], error: type[BaseException]) -> Callable[[], None]:
    def call() -> None:
        try:  # noqa: SIM105 - contextlib.suppress would add its own cost to what is measured
            fn()
        except error:
            pass

    return call


def _refusing_async(
    fn: Callable[[], Awaitable[Any]], error: type[BaseException]
) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        try:  # noqa: SIM105 - as above
            await fn()
        except error:
            pass

    return call


def ok() -> int:
    return 1


async def aok() -> int:
    return 1


def boom() -> int:
    raise ConnectionError


def one_in(n: int) -> Callable[[], int]:
    """Fails once every ``n`` calls: a count window of ``n`` calls always holds one failure."""
    count = [0]

    def call() -> int:
        count[0] += 1
        if count[0] % n == 0:
            raise ConnectionError
        return 1

    return call


async def aboom() -> int:
    raise ConnectionError


class EveryNth:
    """A custom trip policy: trips after n failures in total (never, here)."""

    def __init__(self) -> None:
        self.failures = 0

    def record(self, failed: bool, slow: bool, duration: float | None, now: float) -> bool:
        self.failures += failed
        return self.failures >= 1000

    def reset(self) -> None:
        self.failures = 0


POLICIES: dict[str, BreakerConfig] = {
    "rate_count": BreakerConfig(consecutive_failures=None, failure_rate_threshold=0.5),
    "rate_time": BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window="time"
    ),
    "slow_rate": BreakerConfig(slow_call_rate_threshold=0.5, slow_call_duration=1.0),
    "custom": BreakerConfig(consecutive_failures=None, trip_policy=EveryNth),
}


# ---------------------------------------------------------------------------
# closed, sync


def closed_sync() -> dict[str, Callable[[], Any]]:
    ours = CircuitBreaker("bench")
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
    pf = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    return {
        "bare": ok,
        "datapunk": lambda: ours.call(ok),
        "datapunk_deco": ours(ok),
        "pybreaker": lambda: pb.call(ok),
        "aiobreaker": lambda: ab.call(ok),
        "purgatory": pf("bench")(ok),
        "circuitbreaker": circuitbreaker.circuit(failure_threshold=5, recovery_timeout=30)(ok),
    }


def closed_async() -> dict[str, Callable[[], Callable[[], Awaitable[Any]]]]:
    def ours_call() -> Callable[[], Awaitable[Any]]:
        b = CircuitBreaker("bench")
        return lambda: b.call_async(aok)

    def aiob() -> Callable[[], Awaitable[Any]]:
        b = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
        return lambda: b.call_async(aok)

    def purg() -> Callable[[], Awaitable[Any]]:
        f = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
        return f("bench")(aok)  # type: ignore[no-any-return]

    return {
        "bare": lambda: aok,
        "datapunk": ours_call,
        "datapunk_deco": lambda: CircuitBreaker("bench")(aok),
        "aiobreaker": aiob,
        "purgatory": purg,
        "circuitbreaker": lambda: circuitbreaker.circuit(failure_threshold=5, recovery_timeout=30)(
            aok
        ),
    }


# ---------------------------------------------------------------------------
# our trip policies


def policies_sync() -> dict[str, Callable[[], Any]]:
    cases: dict[str, Callable[[], Any]] = {
        "bare": ok,
        "datapunk": CircuitBreaker("bench")(ok),
    }
    for name, config in POLICIES.items():
        cases[name] = CircuitBreaker("bench", config)(ok)
    listened = CircuitBreaker("listened")
    listened.events.subscribe(lambda event: None)
    cases["listening"] = listened(ok)
    # A subscriber that wants none of the breaker's per-call events (a metrics
    # exporter that pulls its counts): the rate breaker stays on its fast path.
    others = CircuitBreaker("others", POLICIES["rate_count"])
    others.events.subscribe(lambda event: None, kinds=("retry.giveup", "breaker.state"))
    cases["rate_count_other_kinds"] = others(ok)
    cases["hand_window"] = _hand_window()
    # The window always holds one failure; each failure is raised and caught.
    cases["bare_one_failure"] = _refusing_sync(one_in(100), ConnectionError)
    cases["rate_count_one_failure"] = _refusing_sync(
        CircuitBreaker("one", POLICIES["rate_count"])(one_in(100)), ConnectionError
    )
    cases["hand_window_one_failure"] = _refusing_sync(_hand_window(one_in(100)), ConnectionError)
    return cases


def _hand_window(fn: Callable[[], int] = ok) -> Callable[[], Any]:
    """A minimal hand-written failure-rate check over a 100-call ring, under a lock."""
    import threading

    ring = bytearray(100)
    state = [0, 0, 0]  # position, calls, failures
    lock = threading.Lock()

    def call() -> int:
        try:
            result = fn()
        except Exception:
            failed = 1
            raise
        else:
            failed = 0
        finally:
            with lock:
                i = state[0]
                state[2] += failed - ring[i]
                ring[i] = failed
                state[0] = (i + 1) % 100
                state[1] = min(state[1] + 1, 100)
                if failed and state[1] >= 100 and state[2] >= 50:
                    state[1] = 0  # would open (a real breaker would refuse for a while)
        return result

    return call


def policies_async() -> dict[str, Callable[[], Callable[[], Awaitable[Any]]]]:
    cases: dict[str, Callable[[], Callable[[], Awaitable[Any]]]] = {
        "bare": lambda: aok,
        "datapunk": lambda: CircuitBreaker("bench")(aok),
    }
    for name, config in POLICIES.items():
        cases[name] = lambda config=config: CircuitBreaker("bench", config)(aok)  # type: ignore[misc]

    def listening() -> Callable[[], Awaitable[Any]]:
        b = CircuitBreaker("listened")
        b.events.subscribe(lambda event: None)
        return b(aok)

    cases["listening"] = listening
    return cases


# ---------------------------------------------------------------------------
# open: refusing


def _open_ours() -> CircuitBreaker:
    b = CircuitBreaker("bench", BreakerConfig(open_duration=30.0))  # as the peers: 30 s
    for _ in range(5):
        with contextlib.suppress(ConnectionError):
            b.call(boom)
    return b


def open_sync() -> dict[str, Callable[[], Any]]:
    ours = _open_ours()
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
    pf = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    pg = pf("bench")(boom)
    cb = circuitbreaker.circuit(failure_threshold=5, recovery_timeout=30)(boom)
    for _ in range(6):
        for fn in (lambda: pb.call(boom), lambda: ab.call(boom), pg, cb):
            with contextlib.suppress(Exception):
                fn()
    return {
        "bare": _refusing_sync(boom, ConnectionError),
        "datapunk": _refusing_sync(lambda: ours.call(ok), CircuitOpenError),
        "pybreaker": _refusing_sync(lambda: pb.call(ok), pybreaker.CircuitBreakerError),
        "aiobreaker": _refusing_sync(lambda: ab.call(ok), aiobreaker.CircuitBreakerError),
        "purgatory": _refusing_sync(pg, Exception),
        "circuitbreaker": _refusing_sync(cb, circuitbreaker.CircuitBreakerError),
    }


def open_async() -> dict[str, Callable[[], Callable[[], Awaitable[Any]]]]:
    def ours() -> Callable[[], Awaitable[Any]]:
        b = _open_ours()
        return _refusing_async(lambda: b.call_async(aok), CircuitOpenError)

    def aiob() -> Callable[[], Awaitable[Any]]:
        b = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
        for _ in range(6):
            with contextlib.suppress(Exception):
                b._state._handle_error(ConnectionError())  # open it without awaiting
        return _refusing_async(lambda: b.call_async(aok), aiobreaker.CircuitBreakerError)

    def circ() -> Callable[[], Awaitable[Any]]:
        cb = circuitbreaker.circuit(failure_threshold=5, recovery_timeout=30)(aboom)
        return _refusing_async(cb, Exception)

    return {
        "bare": lambda: _refusing_async(aboom, ConnectionError),
        "datapunk": ours,
        "aiobreaker": aiob,
        "circuitbreaker": circ,
    }


# ---------------------------------------------------------------------------
# Redis


async def ayielding() -> str:
    """A call that yields to the event loop once, as real I/O does: the store's
    timers and background sends run between calls, as in a service."""
    await asyncio.sleep(0)
    return "ok"


def redis_async(url: str) -> dict[str, Callable[[], Callable[[], Awaitable[Any]]]]:
    from datapunk_recovery.stores.redis import RedisStore

    windowed = BreakerConfig(failure_rate_threshold=0.5, window="count", window_size=100)

    def local() -> Callable[[], Awaitable[Any]]:
        b = CircuitBreaker("bench-local")
        return lambda: b.call_async(ayielding)

    def ours(config: BreakerConfig | None = None) -> Callable[[], Callable[[], Awaitable[Any]]]:
        def make() -> Callable[[], Awaitable[Any]]:
            b = CircuitBreaker("bench-redis", config, store=RedisStore(url))  # store defaults
            return lambda: b.call_async(ayielding)

        return make

    def ours_deco() -> Callable[[], Awaitable[Any]]:
        b = CircuitBreaker("bench-redis", store=RedisStore(url))
        return b(ayielding)

    return {
        "bare": lambda: ayielding,
        "datapunk_local": local,
        "datapunk": ours(),
        "datapunk_deco": ours_deco,
        "datapunk_window": ours(windowed),
    }


def _forward(cmd: list[str], args: Any) -> None:
    # pyperf workers get neither the parent's environment nor unknown options.
    if args.redis_url:
        cmd.extend(["--redis-url", args.redis_url])
    if args.groups:
        cmd.extend(["--groups", args.groups])


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=_forward)
    runner.argparser.add_argument(
        "--redis-url",
        default=os.environ.get("DATAPUNK_BENCH_REDIS_URL"),
        help="also benchmark a breaker whose state lives in this Redis",
    )
    runner.argparser.add_argument(
        "--groups", default="", help="comma-separated words; run only groups containing one"
    )
    args = runner.parse_args()
    wanted = [w for w in args.groups.split(",") if w]

    def chosen(group: str) -> bool:
        return not wanted or any(w in group for w in wanted)

    assert not events.listening(), "benchmarks must run with nobody listening"
    for group, make_cases in (
        ("breaker-closed-sync", closed_sync),
        ("breaker-policies-sync", policies_sync),
        ("breaker-open-sync", open_sync),
    ):
        if chosen(group):
            for who, fn in make_cases().items():
                runner.bench_time_func(f"{group}-{who}", time_sync(fn))
    async_groups: list[
        tuple[str, Callable[[], dict[str, Callable[[], Callable[[], Awaitable[Any]]]]]]
    ] = [
        ("breaker-closed-async", closed_async),
        ("breaker-policies-async", policies_async),
        ("breaker-open-async", open_async),
    ]
    url = args.redis_url
    if url:
        async_groups.append(("breaker-redis-async", lambda: redis_async(url)))
    for group, make_acases in async_groups:
        if chosen(group):
            for who, make in make_acases().items():
                runner.bench_time_func(f"{group}-{who}", time_async(make))


if __name__ == "__main__":
    main()
