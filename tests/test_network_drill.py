"""The network drill: load with failover and hedging while endpoints flap.

Three real HTTP servers on loopback: two primaries (``p1``, ``p2``, priority
0) and a secondary (``s1``, priority 1); ``p1`` and ``p2`` are reached
through the harness's fault proxy.  Steady GET load (16 at a time) runs through
:class:`~datapunk_recovery.network.aiohttp.AiohttpRecovery` with retries,
breakers per endpoint, hedging and a ratio retry budget, while a script of
phases, switched by the number of operations done (never by sleeping), makes
the endpoints flap: ``p1`` answers 503, ``p2``'s connections are reset, both
primaries fail at once (the secondary takes over), ``p1`` turns slow (hedges
win elsewhere), and everything heals between.

It checks what the code accounted, never how fast the machine was: the
retries and hedges the budget granted stay within its ratio of the attempts
reported to it; every request sent beyond one per operation is a granted
retry or hedge or the one attempt a call may make on the untried secondary
after the budget refused (``RouterConfig(fallthrough="call")``: such an attempt
is not a retry of what failed, and it lands on ``s1``, so the server counts
it); the servers received no more requests than the client sent; and no
connection and no task is left behind.  It prints its figures
(``pytest -s``), which ``docs/reliability.md`` quotes.

On a loaded machine the attempts take longer, so more of them outlast the
hedge delay: more hedges ask the budget, it refuses more, and more calls
take their one fall-through attempt - which is why the extra load is
bounded by the grants plus those attempts, not by the ratio alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import aiohttp
import anyio
import pytest

from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.events import Event, EventBus
from datapunk_recovery.breaker import BreakerConfig
from datapunk_recovery.budget import BudgetRefused, RatioBudget, RatioBudgetConfig
from datapunk_recovery.flow.hedging import HedgeConfig, HedgeStarted
from datapunk_recovery.network import (
    Endpoint,
    FailedOver,
    PriorityFallthrough,
    Router,
    RouterConfig,
)
from datapunk_recovery.network.aiohttp import AiohttpRecovery
from tests.harness import ThreadedProxy
from tests.network_servers import Reply, ScriptedServer, scripted_servers

pytestmark = [pytest.mark.anyio, pytest.mark.drill]

RATIO = 0.1
PER_PHASE = 120
CONCURRENCY = 16
UNAVAILABLE = Reply(503, {"Retry-After": "0"})
HEALTHY = Reply()
#: The flapping script, run twice: what is broken during each phase.
PHASES = (
    "healthy",
    "p1 503",
    "healthy",
    "p2 reset",
    "healthy",
    "p1 slow",
    "p1 503 + p2 reset",
    "healthy",
)


class CountingGate:
    """The drill's budget, counting what it is told and what it grants (a `RetryGate`).

    The router and its hedger report every attempt that ended (a cancelled
    hedge loser reports nothing) and ask before every retry or hedge.
    """

    def __init__(self, inner: RatioBudget) -> None:
        self.inner = inner
        self.attempts = self.granted = self.refused = 0

    def on_attempt(self, succeeded: bool) -> None:
        self.attempts += 1
        self.inner.on_attempt(succeeded)

    def allow_retry(self) -> bool:
        if self.inner.allow_retry():
            self.granted += 1
            return True
        self.refused += 1
        return False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # tasks are counted with asyncio.all_tasks()


@pytest.fixture
def servers() -> Iterator[dict[str, ScriptedServer]]:
    with scripted_servers("p1", "p2", "s1") as started:
        yield started


def pool_counts(session: aiohttp.ClientSession) -> tuple[int, int]:
    """(connections idle in the session's pool, connections acquired by a request)."""
    connector = session.connector
    assert connector is not None
    idle = sum(len(v) for v in connector._conns.values())
    return idle, len(connector._acquired)


class Flapper:
    """Puts the endpoints in the state of each phase; counts the faults it injects.

    ``p1`` answers 503 itself; its proxy makes it slow; ``p2``'s proxy resets
    its connections.
    """

    def __init__(self, p1: ScriptedServer, slow: ThreadedProxy, reset: ThreadedProxy) -> None:
        self.p1, self.slow_proxy, self.reset_proxy = p1, slow, reset
        self.faults: Counter[str] = Counter()
        self._slow_from = 0
        self.slow = False

    def enter(self, phase: str) -> None:
        self.p1.answer(default=UNAVAILABLE if "p1 503" in phase else HEALTHY)
        self.reset_proxy.clear()
        if "p2 reset" in phase:
            self.reset_proxy.cut_after_bytes(0, times=None)  # every connection reset at once
        self.slow = "p1 slow" in phase
        self.slow_proxy.set_latency(0.2 if self.slow else 0.0, "down")
        self._slow_from = len(self.p1.seen)

    def leave(self) -> None:
        if self.slow:
            self.faults["slow answers (p1, 200 ms)"] += len(self.p1.seen) - self._slow_from


async def test_failover_and_hedging_hold_within_the_budget_while_endpoints_flap(
    servers: dict[str, ScriptedServer],
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
) -> None:
    p1, p2, s1 = servers["p1"], servers["p2"], servers["s1"]
    slow, proxy = make_proxy(p1.address), make_proxy(p2.address)
    budget_bus = EventBus()
    # The window outlasts any run (the drill stops at 20 s), so the budget's
    # figures cover the whole drill however slow the machine is.
    budget = CountingGate(
        RatioBudget(
            "drill",
            RatioBudgetConfig(ratio=RATIO, min_per_second=0.0, window=600.0),
            bus=budget_bus,
        )
    )
    router = Router(
        "api",
        [
            Endpoint("p1", f"http://127.0.0.1:{slow.port}"),
            Endpoint("p2", f"http://127.0.0.1:{proxy.port}"),
            Endpoint("s1", s1.url, priority=1),
        ],
        RouterConfig(
            retry=RetryConfig(max_attempts=3, base_delay=0.005, max_delay=0.05, deadline=3.0),
            breaker=BreakerConfig(
                consecutive_failures=3,
                open_duration=0.02,
                keep_window=True,
                window_size=20,
                minimum_calls=1,
            ),
            hedge=HedgeConfig(delay=0.05),
        ),
        budget=budget,
    )
    seen: Counter[str] = Counter()

    def count(event: Event) -> None:
        if isinstance(event, HedgeStarted | FailedOver | PriorityFallthrough | BudgetRefused):
            seen[type(event).__name__] += 1

    router.bus.subscribe(count)
    budget_bus.subscribe(count)
    sent = 0
    answers: Counter[int] = Counter()
    trace = aiohttp.TraceConfig()

    async def on_request(*_: object) -> None:
        nonlocal sent
        sent += 1

    async def on_response(_: object, __: object, params: aiohttp.TraceRequestEndParams) -> None:
        answers[params.response.status] += 1

    trace.on_request_start.append(on_request)
    trace.on_request_end.append(on_response)

    flapper = Flapper(p1, slow, proxy)
    errors: Counter[str] = Counter()
    operations = 0
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=2.0), trace_configs=[trace]
    ) as client:
        api = AiohttpRecovery(client, router)
        connections_before = pool_counts(client)
        tasks_before = len(asyncio.all_tasks())
        started = time.monotonic()
        limiter = anyio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            nonlocal operations
            async with limiter:
                try:
                    await api.get(f"/item/{i}")
                except Exception as exc:
                    errors[type(exc).__name__] += 1
                operations += 1

        for round_ in range(2):
            for n, phase in enumerate(PHASES):
                flapper.enter(phase)
                async with anyio.create_task_group() as tg:
                    for i in range(PER_PHASE):
                        tg.start_soon(one, (round_ * len(PHASES) + n) * PER_PHASE + i)
                flapper.leave()
        flapper.enter("healthy")
        elapsed = time.monotonic() - started
        await anyio.wait_all_tasks_blocked()
        connections_after = pool_counts(client)
        tasks_after = len(asyncio.all_tasks())

    flapper.faults["503 answers (p1)"] = answers[503]
    flapper.faults["connections reset (p2, proxy)"] = proxy.stats.cuts
    faults = sum(flapper.faults.values())
    extra = sent - operations
    allowed = RATIO * operations
    received = len(p1.seen) + len(p2.seen) + len(s1.seen)
    # At most one fall-through attempt per refusal, and each one reached s1.
    forced_at_most = min(budget.refused, len(s1.seen))
    surfaced = sum(errors.values())
    kinds = ", ".join(f"{k}: {v}" for k, v in flapper.faults.items())
    print(
        f"\nnetwork drill: {operations} operations in {elapsed:.1f} s "
        f"({len(PHASES)} phases x 2, {PER_PHASE} operations each, {CONCURRENCY} at a time)\n"
        f"  faults injected: {faults} ({kinds})\n"
        f"  errors surfaced to callers: {surfaced} ({surfaced / operations:.1%})"
        f"{' - ' + ', '.join(f'{k}: {v}' for k, v in errors.items()) if errors else ''}\n"
        f"  requests sent: {sent}; extra load (retries + hedges): {extra} "
        f"= {extra / operations:.1%} of operations, budget ratio {RATIO:.0%} "
        f"(at most {allowed:.0f}); retries and hedges refused by the budget: "
        f"{seen['BudgetRefused']}\n"
        f"  budget: {budget.attempts} attempts reported, {budget.granted} retries and hedges "
        f"granted, {budget.refused} refused; requests received by the servers: {received}\n"
        f"  hedges started: {seen['HedgeStarted']}; failovers: {seen['FailedOver']}; "
        f"priority fallthroughs: {seen['PriorityFallthrough']}; "
        f"requests received: p1 {len(p1.seen)}, p2 {len(p2.seen)}, s1 {len(s1.seen)}\n"
        f"  client connections (idle, acquired): before {connections_before}, "
        f"after {connections_after}\n"
        f"  asyncio tasks: before {tasks_before}, after {tasks_after}"
    )

    assert operations == len(PHASES) * 2 * PER_PHASE
    assert all(v > 0 for v in flapper.faults.values()), flapper.faults
    # Every fault kind hit, and recovery made the difference: the secondary and
    # the hedges answered while the primaries failed.
    assert len(s1.seen) > 0 and seen["HedgeStarted"] > 0 and seen["FailedOver"] > 0
    assert surfaced < faults
    # The budget kept its ratio: at each grant, granted <= RATIO * (reported -
    # granted) held, and reports only grow afterwards (+1: the last grant).
    assert budget.granted <= RATIO * (budget.attempts - budget.granted + 1)
    assert budget.attempts <= sent and received <= sent
    # Every request beyond one per operation was a granted retry or hedge, or a
    # call's one fall-through attempt on the secondary after a refusal.
    assert extra <= budget.granted + forced_at_most
    # Nothing leaked: no connection left in use, no task left behind.
    assert connections_after[1] == 0
    assert tasks_after == tasks_before
