"""Helpers for testing code that uses the library.

``instant_retries()`` makes every retry happen at once (delays are still
computed and reported, only the sleeping is skipped), globally with
[`set_instant_retries()`][datapunk_recovery.testing.set_instant_retries] or inside a ``with`` block.
``fake_clock()``
installs a [`FakeClock`][datapunk_recovery._core.clock.FakeClock]: sleeps advance it,
deadlines and breaker windows follow it, and nothing waits for real.
``record_events()`` collects every event into an
[`EventRecorder`][datapunk_recovery.testing.EventRecorder] that
answers "did it retry?" and "did the breaker open?".  ``isolated()`` puts the
library's process-wide state back as it found it (event subscribers, error
classification rules, instant mode, the clock, the chaos kill switch).

The pytest plugin ([`datapunk_recovery.pytest_plugin`][datapunk_recovery.pytest_plugin], installed
with the
package) offers each of them as a fixture.
``forget_classifications()`` empties the per-type verdicts that
[`classify()`][datapunk_recovery._core.errors.classify] remembers, so that a test sees the
classifier at work whatever ran before it in the same process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from . import chaos
from ._core import clock, errors, events
from ._core.clock import FakeClock
from ._core.events import Event, RetryScheduled
from ._execution import runtime as _runtime

__all__ = [
    "EventRecorder",
    "FakeClock",
    "fake_clock",
    "forget_classifications",
    "instant_retries",
    "isolated",
    "record_events",
    "set_instant_retries",
]

E = TypeVar("E", bound=Event)


def forget_classifications() -> None:
    """Forget every verdict [`classify()`][datapunk_recovery._core.errors.classify] remembered per
    type.

    The remembered verdicts only save time; a test that starts from none checks
    the classifier itself, not what an earlier test left behind.
    """
    errors.forget_verdicts()


def set_instant_retries(on: bool) -> None:
    """Switch instant retries on or off for the whole process."""
    _runtime.set_instant(on)


@contextmanager
def instant_retries() -> Iterator[None]:
    """Within the block, no retry waits."""
    previous = _runtime.set_instant(True)
    try:
        yield
    finally:
        _runtime.set_instant(previous)


@contextmanager
def fake_clock(start: float = 0.0) -> Iterator[FakeClock]:
    """Within the block, the library runs on a fake clock (yielded)."""
    previous = clock.current_fake()
    fake = FakeClock(start)
    clock.use_clock(fake)
    try:
        yield fake
    finally:
        clock.use_clock(previous)


class EventRecorder:
    """Every event the library emitted while subscribed, in order, with questions about them.

    A subscriber: ``events.subscribe(recorder)``, or use
    [`record_events()`][datapunk_recovery.testing.record_events].
    Events carry names and numbers only (see
    [`datapunk_recovery._core.events`][datapunk_recovery._core.events]),
    so asserting on them never depends on an error message.
    """

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"EventRecorder({self.names()!r})"

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self.events.clear()

    def names(self) -> list[str]:
        """The events' names in order (``"retry.scheduled"``, ``"breaker.state"``...)."""
        return [event.name for event in self.events]

    @overload
    def of(self, kind: type[E], *, operation: str | None = None) -> list[E]: ...

    @overload
    def of(self, kind: str, *, operation: str | None = None) -> list[Event]: ...

    def of(self, kind: type[Any] | str, *, operation: str | None = None) -> list[Any]:
        """The events of a class, a name (``"breaker.state"``) or an area (``"breaker"``).

        ``operation`` keeps only those of one operation (a function's qualified
        name, a breaker's name).
        """

        def wanted(event: Event) -> bool:
            if isinstance(kind, type):
                return isinstance(event, kind)
            return kind in (event.name, event.area)

        return [
            event
            for event in self.events
            if wanted(event) and (operation is None or event.operation == operation)
        ]

    def retries(self, operation: str | None = None) -> list[float]:
        """The delays, in seconds, of the retries scheduled (of ``operation``)."""
        return [event.delay for event in self.of(RetryScheduled, operation=operation)]

    def transitions(self, operation: str | None = None) -> list[tuple[str, str]]:
        """The breaker state changes (of the breaker named ``operation``), as ``(from, to)``."""
        from .breaker import BreakerStateChanged

        return [
            (str(event.from_state), str(event.to_state))
            for event in self.of(BreakerStateChanged, operation=operation)
        ]


@contextmanager
def record_events() -> Iterator[EventRecorder]:
    """Within the block, every event of the library is recorded (yielded recorder)."""
    recorder = EventRecorder()
    unsubscribe = events.subscribe(recorder)
    try:
        yield recorder
    finally:
        unsubscribe()


@contextmanager
def isolated() -> Iterator[None]:
    """Whatever the block changes in the library's process-wide state is undone at its end.

    Restored: the global event subscribers, the error classification rules
    ([`register_rule()`][datapunk_recovery._core.errors.register_rule]), instant retries, the
    installed clock and the chaos kill switch.  Objects the block created
    (breakers, registries, budgets) are its own and need no restoring.
    """
    subscribers = events.global_bus.subscriptions()
    rules = errors.registered_rules()
    instant = _runtime._instant
    fake = clock.current_fake()
    chaos_on = chaos.all_enabled()
    try:
        yield
    finally:
        events.global_bus.restore(subscribers)
        errors.restore_rules(rules)
        _runtime.set_instant(instant)
        clock.use_clock(fake)
        if chaos_on != chaos.all_enabled():
            (chaos.enable_all if chaos_on else chaos.disable_all)()
