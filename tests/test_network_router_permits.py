"""The router's permit-free attempts count exactly what attempts with permits count.

An attempt on an endpoint whose breaker is closed, judges no result and whose
per-call event (`OutcomeRecorded`) nobody wants takes no permit: its outcome
goes straight to the breaker.  These tests run the same calls both ways and
compare every breaker's counts, and check that a subscriber wanting only other
kinds keeps attempts permit-free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker, OutcomeRecorded, Permit
from datapunk_recovery.network import Endpoint, Router, RouterConfig
from datapunk_recovery.testing import fake_clock

QUICK = RetryConfig(max_attempts=3, base_delay=0.0)
ENDPOINTS = [Endpoint(n, priority=p) for p, names in enumerate(("ab", "cd")) for n in names]
#: A lone best endpoint (its first attempts ask only its grant), then a level of three.
LONE_FIRST = [Endpoint(n, priority=p) for p, names in enumerate(("a", "bcd")) for n in names]


def _calls(failing: frozenset[str]) -> Callable[[Endpoint], Awaitable[str]]:
    async def fn(endpoint: Endpoint) -> str:
        if endpoint.name in failing:
            raise ConnectionResetError(endpoint.name)
        return endpoint.name

    return fn


def _run(
    config: BreakerConfig,
    script: list[frozenset[str]],
    fallthrough: str,
    permits: bool,
    endpoints: list[Endpoint] = ENDPOINTS,
) -> list[object]:
    """Each call of ``script`` (the endpoints failing in it); every breaker's snapshot after."""
    seen: list[object] = []
    with fake_clock(1000.0) as clock:
        r = Router(
            "svc", endpoints, RouterConfig(retry=QUICK, breaker=config, fallthrough=fallthrough)
        )  # type: ignore[arg-type]
        if permits:
            for e in endpoints:
                r.breaker(e.name).events.subscribe(lambda event: None, kinds=OutcomeRecorded)

        async def main() -> None:
            for failing in script:
                try:
                    seen.append(await r.call(_calls(failing)))
                except Exception as exc:
                    seen.append(type(exc).__name__)
                seen.append([r.breaker(e.name).snapshot() for e in endpoints])
                clock.advance(0.4)

        asyncio.run(main())
    return seen


@st.composite
def breaker_configs(draw: st.DrawFn) -> BreakerConfig:
    size = draw(st.integers(1, 5))
    return BreakerConfig(
        consecutive_failures=draw(st.one_of(st.none(), st.integers(1, 3))),
        failure_rate_threshold=draw(st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0]))),
        window_size=size,
        minimum_calls=draw(st.integers(1, size)),
        keep_window=True,
        open_duration=1.0,
    )


@settings(max_examples=40, deadline=None)
@given(
    config=breaker_configs(),
    script=st.lists(st.frozensets(st.sampled_from("abcd")), max_size=12),
    fallthrough=st.sampled_from(["call", "breaker"]),
    endpoints=st.sampled_from([ENDPOINTS, LONE_FIRST]),
)
def test_attempts_without_permits_count_what_attempts_with_permits_count(
    config: BreakerConfig,
    script: list[frozenset[str]],
    fallthrough: str,
    endpoints: list[Endpoint],
) -> None:
    without = _run(config, script, fallthrough, permits=False, endpoints=endpoints)
    assert without == _run(config, script, fallthrough, permits=True, endpoints=endpoints)


def test_a_subscriber_wanting_other_kinds_keeps_router_attempts_permit_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[Permit] = []
    allow_async = CircuitBreaker.allow_async

    async def counting(self: CircuitBreaker) -> Permit:
        permit = await allow_async(self)
        taken.append(permit)
        return permit

    monkeypatch.setattr(CircuitBreaker, "allow_async", counting)
    unsubscribe = events.subscribe(lambda event: None, kinds=("retry.giveup",))
    try:
        r = Router("svc", ENDPOINTS, RouterConfig(retry=QUICK))
        assert asyncio.run(r.call(_calls(frozenset("a")))) == "b"
        assert taken == []
        a, b = r.breaker("a").snapshot(), r.breaker("b").snapshot()
        assert (a.calls, a.failures, b.calls, b.failures) == (1, 1, 1, 0)
        # Wanting the per-call event takes attempts through permits again.
        r.breaker("b").events.subscribe(lambda event: None, kinds=OutcomeRecorded)
        asyncio.run(r.call(_calls(frozenset())))
        assert len(taken) == 1
    finally:
        unsubscribe()
