"""The retry engine under a deadline: each attempt gets only the time left.

The async engine cancels an attempt that would run past the call's deadline;
the timeout it gives a later attempt must count from that attempt's start,
observed or not (it used to count from the call's start when nobody listened).
"""

from __future__ import annotations

from typing import Any

import pytest

from datapunk_recovery import RetryConfig, retry


@pytest.mark.anyio
async def test_a_later_attempt_under_a_deadline_gets_only_the_time_left_when_unobserved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datapunk_recovery._execution import runtime as _runtime
    from datapunk_recovery.testing import fake_clock

    timeouts: list[float] = []
    real = _runtime.call_within

    async def spy(fn: Any, args: Any, kwargs: Any, timeout: float) -> Any:
        timeouts.append(timeout)
        return await real(fn, args, kwargs, timeout)

    monkeypatch.setattr(_runtime, "call_within", spy)
    with fake_clock() as clock:
        left = [1]

        @retry(RetryConfig(max_attempts=2, deadline=1.0, base_delay=0.0), name="deadline")
        async def call() -> str:
            if left[0]:
                left[0] -= 1
                clock.advance(0.6)
                raise ConnectionError("reset")
            return "ok"

        assert await call() == "ok"
    assert timeouts == [pytest.approx(1.0), pytest.approx(0.4)]
