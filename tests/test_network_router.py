"""The router: selection, failover, priority fallthrough, re-routing, hedging, cancellation.

These run under asyncio and trio with plain ``async (endpoint) -> result`` calls;
tests/test_network_http.py drives the same router through real HTTP servers.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import Counter
from collections.abc import Callable

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import Jitter, RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded, RecoveryError, final_reason
from datapunk_recovery._core.events import GaveUp, GiveUpReason
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery.breaker import BreakerConfig, BreakerState, OutcomeRecorded
from datapunk_recovery.budget import (
    RatioBudget,
    RatioBudgetConfig,
    TokenBudget,
    TokenBudgetConfig,
)
from datapunk_recovery.flow.hedging import HedgeConfig, HedgeStarted, HedgeWon
from datapunk_recovery.network import (
    AllEndpointsDown,
    Endpoint,
    EndpointFailed,
    FailedOver,
    PriorityFallthrough,
    Router,
    RouterConfig,
    RoutingChanged,
)
from datapunk_recovery.network.http import HttpPolicy
from datapunk_recovery.testing import fake_clock

pytestmark = pytest.mark.anyio

QUICK = RetryConfig(max_attempts=3, base_delay=0.0)
TRIP_AT_2 = BreakerConfig(
    consecutive_failures=2, keep_window=True, minimum_calls=1, open_duration=30.0
)
WINDOW_ONLY = BreakerConfig(keep_window=True, minimum_calls=1)


class Slowed(RecoveryError):
    """A retryable answer carrying a server-given delay."""

    retryable = True


def router(*endpoints: Endpoint, **config: object) -> Router:
    settings: dict[str, object] = {"retry": QUICK, "breaker": TRIP_AT_2, **config}
    return Router("svc", endpoints, RouterConfig(**settings))  # type: ignore[arg-type]


def recording(seen: list[events.Event], r: Router) -> None:
    r.bus.subscribe(seen.append)


class Service:
    """Endpoints that fail (``down``) or answer with their name; counts calls."""

    def __init__(self, down: set[str] | None = None) -> None:
        self.down = set(down or ())
        self.calls: list[str] = []

    async def __call__(self, endpoint: Endpoint) -> str:
        self.calls.append(endpoint.name)
        await anyio.lowlevel.checkpoint()
        if endpoint.name in self.down:
            raise ConnectionRefusedError(f"{endpoint.name} refused")
        return endpoint.name


async def until(predicate: Callable[[], bool], *, rounds: int = 1000) -> None:
    for _ in range(rounds):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


# --- endpoints ---------------------------------------------------------------------------


def test_endpoints_are_validated_and_hide_credentials() -> None:
    e = Endpoint("a", "https://user:s3cret@api.example.com", priority=1)
    assert "s3cret" not in repr(e)
    with pytest.raises(ValueError, match=r"Endpoint.priority: must be >= 0"):
        Endpoint("a", priority=-1)
    with pytest.raises(TypeError, match=r"Endpoint.name: expected a non-empty str"):
        Endpoint("")
    with pytest.raises(ValueError, match="names must be unique"):
        router(Endpoint("a"), Endpoint("a"))


# --- selection and failover ------------------------------------------------------------


async def test_a_retry_goes_to_another_endpoint_of_the_same_level() -> None:
    seen: list[events.Event] = []
    r = router(Endpoint("a"), Endpoint("b"), Endpoint("backup", priority=1))
    recording(seen, r)
    service = Service(down={"a"})
    # Whichever primary is tried first, the call ends on the other one, never on the backup.
    results = [await r.call(service) for _ in range(4)]
    assert set(results) == {"b"}
    assert "backup" not in service.calls
    failovers = [e for e in seen if isinstance(e, FailedOver)]
    assert failovers and all((e.from_endpoint, e.to_endpoint) == ("a", "b") for e in failovers)
    assert all(e.endpoint == "a" for e in seen if isinstance(e, EndpointFailed))


async def test_the_lowest_recent_failure_rate_wins() -> None:
    r = router(
        Endpoint("a"), Endpoint("b"), breaker=BreakerConfig(keep_window=True, minimum_calls=1)
    )
    r.breaker("a").allow().failure(ConnectionResetError())
    r.breaker("a").allow().success()
    r.breaker("b").allow().success()
    service = Service()
    assert [await r.call(service) for _ in range(3)] == ["b", "b", "b"]


async def test_on_equal_failure_rates_the_fewest_in_flight_wins() -> None:
    r = router(Endpoint("a"), Endpoint("b"))
    release = anyio.Event()
    where: list[str] = []

    async def hold(endpoint: Endpoint) -> str:
        where.append(endpoint.name)
        await release.wait()
        return endpoint.name

    async with anyio.create_task_group() as tg:
        tg.start_soon(r.call, hold)
        await until(lambda: len(where) == 1)
        tg.start_soon(r.call, hold)
        await until(lambda: len(where) == 2)
        assert sorted(where) == ["a", "b"]  # the second call avoided the busy endpoint
        assert [s.in_flight for s in r.states()] == [1, 1]
        release.set()
    assert [s.in_flight for s in r.states()] == [0, 0]


async def test_idle_endpoints_share_the_load_in_turn() -> None:
    r = router(Endpoint("a"), Endpoint("b"), Endpoint("c"))
    service = Service()
    for _ in range(6):
        await r.call(service)
    assert Counter(service.calls) == {"a": 2, "b": 2, "c": 2}


async def test_a_call_that_failed_on_every_endpoint_of_a_level_falls_through_at_once() -> None:
    seen: list[events.Event] = []
    r = router(Endpoint("a"), Endpoint("b"), Endpoint("backup", priority=1))
    recording(seen, r)
    service = Service(down={"a", "b"})
    assert await r.call(service) == "backup"
    assert sorted(service.calls[:2]) == ["a", "b"] and service.calls[2:] == ["backup"]
    assert [
        (e.from_priority, e.to_priority) for e in seen if isinstance(e, PriorityFallthrough)
    ] == [(0, 1)]
    # No breaker is open yet: the next call starts on level 0 again, and falls through again.
    assert {s.state for s in r.states()} == {BreakerState.CLOSED}
    service.calls.clear()
    assert await r.call(service) == "backup"
    assert service.calls[-1] == "backup"


async def test_a_level_of_one_failing_endpoint_falls_through_instead_of_retrying_it() -> None:
    r = router(Endpoint("a"), Endpoint("backup", priority=1), Endpoint("last", priority=2))
    service = Service(down={"a", "backup"})
    assert await r.call(service) == "last"
    assert service.calls == ["a", "backup", "last"]


async def test_when_every_level_failed_in_the_call_the_best_level_is_tried_again() -> None:
    r = router(
        Endpoint("a"),
        Endpoint("backup", priority=1),
        retry=RetryConfig(max_attempts=4, base_delay=0.0),
    )
    service = Service(down={"a", "backup"})
    with pytest.raises(ConnectionRefusedError):
        await r.call(service)
    assert service.calls == ["a", "backup", "a", "backup"]  # attempts bound the call


async def test_max_attempts_still_bounds_a_fallthrough() -> None:
    r = router(
        Endpoint("a"),
        Endpoint("b"),
        Endpoint("backup", priority=1),
        retry=RetryConfig(max_attempts=2, base_delay=0.0),
    )
    service = Service(down={"a", "b"})
    with pytest.raises(ConnectionRefusedError):
        await r.call(service)  # two attempts, both on level 0: none left for the fallthrough
    assert "backup" not in service.calls


async def test_the_deadline_still_bounds_a_fallthrough() -> None:
    r = router(
        Endpoint("a"),
        Endpoint("backup", priority=1),
        retry=RetryConfig(max_attempts=5, base_delay=1.0, jitter=Jitter.NONE),
    )
    service = Service(down={"a"})
    with fake_clock(), deadline(0.5), pytest.raises(ConnectionRefusedError) as caught:
        await r.call(service)  # the backoff before the fallthrough would end past the deadline
    assert service.calls == ["a"]
    assert "deadline" in caught.value.__notes__[-1]


async def test_a_budget_that_refuses_retries_still_lets_the_call_try_a_level_it_has_not() -> None:
    # 2 tokens, retries while above 1: the first failure empties the budget.
    budget = TokenBudget("svc", TokenBudgetConfig(max_tokens=2, token_ratio=0.0))
    endpoints = [Endpoint("a"), Endpoint("b"), Endpoint("backup", priority=1)]
    r = Router("svc", endpoints, RouterConfig(retry=QUICK, breaker=WINDOW_ONLY), budget=budget)
    service = Service(down={"a", "b"})
    assert await r.call(service) == "backup"
    # b was not retried (the budget refused a retry on level 0), backup was tried:
    # the first attempt on a level the call had not tried retries nothing that failed.
    assert len(service.calls) == 2 and service.calls[-1] == "backup"
    service.down.add("backup")
    service.calls.clear()
    with pytest.raises(ConnectionRefusedError) as caught:
        await r.call(service)  # every level tried once: nothing more without the budget
    assert len(service.calls) == 2 and service.calls[-1] == "backup"
    assert final_reason(caught.value) == "retry budget exhausted"


async def test_a_fallthrough_attempt_the_budget_refused_earns_the_budget_nothing() -> None:
    # No floor, 50% of requests: the first failure's request allows 0.5 retries, too few.
    config = RatioBudgetConfig(ratio=0.5, min_per_second=0.0)
    endpoints = [Endpoint("a"), Endpoint("backup", priority=1)]
    with fake_clock():
        budget = RatioBudget("svc", config)
        r = Router("svc", endpoints, RouterConfig(retry=QUICK, breaker=WINDOW_ONLY), budget=budget)
        assert await r.call(Service(down={"a"})) == "backup"
        # One request (the call's first attempt); the attempt on backup was a retry the
        # budget refused: it must not count as a request that earns allowance.
        assert budget.allowance() == 0.5


async def test_a_fallthrough_attempt_the_budget_refused_neither_earns_nor_costs_tokens() -> None:
    budget = TokenBudget("svc", TokenBudgetConfig(max_tokens=2, token_ratio=1.0))
    endpoints = [Endpoint("a"), Endpoint("backup", priority=1)]
    r = Router("svc", endpoints, RouterConfig(retry=QUICK, breaker=WINDOW_ONLY), budget=budget)
    assert await r.call(Service(down={"a"})) == "backup"
    assert budget.tokens == 1.0  # a's failure cost one; backup's success was not granted


async def test_the_strict_rule_gives_up_when_the_budget_refuses() -> None:
    budget = TokenBudget("svc", TokenBudgetConfig(max_tokens=2, token_ratio=0.0))
    endpoints = [Endpoint("a"), Endpoint("backup", priority=1)]
    config = RouterConfig(retry=QUICK, breaker=WINDOW_ONLY, fallthrough="breaker")
    r = Router("svc", endpoints, config, budget=budget)
    service = Service(down={"a"})
    with pytest.raises(ConnectionRefusedError):
        await r.call(service)
    assert service.calls == ["a"]


async def test_a_server_delay_is_the_endpoints_so_the_call_goes_elsewhere_at_once() -> None:
    r = router(Endpoint("a"), Endpoint("backup", priority=1))

    async def call(endpoint: Endpoint) -> str:
        if endpoint.name == "a":
            raise Slowed("slow down", retry_after=10**6)  # past max_server_delay
        return endpoint.name

    with fake_clock() as clock:
        assert await r.call(call) == "backup"
    assert clock.slept == []  # neither waited nor given up: another endpoint could answer
    alone = router(Endpoint("a"))
    with fake_clock(), pytest.raises(Slowed) as caught:
        await alone.call(call)  # with nowhere else to go the delay stands: too long, give up
    assert caught.value.retry_after == 10**6


async def test_the_strict_rule_uses_a_lower_priority_only_when_every_endpoint_above_is_open() -> (
    None
):
    seen: list[events.Event] = []
    r = router(Endpoint("a"), Endpoint("b"), Endpoint("backup", priority=1), fallthrough="breaker")
    recording(seen, r)
    service = Service(down={"a", "b"})
    # The primaries fail but their breakers are not open yet: the call stays on level 0.
    with pytest.raises(ConnectionRefusedError):
        await r.call(service)
    assert set(service.calls) == {"a", "b"}
    # The third attempt's failure opened the primaries (2 consecutive failures each)...
    await r.call(service)  # ...one more call opens the other one, then falls through
    assert {s.name: s.state for s in r.states()}["a"] is BreakerState.OPEN
    assert {s.name: s.state for s in r.states()}["b"] is BreakerState.OPEN
    assert service.calls[-1] == "backup"
    assert await r.call(service) == "backup"
    assert any(isinstance(e, PriorityFallthrough) and e.to_priority == 1 for e in seen)


async def test_when_every_endpoint_refuses_the_call_fails_at_once_with_each_state() -> None:
    r = router(Endpoint("a"), Endpoint("b", priority=1))
    r.breaker("a").isolate()
    with fake_clock():
        r.breaker("b").allow().failure(ConnectionResetError())
        r.breaker("b").allow().failure(ConnectionResetError())
        service = Service()
        with pytest.raises(AllEndpointsDown) as caught:
            await r.call(service)
    assert service.calls == []  # nothing was tried
    error = caught.value
    assert [(e.name, e.state) for e in error.endpoints] == [
        ("a", BreakerState.FORCED_OPEN),
        ("b", BreakerState.OPEN),
    ]
    assert "a (priority 0): forced_open, may be tried never (isolated)" in str(error)
    assert "b (priority 1): open, may be tried in 30.000 s" in str(error)
    assert error.retry_after == 30.0
    assert final_reason(error) is not None  # no outer layer retries it either


async def test_endpoints_change_while_calls_run_and_keep_their_breakers() -> None:
    seen: list[events.Event] = []
    r = router(Endpoint("a"), Endpoint("b", priority=1))
    recording(seen, r)
    breaker_a = r.breaker("a")
    breaker_a.isolate()
    started, release = anyio.Event(), anyio.Event()

    async def slow(endpoint: Endpoint) -> str:
        started.set()
        await release.wait()
        return endpoint.name

    async with anyio.create_task_group() as tg:
        tg.start_soon(r.call, slow)
        await started.wait()
        r.remove("b")  # the running call finishes there all the same
        r.add(Endpoint("c", priority=2))
        r.set_priority("a", 3)
        release.set()
    assert r.breaker("a") is breaker_a and r.breaker("a").state is BreakerState.FORCED_OPEN
    assert [e.name for e in r.endpoints] == ["c", "a"]
    r.replace([Endpoint("a", "http://new-address", priority=0), Endpoint("d")])
    assert r.breaker("a") is breaker_a  # kept across replace, with its new priority
    assert [(e.name, e.priority) for e in r.endpoints] == [("a", 0), ("d", 0)]
    assert await r.call(Service()) == "d"
    changes = [(e.added, e.removed, e.reprioritised) for e in seen if isinstance(e, RoutingChanged)]
    assert changes == [
        ((), ("b",), ()),
        (("c",), (), ()),
        ((), (), ("a",)),
        (("d",), ("c",), ("a",)),
    ]
    with pytest.raises(KeyError, match="no endpoint 'zz'"):
        r.remove("zz")


# --- what is retried, and how long ---------------------------------------------------------


async def test_errors_that_are_not_retryable_end_the_call_at_once() -> None:
    calls: list[str] = []

    async def bad_request(endpoint: Endpoint) -> None:
        calls.append(endpoint.name)
        raise ValueError("bad payload")

    r = router(Endpoint("a"), Endpoint("b"))
    with pytest.raises(ValueError, match="bad payload"):
        await r.call(bad_request)
    assert len(calls) == 1
    # The caller decides what is retryable when it knows better.
    with pytest.raises(ValueError, match="bad payload"):
        await r.call(bad_request, retry_on=lambda exc: isinstance(exc, ValueError))
    assert len(calls) == 4


async def test_a_call_made_inside_another_does_not_take_its_retry_predicate() -> None:
    inner_calls: list[str] = []

    async def bad_request(endpoint: Endpoint) -> None:
        inner_calls.append(endpoint.name)
        raise ValueError("bad payload")

    inner = router(Endpoint("x"), Endpoint("y"), breaker=WINDOW_ONLY)

    async def through_inner(endpoint: Endpoint) -> None:
        await inner.call(bad_request)

    outer = router(Endpoint("a"), breaker=WINDOW_ONLY)
    with pytest.raises(ValueError, match="bad payload"):
        await outer.call(through_inner, retry_on=lambda exc: isinstance(exc, ValueError))
    # The outer call retried its 3 attempts; each inner call made one: not retryable there.
    assert len(inner_calls) == 3
    # Without any predicate around (the call's own coroutine, nothing set), the same.
    with pytest.raises(ValueError, match="bad payload"):
        await outer.call(through_inner)
    assert len(inner_calls) == 4


async def test_a_lone_best_endpoint_that_refuses_or_wants_permits_still_routes() -> None:
    r = router(Endpoint("a"), Endpoint("b", priority=1), Endpoint("c", priority=1))
    service = Service()
    r.breaker("a").isolate()
    assert await r.call(service) in ("b", "c")  # refused: the next level, first attempt
    r.breaker("a").reset()
    outcomes: list[events.Event] = []
    r.breaker("a").events.subscribe(outcomes.append, kinds=OutcomeRecorded)
    assert await r.call(service) == "a"  # through a permit: its outcome is an event
    assert [e.outcome for e in outcomes] == ["success"]  # type: ignore[attr-defined]


def test_call_returns_a_coroutine_that_runs_as_a_task() -> None:
    r = router(Endpoint("a"))

    async def main() -> str:
        return await asyncio.create_task(r.call(Service()))

    assert asyncio.run(main()) == "a"


async def test_attempts_are_counted_over_all_endpoints() -> None:
    r = router(Endpoint("a"), Endpoint("b"), Endpoint("c"))
    service = Service(down={"a", "b", "c"})
    with pytest.raises(ConnectionRefusedError) as caught:
        await r.call(service)
    assert len(service.calls) == 3 and len(set(service.calls)) == 3
    assert "gave up after 3 attempts" in caught.value.__notes__[-1]
    stats = r.statistics()
    assert (stats.calls, stats.failures, stats.attempts) == (1, 1, 3)


async def test_a_server_given_delay_is_waited_before_the_retry() -> None:
    class Throttled(RecoveryError):
        retryable = True

    answers = [Throttled("slow down", retry_after=1.5), "ok"]

    async def throttled(endpoint: Endpoint) -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    r = router(Endpoint("a"), retry=RetryConfig(max_attempts=3, base_delay=0.1, jitter=Jitter.NONE))
    with fake_clock() as clock:
        assert await r.call(throttled) == "ok"
    assert clock.slept == [1.5]


async def test_the_deadline_cancels_a_hanging_attempt_and_the_engine_accounts_it() -> None:
    seen: list[events.Event] = []
    r = router(Endpoint("a"), Endpoint("b"))
    recording(seen, r)

    async def hang(endpoint: Endpoint) -> None:
        await anyio.sleep_forever()

    with deadline(0.05), pytest.raises(DeadlineExceeded):
        await r.call(hang)
    [gave_up] = [e for e in seen if isinstance(e, GaveUp)]
    assert gave_up.reason is GiveUpReason.DEADLINE
    # Ended at the deadline, not never: nothing else bounds the hang (the slack is
    # for a loaded machine; the reason above is what proves the deadline did it).
    assert gave_up.elapsed < 0.05 + 2.0
    assert [s.in_flight for s in r.states()] == [0, 0]
    # The cancelled attempt counted as nothing on the endpoint's breaker.
    assert all(s.failure_rate in (None, 0.0) for s in r.states())


async def test_the_retry_budget_bounds_retries_across_calls() -> None:
    budget = TokenBudget("svc", TokenBudgetConfig(max_tokens=4, token_ratio=0.1))
    r = Router("svc", [Endpoint("a"), Endpoint("b")], RouterConfig(retry=QUICK), budget=budget)
    service = Service(down={"a", "b"})
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            await r.call(service)
    # 4 tokens, a failure costs one, retries only above 2: the first call retries once
    # (3 tokens left), then the budget refuses every retry.
    assert len(service.calls) == 2 + 1 + 1
    assert r.statistics().giveups[GiveUpReason.BUDGET] == 3


# --- hedging across endpoints --------------------------------------------------------------


async def test_a_hedge_on_another_endpoint_wins_when_the_first_is_slow() -> None:
    seen: list[events.Event] = []
    r = router(Endpoint("slow"), Endpoint("fast"), hedge=HedgeConfig(delay=0.01))
    recording(seen, r)
    r.breaker("fast").allow().failure(ConnectionResetError())  # so "slow" is chosen first
    cancelled: list[str] = []

    async def answer(endpoint: Endpoint) -> str:
        if endpoint.name == "slow":
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.append(endpoint.name)
        return endpoint.name

    assert await r.call(answer, hedge=True) == "fast"
    assert cancelled == ["slow"]  # the loser was cancelled before the call returned
    assert [e.hedge for e in seen if isinstance(e, HedgeStarted)] == [1]
    assert [e.attempt for e in seen if isinstance(e, HedgeWon)] == [1]
    states = {s.name: s for s in r.states()}
    assert states["slow"].in_flight == 0
    assert states["slow"].failure_rate == 0.0 or states["slow"].failure_rate is None


async def test_without_hedge_true_a_call_is_never_hedged() -> None:
    r = router(Endpoint("a"), Endpoint("b"), hedge=HedgeConfig(delay=0.0))
    service = Service()
    await r.call(service)
    assert len(service.calls) == 1


# --- cancellation --------------------------------------------------------------------------


async def test_cancellation_during_a_failover_is_not_retried_or_counted() -> None:
    r = router(
        Endpoint("a"), Endpoint("b"), breaker=BreakerConfig(keep_window=True, minimum_calls=1)
    )
    second = anyio.Event()
    calls: list[str] = []

    async def fail_then_hang(endpoint: Endpoint) -> None:
        calls.append(endpoint.name)
        if len(calls) == 1:
            raise ConnectionResetError("first endpoint dropped")
        second.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.call, fail_then_hang)
            await second.wait()  # the failover attempt is running
            scope.cancel()
    assert scope.cancelled_caught
    assert len(calls) == 2 and calls[0] != calls[1]  # failed over, then was cancelled
    snapshots = {n: r.breaker(n).snapshot() for n in ("a", "b")}
    assert snapshots[calls[0]].failures == 1
    assert snapshots[calls[1]].calls == 0  # the cancelled attempt counted as nothing
    assert [s.in_flight for s in r.states()] == [0, 0]
    stats = r.statistics()
    assert (stats.calls, stats.failures) == (0, 0)  # the call neither failed nor succeeded


async def test_cancellation_during_a_hedge_cancels_every_attempt() -> None:
    r = router(Endpoint("a"), Endpoint("b"), hedge=HedgeConfig(delay=0.0))
    running: list[str] = []
    finished: list[str] = []

    async def hang(endpoint: Endpoint) -> None:
        running.append(endpoint.name)
        try:
            await anyio.sleep_forever()
        finally:
            finished.append(endpoint.name)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(r.call, hang, hedge=True))
            await until(lambda: len(running) == 2)
            scope.cancel()
    assert sorted(running) == ["a", "b"]
    assert sorted(finished) == ["a", "b"]
    assert all(s.in_flight == 0 and s.state is BreakerState.CLOSED for s in r.states())
    assert all(r.breaker(n).snapshot().calls == 0 for n in ("a", "b"))


async def test_the_soonest_retry_after_is_reported_even_if_one_is_isolated() -> None:
    r = router(Endpoint("a"))
    r.breaker("a").isolate()
    with pytest.raises(AllEndpointsDown) as caught:
        await r.call(Service())
    assert caught.value.retry_after is None
    assert math.isinf(caught.value.endpoints[0].retry_after)


async def test_a_hedge_with_nowhere_to_go_leaves_the_running_attempt_alone() -> None:
    r = router(Endpoint("only"), hedge=HedgeConfig(delay=0.2))
    hedge_due = anyio.Event()
    r.bus.subscribe(lambda e: hedge_due.set() if isinstance(e, HedgeStarted) else None)
    release = anyio.Event()
    started: list[str] = []
    results: list[str] = []

    async def probe(endpoint: Endpoint) -> str:
        started.append(endpoint.name)
        await release.wait()
        return "answered"

    async def run() -> None:
        results.append(await r.call(probe, hedge=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await until(lambda: len(started) == 1)
        r.breaker("only").isolate()  # the only endpoint now refuses new calls
        with anyio.fail_after(5):
            await hedge_due.wait()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        release.set()
    # The hedge failed alone (NoHedgeTarget); the running attempt decided the call.
    assert results == ["answered"] and started == ["only"]


_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.lists(st.integers(min_value=-5, max_value=700), max_size=3),
    st.frozensets(st.integers(min_value=0, max_value=700), max_size=3),
    st.sampled_from(["call", "breaker", "ms", "s", "GET", "X-Deadline"]),
)


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(
        [
            (Endpoint, "name"),
            (Endpoint, "address"),
            (Endpoint, "priority"),
            (RouterConfig, "retry"),
            (RouterConfig, "breaker"),
            (RouterConfig, "hedge"),
            (RouterConfig, "fallthrough"),
            (HttpPolicy, "retry_statuses"),
            (HttpPolicy, "idempotent_methods"),
            (HttpPolicy, "overloaded_statuses"),
            (HttpPolicy, "overloaded_header"),
            (HttpPolicy, "deadline_header"),
            (HttpPolicy, "deadline_unit"),
        ]
    ),
    value=_anything,
)
def test_network_configuration_from_any_value_is_built_or_a_clear_error(
    field: tuple[type, str], value: object
) -> None:
    kind, name = field
    required = {"name": "a"} if kind is Endpoint and name != "name" else {}
    try:
        kind(**required, **{name: value})
    except (TypeError, ValueError) as exc:
        message = str(exc)
    else:
        return
    assert f"{kind.__name__}.{name}" in message
