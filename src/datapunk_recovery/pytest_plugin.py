"""The pytest plugin: fixtures for testing code that uses datapunk-recovery.

Installed with the package (a ``pytest11`` entry point, no extra), so these
fixtures are available in every test of a project that has the package:

- ``recovery_instant``: retries of the test do not wait (delays are still
  computed and reported in events, only the sleeping is skipped);
- ``recovery_clock``: a [`FakeClock`][datapunk_recovery._core.clock.FakeClock] for the
  test: sleeps advance it, deadlines, breaker windows and budgets follow it,
  and ``recovery_clock.slept`` lists every sleep in seconds;
- ``recovery_events``: an [`EventRecorder`][datapunk_recovery.testing.EventRecorder] of
  every event of the test (``.retries()``, ``.transitions()``, ``.of(...)``);
- ``recovery_isolated``: the library's process-wide state (event subscribers,
  error classification rules, instant mode, the clock, the chaos kill switch)
  is put back as it was after the test.  The other three fixtures use it.

Fixtures are opt-in: nothing changes in a test that does not ask for one.
Disable the plugin with ``-p no:datapunk_recovery``.  See
[docs/testing.md](https://datapunk.github.io/datapunk-recovery/testing/).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._core.clock import FakeClock
    from .testing import EventRecorder

__all__ = ["recovery_clock", "recovery_events", "recovery_instant", "recovery_isolated"]


@pytest.fixture
def recovery_isolated() -> Iterator[None]:
    """Undo, after the test, whatever it changed in the library's process-wide state."""
    from .testing import isolated

    with isolated():
        yield


@pytest.fixture
def recovery_instant(recovery_isolated: None) -> None:
    """Retries in this test happen at once; their delays are still computed and reported."""
    from .testing import set_instant_retries

    set_instant_retries(True)


@pytest.fixture
def recovery_clock(recovery_isolated: None) -> FakeClock:
    """A fake clock installed for the test (time starts at 0.0 seconds)."""
    from ._core.clock import FakeClock, use_clock

    fake = FakeClock(0.0)
    use_clock(fake)
    return fake


@pytest.fixture
def recovery_events(recovery_isolated: None) -> EventRecorder:
    """Every event the library emits during the test, in order."""
    from ._core.events import subscribe
    from .testing import EventRecorder

    recorder = EventRecorder()
    subscribe(recorder)  # removed by recovery_isolated at the end of the test
    return recorder
