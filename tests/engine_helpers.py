"""Helpers shared by the retry engine's test modules."""

from __future__ import annotations

from typing import Any

from datapunk_recovery import current_attempt
from datapunk_recovery._core.clock import FakeClock


class Flaky:
    """A callable that fails ``failures`` times with ``error``, then returns ``value``.

    Each call advances ``clock`` (when given) by ``takes`` seconds, and
    records the engine's attempt number in ``attempts_seen``.
    """

    def __init__(
        self,
        failures: int,
        error: type[Exception] = ConnectionError,
        value: Any = "ok",
        takes: float = 0.0,
        clock: FakeClock | None = None,
    ) -> None:
        self.failures, self.error, self.value = failures, error, value
        self.takes, self.clock = takes, clock
        self.calls = 0
        self.attempts_seen: list[int] = []

    def __call__(self) -> Any:
        self.calls += 1
        self.attempts_seen.append(current_attempt())
        if self.clock is not None:
            self.clock.advance(self.takes)
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return self.value
