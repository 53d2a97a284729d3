"""The httpx adapter against real HTTP servers on loopback (and the fault proxy).

Endpoints answer 503 with Retry-After, hang, or have their connections reset by
the harness's proxy; calls fail over by priority, hedges win, the deadline is
kept by the engine's own accounting, budgets hold and no connection leaks.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from datapunk_recovery import RecoveryStrategies
from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import DeadlineExceeded, OverloadedError, final_reason
from datapunk_recovery._core.events import GaveUp, GiveUpReason
from datapunk_recovery._execution.deadline import deadline
from datapunk_recovery.breaker import BreakerConfig, BreakerState
from datapunk_recovery.budget import TokenBudget, TokenBudgetConfig
from datapunk_recovery.flow.hedging import HedgeConfig, HedgeWon
from datapunk_recovery.network import AllEndpointsDown, Endpoint, FailedOver, Router, RouterConfig
from datapunk_recovery.network.http import HttpPolicy, HttpStatusError
from datapunk_recovery.network.httpx import HttpxRecovery, retryable_httpx_error
from datapunk_recovery.testing import fake_clock
from tests.harness import ThreadedProxy
from tests.network_servers import (
    Reply,
    ScriptedServer,
    dropping_server,
    refused_address,
    scripted_servers,
)

pytestmark = pytest.mark.anyio

UNAVAILABLE = Reply(503, {"Retry-After": "0"})
HANG = Reply(hang=True)
TRIP_AT_2 = BreakerConfig(consecutive_failures=2, keep_window=True, minimum_calls=1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def servers() -> Iterator[dict[str, ScriptedServer]]:
    with scripted_servers("p1", "p2", "s1") as started:
        yield started


def routed(*endpoints: Endpoint, attempts: int = 3, **config: object) -> Router:
    settings: dict[str, object] = {
        "retry": RetryConfig(max_attempts=attempts, base_delay=0.0),
        "breaker": TRIP_AT_2,
        **config,
    }
    return Router("api", endpoints, RouterConfig(**settings))  # type: ignore[arg-type]


def pool_is_idle(client: httpx.AsyncClient) -> bool:
    """Every connection of the client's pool is idle or closed: nothing leaked."""
    pool = client._transport._pool  # type: ignore[attr-defined]
    return all(c.is_idle() or c.is_closed() for c in pool.connections)


def recorded(router: Router) -> list[events.Event]:
    seen: list[events.Event] = []
    router.bus.subscribe(seen.append)
    return seen


@pytest.mark.drill
@pytest.mark.parametrize("fallthrough", ["call", "breaker"])
async def test_calls_fail_over_by_priority_through_503s_and_resets(
    servers: dict[str, ScriptedServer],
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
    fallthrough: str,
) -> None:
    p1, p2, s1 = servers["p1"], servers["p2"], servers["s1"]
    p1.answer(default=UNAVAILABLE)
    resetting = make_proxy(p2.address)
    resetting.cut_after_bytes(0, times=None)  # every connection is reset on its first byte
    router = routed(
        Endpoint("p1", p1.url),
        Endpoint("p2", f"http://127.0.0.1:{resetting.port}"),
        Endpoint("s1", s1.url, priority=1),
        attempts=5,
        fallthrough=fallthrough,
    )
    seen = recorded(router)
    async with httpx.AsyncClient() as client:
        response = await HttpxRecovery(client, router).get("/items")
        assert (response.status_code, response.text) == (200, "s1")
        assert pool_is_idle(client)
    hops = [(e.from_endpoint, e.to_endpoint) for e in seen if isinstance(e, FailedOver)]
    states = {s.name: s.state for s in router.states()}
    assert len(s1.seen) == 1 and hops[-1][1] == "s1"
    if fallthrough == "call":
        # Each primary failed once in the call: the call falls through at once.
        assert (len(p1.seen), resetting.stats.cuts, len(hops)) == (1, 1, 2)
        assert set(states.values()) == {BreakerState.CLOSED}
        return
    # The strict rule: both primaries tried twice (their breakers open at 2) first.
    assert (len(p1.seen), resetting.stats.cuts, len(hops)) == (2, 2, 4)
    assert states == {"p1": BreakerState.OPEN, "p2": BreakerState.OPEN, "s1": BreakerState.CLOSED}


async def test_a_retry_after_in_seconds_is_waited(servers: dict[str, ScriptedServer]) -> None:
    p1 = servers["p1"].answer(Reply(503, {"Retry-After": "2"}))
    router = routed(Endpoint("p1", p1.url))
    with fake_clock() as clock:
        async with httpx.AsyncClient() as client:
            response = await HttpxRecovery(client, router).get("/")
            assert pool_is_idle(client)
    assert response.status_code == 200
    assert clock.slept == [2.0]


async def test_a_retry_after_date_too_far_away_makes_the_call_give_up(
    servers: dict[str, ScriptedServer],
) -> None:
    in_an_hour = email.utils.formatdate(time.time() + 3600, usegmt=True)
    p1 = servers["p1"].answer(Reply(503, {"Retry-After": in_an_hour}))
    router = routed(
        Endpoint("p1", p1.url),
        retry=RetryConfig(max_attempts=3, base_delay=0.0, max_server_delay=60),
    )
    async with httpx.AsyncClient() as client:
        with pytest.raises(HttpStatusError) as caught:
            await HttpxRecovery(client, router).get("/")
        assert pool_is_idle(client)  # the 503 was closed before giving up
    assert caught.value.status == 503
    assert caught.value.retry_after is not None and 3500 < caught.value.retry_after <= 3600
    assert "max_server_delay=60 s" in caught.value.__notes__[-1]
    assert len(p1.seen) == 1


async def test_a_hedge_wins_when_the_primary_is_slow(servers: dict[str, ScriptedServer]) -> None:
    p1, p2 = servers["p1"].answer(default=HANG), servers["p2"]
    router = routed(Endpoint("p1", p1.url), Endpoint("p2", p2.url), hedge=HedgeConfig(delay=0.05))
    router.breaker("p2").allow().failure(ConnectionResetError())  # so p1 is tried first
    seen = recorded(router)
    async with httpx.AsyncClient() as client:
        response = await HttpxRecovery(client, router).get("/quote")
        assert response.text == "p2"
        assert pool_is_idle(client)  # the losing request's connection was closed, not leaked
    assert [e.attempt for e in seen if isinstance(e, HedgeWon)] == [1]
    assert (len(p1.seen), len(p2.seen)) == (1, 1)


async def test_the_deadline_is_kept_and_sent_downstream(servers: dict[str, ScriptedServer]) -> None:
    p1 = servers["p1"].answer(default=HANG)
    router = routed(Endpoint("p1", p1.url))
    seen = recorded(router)
    policy = HttpPolicy(deadline_header="X-Deadline-Ms")
    async with httpx.AsyncClient() as client:
        with deadline(0.3), pytest.raises(DeadlineExceeded):
            await HttpxRecovery(client, router, policy).get("/slow")
        assert pool_is_idle(client)
    [request] = p1.seen
    assert 0 < int(request.headers["X-Deadline-Ms"]) <= 300
    [gave_up] = [e for e in seen if isinstance(e, GaveUp)]
    assert gave_up.reason is GiveUpReason.DEADLINE
    # Cancelled at the deadline, by the engine's clock: far sooner than httpx's own
    # 5 s read timeout would have ended the hang (slack for a loaded machine).
    assert gave_up.elapsed < 0.3 + 2.0


async def test_a_post_is_not_retried_unless_the_caller_says_it_is_safe(
    servers: dict[str, ScriptedServer],
) -> None:
    p1 = servers["p1"].answer(default=UNAVAILABLE)
    p2 = servers["p2"]
    router = routed(Endpoint("p1", p1.url), Endpoint("p2", p2.url))
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    async with httpx.AsyncClient() as client:
        recovery = HttpxRecovery(client, router)
        with pytest.raises(HttpStatusError) as caught:
            await recovery.post("/orders", json={"n": 1})
        assert not caught.value.retryable and (len(p1.seen), len(p2.seen)) == (1, 0)
        response = await recovery.post("/orders", json={"n": 1}, idempotent=True)
        assert response.text == "p2"
        assert pool_is_idle(client)


async def test_a_request_that_never_left_is_retried_even_for_a_post(
    servers: dict[str, ScriptedServer],
    make_proxy: Callable[[tuple[str, int]], ThreadedProxy],
) -> None:
    refusing = make_proxy(servers["p1"].address)
    refusing.stop_listening()
    router = routed(
        Endpoint("gone", f"http://127.0.0.1:{refusing.port}"), Endpoint("p2", servers["p2"].url)
    )
    router.breaker("p2").allow().failure(ConnectionResetError())  # "gone" first
    async with httpx.AsyncClient() as client:
        response = await HttpxRecovery(client, router).post("/orders")
    assert response.text == "p2"


async def test_overloaded_answers_stop_every_layer(servers: dict[str, ScriptedServer]) -> None:
    p1, p2 = servers["p1"], servers["p2"]
    policy = HttpPolicy(overloaded_header="X-Overloaded")
    async with httpx.AsyncClient() as client:
        for overloaded in ({"X-Overloaded": "1"}, {"grpc-retry-pushback-ms": "-1"}):
            p1.answer(Reply(503, overloaded))
            router = routed(Endpoint("p1", p1.url), Endpoint("p2", p2.url))
            router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
            with pytest.raises(OverloadedError) as caught:
                await HttpxRecovery(client, router, policy).get("/")
            assert final_reason(caught.value) is not None
        assert pool_is_idle(client)
    assert len(p1.seen) == 2 and p2.seen == []  # never retried elsewhere


async def test_the_retry_budget_holds_when_everything_fails(
    servers: dict[str, ScriptedServer],
) -> None:
    for name in ("p1", "p2"):
        servers[name].answer(default=UNAVAILABLE)
    budget = TokenBudget("api", TokenBudgetConfig(max_tokens=10, token_ratio=0.1))
    router = Router(
        "api",
        [Endpoint("p1", servers["p1"].url), Endpoint("p2", servers["p2"].url)],
        RouterConfig(
            retry=RetryConfig(max_attempts=3, base_delay=0.0),
            breaker=BreakerConfig(consecutive_failures=1000),
        ),
        budget=budget,
    )
    calls = 20
    async with httpx.AsyncClient() as client:
        recovery = HttpxRecovery(client, router)
        for _ in range(calls):
            with pytest.raises(HttpStatusError):
                await recovery.get("/")
        assert pool_is_idle(client)
    sent = len(servers["p1"].seen) + len(servers["p2"].seen)
    # Without a budget: 60 requests.  gRPC throttling allows retries while > 5 tokens.
    assert calls < sent <= calls + 5


async def test_no_secret_reaches_errors_or_events(servers: dict[str, ScriptedServer]) -> None:
    p1 = servers["p1"].answer(default=UNAVAILABLE)
    address = p1.url.replace("http://", "http://svc:hunter2@")
    router = routed(Endpoint("p1", address), attempts=4)  # the breaker opens after 2
    seen = recorded(router)
    async with httpx.AsyncClient() as client:
        with pytest.raises(AllEndpointsDown) as caught:
            await HttpxRecovery(client, router).get(
                "/pay?token=tok-123", headers={"Authorization": "Bearer tok-456"}
            )
    assert "Authorization" in p1.seen[0].headers  # credentials were sent...
    last = caught.value.__cause__  # the last answer, which opened the breaker
    assert isinstance(last, HttpStatusError)
    text = "".join(str(e) + "".join(getattr(e, "__notes__", ())) for e in (caught.value, last))
    text += repr(seen) + repr(router.endpoints)
    for secret in ("hunter2", "c3ZjOmh1bnRlcjI", "tok-123", "tok-456"):
        assert secret not in text  # ...and reported nowhere


def test_which_transport_errors_are_retried() -> None:
    request = httpx.Request("POST", "http://x")
    assert retryable_httpx_error(httpx.ConnectError("refused", request=request), idempotent=False)
    assert not retryable_httpx_error(httpx.ReadError("reset", request=request), idempotent=False)
    assert retryable_httpx_error(httpx.ReadError("reset", request=request), idempotent=True)
    assert not retryable_httpx_error(httpx.UnsupportedProtocol("ftp", request=request), True)


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "Wed, 21 Oct 2015 07:28:00 +99999999999999999999"},
        {"Retry-After": "Wed, 21 Oct 99999999999999999999 07:28:00 GMT"},
        {"Retry-After": "1_000"},
        {"X-RateLimit-Reset": "1e400"},
        {"grpc-retry-pushback-ms": "+5"},
    ],
)
async def test_a_hostile_delay_header_is_ignored_and_the_call_fails_over(
    servers: dict[str, ScriptedServer], headers: dict[str, str]
) -> None:
    p1 = servers["p1"].answer(default=Reply(503, headers))
    router = routed(Endpoint("p1", p1.url), Endpoint("p2", servers["p2"].url))
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    seen = recorded(router)
    async with httpx.AsyncClient() as client:
        response = await HttpxRecovery(client, router).get("/")
    assert response.text == "p2"
    assert len(p1.seen) == 1
    assert [type(e) for e in seen if isinstance(e, events.HintIgnored)] == [events.HintIgnored]


async def test_a_dropped_pooled_connection_costs_one_counted_attempt() -> None:
    with dropping_server(answered=1) as server:
        router = routed(Endpoint("only", server.url))
        async with httpx.AsyncClient() as client:
            recovery = HttpxRecovery(client, router)
            assert (await recovery.get("/warm")).status_code == 200  # the connection is pooled
            assert (await recovery.delete("/item")).status_code == 200
    assert router.statistics().attempts == server.requests == 3


async def test_with_the_defaults_failing_primaries_cost_the_caller_nothing(
    servers: dict[str, ScriptedServer],
) -> None:
    # Two primaries at priority 0 (one answers 503, one refuses connections), a
    # healthy secondary at priority 1, the router's default configuration and
    # the default retry budget (gRPC's: 10 tokens, a failure costs one, retries
    # while more than 5 are left), as a new user has them.
    p1, s1 = servers["p1"].answer(default=UNAVAILABLE), servers["s1"]
    router = Router(
        "api",
        [
            Endpoint("p1", p1.url),
            Endpoint("p2", refused_address()),
            Endpoint("s1", s1.url, priority=1),
        ],
        budget=TokenBudget("api"),
    )
    assert router.config.fallthrough == "call"
    seen = recorded(router)
    with fake_clock():
        async with httpx.AsyncClient() as client:
            api = HttpxRecovery(client, router)
            answers = [(await api.get(f"/item/{i}")).text for i in range(30)]
        states = {s.name: s.state for s in router.states()}
    assert answers == ["s1"] * 30  # zero caller-visible failures
    # Each call tried each primary at most once (once the budget ran low, only
    # one of them: no retry on level 0, straight to the untried level 1); once
    # their breakers opened (5 failures in a row) calls went to the secondary.
    assert len(p1.seen) == 5 and len(s1.seen) == 30
    assert states == {"p1": BreakerState.OPEN, "p2": BreakerState.OPEN, "s1": BreakerState.CLOSED}
    stats = router.statistics()
    assert (stats.failures, stats.attempts) == (0, 30 + 2 * 5)
    assert sum(isinstance(e, events.GaveUp) for e in seen) == 0


async def test_the_primaries_take_the_calls_back_once_their_breakers_let_a_probe_through(
    servers: dict[str, ScriptedServer],
) -> None:
    p1, s1 = servers["p1"].answer(*[UNAVAILABLE] * 5), servers["s1"]
    router = Router("api", [Endpoint("p1", p1.url), Endpoint("s1", s1.url, priority=1)])
    with fake_clock() as clock:
        async with httpx.AsyncClient() as client:
            api = HttpxRecovery(client, router)
            for _ in range(6):
                assert (await api.get("/")).text == "s1"
            clock.advance(router.config.breaker.open_duration)
            assert (await api.get("/")).text == "p1"  # recovered: the primary again
    assert len(p1.seen) == 6


async def test_a_client_whose_hook_raises_for_status_still_fails_over(
    servers: dict[str, ScriptedServer],
) -> None:
    p1 = servers["p1"].answer(Reply(503), Reply(404))

    async def raise_for_status(response: httpx.Response) -> None:
        response.raise_for_status()

    router = routed(Endpoint("p1", p1.url), Endpoint("p2", servers["p2"].answer(Reply(200)).url))
    router.breaker("p2").allow().failure(ConnectionResetError())  # p1 first
    async with httpx.AsyncClient(event_hooks={"response": [raise_for_status]}) as client:
        api = HttpxRecovery(client, router)
        assert (await api.get("/")).text == "p2"  # a 503 raised by the hook is retried elsewhere
        router.breaker("p2").isolate()
        with pytest.raises(httpx.HTTPStatusError) as caught:
            await api.get("/missing")  # a 404 is not retried: the hook's error reaches the caller
    assert caught.value.response.status_code == 404
    assert len(p1.seen) == 2


@pytest.mark.parametrize(
    "retry_after", ["99999999999999999999", "Fri, 31 Dec 9999 23:59:59 GMT", "604800"]
)
async def test_an_absurd_but_valid_delay_from_one_endpoint_sends_the_call_elsewhere(
    servers: dict[str, ScriptedServer], retry_after: str
) -> None:
    p1 = servers["p1"].answer(default=Reply(503, {"Retry-After": retry_after}))
    router = routed(Endpoint("p1", p1.url), Endpoint("s1", servers["s1"].url, priority=1))
    with fake_clock() as clock:
        async with httpx.AsyncClient() as client:
            api = HttpxRecovery(client, router)
            assert (await api.get("/")).text == "s1"
            # With nowhere else to go, the delay stands and is too long: give up at once.
            router.breaker("s1").isolate()
            with pytest.raises(HttpStatusError) as caught:
                await api.get("/")
    assert clock.slept == []
    assert caught.value.retry_after is not None and caught.value.retry_after > 300
    assert "max_server_delay" in caught.value.__notes__[-1]


async def test_a_new_user_of_the_facade_sees_no_failure_while_the_secondary_answers(
    servers: dict[str, ScriptedServer],
) -> None:
    # The facade with nothing but the endpoints: default retries, breakers and budget.
    p1, s1 = servers["p1"].answer(default=UNAVAILABLE), servers["s1"]
    config = {
        "services": {
            "api": {
                "endpoints": ["p1", "p2", "s1"],
                "priorities": {"p1": 0, "p2": 0, "s1": 1},
                "addresses": {"p1": p1.url, "p2": refused_address(), "s1": s1.url},
            }
        }
    }
    recovery = RecoveryStrategies.from_config(config, environ={})
    router = recovery.router("api")
    assert router is not None

    with fake_clock():
        async with httpx.AsyncClient() as client:
            api = HttpxRecovery(client, router)
            answers = [(await api.get(f"/item/{i}")).text for i in range(20)]
    assert answers == ["s1"] * 20
    assert len(p1.seen) <= 5  # until its breaker opened
