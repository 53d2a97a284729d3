"""Fallbacks: a value or a function when the call fails with chosen errors or results."""

from __future__ import annotations

import anyio
import pytest

from datapunk_recovery._core import events
from datapunk_recovery.flow.fallback import Fallback, FallbackReason, FallbackUsed


def failing() -> int:
    raise ConnectionError("down")


def test_a_value_answers_a_failed_call_and_it_is_an_event() -> None:
    fallback = Fallback(0, name="price")
    seen: list[events.Event] = []
    fallback.bus.subscribe(seen.append)
    assert fallback.call(failing) == 0
    assert fallback.call(lambda: 7) == 7  # a success passes through
    assert len(seen) == 1
    used = seen[0]
    assert isinstance(used, FallbackUsed)
    assert (used.operation, used.trigger, used.error_type) == ("price", "error", "ConnectionError")


def test_a_handler_gets_the_reason() -> None:
    reasons: list[FallbackReason] = []

    def handler(reason: FallbackReason) -> int:
        reasons.append(reason)
        return -1

    assert Fallback(handler=handler).call(failing) == -1
    assert isinstance(reasons[0].error, ConnectionError)


def test_only_chosen_errors_trigger_it() -> None:
    fallback = Fallback(0, on=ConnectionError)
    with pytest.raises(KeyError):
        fallback.call(dict[str, int]().__getitem__, "missing")
    by_predicate = Fallback(0, on=lambda exc: "down" in str(exc))
    assert by_predicate.call(failing) == 0


def test_rejected_results_trigger_it() -> None:
    fallback = Fallback[list[int]](handler=lambda r: [0], on_result=lambda r: r == [])
    assert fallback.call(list) == [0]
    assert fallback.call(lambda: [1]) == [1]


def test_cancellation_never_triggers_it() -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Fallback(0).call(interrupted)
    with pytest.raises(TypeError, match="cancellation can never trigger a fallback"):
        Fallback(0, on=BaseException)  # type: ignore[arg-type]


def test_exactly_one_of_value_or_handler() -> None:
    with pytest.raises(TypeError, match="exactly one of value= or handler="):
        Fallback()
    with pytest.raises(TypeError, match="exactly one of value= or handler="):
        Fallback(1, handler=lambda r: 2)


def test_an_async_handler_needs_an_async_call() -> None:
    async def handler(reason: FallbackReason) -> int:
        return 0

    with pytest.raises(TypeError, match="an async handler needs an async call"):
        Fallback(handler=handler).call(failing)


@pytest.mark.anyio
async def test_async_calls_and_async_handlers() -> None:
    async def handler(reason: FallbackReason) -> str:
        await anyio.lowlevel.checkpoint()
        return "cached"

    @Fallback(handler=handler)
    async def fetch() -> str:
        raise ConnectionError("down")

    assert await fetch() == "cached"


@pytest.mark.anyio
async def test_async_cancellation_never_triggers_it() -> None:
    @Fallback("cached")
    async def hang() -> str:
        await anyio.sleep_forever()
        return "never"

    with anyio.CancelScope() as scope:
        scope.cancel()
        await hang()
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_an_error_raised_by_a_handler_is_chained_to_the_original() -> None:
    async def handler(reason: FallbackReason) -> str:
        await anyio.lowlevel.checkpoint()
        raise LookupError("no cached copy either")

    def sync_handler(reason: FallbackReason) -> str:
        raise LookupError("no cached copy either")

    async def fetch() -> str:
        raise ConnectionError("down")

    with pytest.raises(LookupError) as info:
        await Fallback(handler=handler).call_async(fetch)
    assert isinstance(info.value.__context__, ConnectionError)
    with pytest.raises(LookupError) as info:
        Fallback(handler=sync_handler).call(failing)
    assert isinstance(info.value.__context__, ConnectionError)
