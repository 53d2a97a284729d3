"""The migration guides' claims, checked by running both libraries side by side.

Each test runs tenacity, stamina or pybreaker and datapunk-recovery on the same
failing function, on one fake clock (no real sleep), and compares the number
of attempts, the waits (their bounds when jittered) and what is raised.
docs/migration/*.md say "equivalent" only for rows whose test here shows it,
and name the test; every other row says how the two differ, as shown here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import datapunk_recovery as dr
from datapunk_recovery import testing
from datapunk_recovery._core import clock
from datapunk_recovery._core.clock import FakeClock
from datapunk_recovery._core.events import RetryScheduled

tenacity = pytest.importorskip("tenacity")
stamina = pytest.importorskip("stamina")
pybreaker = pytest.importorskip("pybreaker")
backoff = pytest.importorskip("backoff")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    """One fake clock for both libraries: ours, and tenacity's (stamina runs on tenacity)."""
    now = FakeClock(1000.0)
    monkeypatch.setattr(tenacity, "time", SimpleNamespace(monotonic=now.now))
    monkeypatch.setattr(tenacity.nap, "time", SimpleNamespace(sleep=now.sleep))
    clock.use_clock(now)
    try:
        yield now
    finally:
        clock.use_clock(None)


class Flaky:
    """A function that raises ``make()`` until its ``succeed_on``-th call (never by default)."""

    __name__ = __qualname__ = "flaky"  # backoff's log handlers name the function

    def __init__(self, now: FakeClock, make: Callable[[], BaseException], succeed_on: int = 0):
        self.now, self.make, self.succeed_on = now, make, succeed_on
        self.calls: list[float] = []

    def __call__(self) -> str:
        self.calls.append(self.now.now())
        if len(self.calls) == self.succeed_on:
            return "ok"
        raise self.make()


def waits(calls: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(calls)]


def outcome(fn: Callable[[], Any]) -> type[BaseException] | str:
    try:
        return str(fn())
    except Exception as exc:
        return type(exc)


# --- tenacity -----------------------------------------------------------------------


def test_tenacity_bare_retry_row_differs_in_first_wait_and_in_what_is_retried(
    fake: FakeClock,
) -> None:
    theirs = Flaky(fake, ConnectionError)
    ours = Flaky(fake, ConnectionError)
    t = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=10),
        sleep=fake.sleep,
    )(theirs)
    o = dr.retry(ours)
    assert outcome(t) is tenacity.RetryError  # without reraise=True
    assert outcome(o) is ConnectionError
    assert len(theirs.calls) == len(ours.calls) == 3
    assert 0.1 <= waits(theirs.calls)[0] <= 1.1  # 0.1 * 2**0 + uniform(0, 1)
    assert 0.0 <= waits(ours.calls)[0] <= 0.1  # full jitter under 0.1
    bug_t, bug_o = Flaky(fake, ValueError), Flaky(fake, ValueError)
    outcome(tenacity.retry(stop=tenacity.stop_after_attempt(3), sleep=fake.sleep)(bug_t))
    outcome(dr.retry(bug_o))
    assert len(bug_t.calls) == 3 and len(bug_o.calls) == 1  # a bug is never retried here


def test_tenacity_stop_before_delay_is_equivalent_to_a_deadline(fake: FakeClock) -> None:
    fixed = dr.RetryConfig(
        max_attempts=None, base_delay=3.0, max_delay=3.0, jitter="none", deadline=10.0
    )
    attempts = {}
    for name, stop in (
        ("after", tenacity.stop_after_delay(10)),
        ("before", tenacity.stop_before_delay(10)),
    ):
        theirs = Flaky(fake, ConnectionError)
        outcome(tenacity.retry(stop=stop, wait=tenacity.wait_fixed(3), sleep=fake.sleep)(theirs))
        attempts[name] = len(theirs.calls)
    ours = Flaky(fake, ConnectionError)
    assert outcome(dr.retry(fixed)(ours)) is ConnectionError
    assert waits(ours.calls) == [3.0, 3.0, 3.0]
    assert attempts == {"after": 5, "before": 4}  # stop_after_delay starts one at t=12
    assert len(ours.calls) == attempts["before"]


def test_tenacity_retry_if_exception_type_is_equivalent_to_on(fake: FakeClock) -> None:
    for error, expected in ((ConnectionError, 3), (TimeoutError, 1), (ValueError, 1)):
        theirs, ours = Flaky(fake, error), Flaky(fake, error)
        outcome(
            tenacity.retry(
                retry=tenacity.retry_if_exception_type(ConnectionError),
                stop=tenacity.stop_after_attempt(3),
                reraise=True,
                sleep=fake.sleep,
            )(theirs)
        )
        outcome(dr.retry(on=ConnectionError)(ours))
        assert len(theirs.calls) == len(ours.calls) == expected, error


def test_tenacity_retry_if_result_is_equivalent_but_gives_up_with_another_error(
    fake: FakeClock,
) -> None:
    def status(calls: list[int]) -> Callable[[], int]:
        def fn() -> int:
            calls.append(1)
            return 503 if len(calls) < 3 else 200

        return fn

    theirs: list[int] = []
    ours: list[int] = []
    t = tenacity.retry(
        retry=tenacity.retry_if_result(lambda r: r >= 500),
        stop=tenacity.stop_after_attempt(3),
        sleep=fake.sleep,
    )(status(theirs))
    o = dr.retry(retry_if_result=lambda r: r >= 500)(status(ours))
    assert t() == o() == 200
    assert len(theirs) == len(ours) == 3
    always_t = tenacity.retry(
        retry=tenacity.retry_if_result(lambda r: r >= 500),
        stop=tenacity.stop_after_attempt(3),
        sleep=fake.sleep,
    )(lambda: 503)
    always_o = dr.retry(retry_if_result=lambda r: r >= 500)(lambda: 503)
    assert outcome(always_t) is tenacity.RetryError
    assert outcome(always_o) is dr.RetryExhausted


def test_tenacity_reraise_is_equivalent_to_our_default(fake: FakeClock) -> None:
    theirs, ours = Flaky(fake, ConnectionError), Flaky(fake, ConnectionError)
    t = tenacity.retry(stop=tenacity.stop_after_attempt(3), reraise=True, sleep=fake.sleep)(theirs)
    assert outcome(t) is outcome(dr.retry(ours)) is ConnectionError
    assert len(theirs.calls) == len(ours.calls) == 3


def test_tenacity_retry_with_is_equivalent(fake: FakeClock) -> None:
    theirs, ours = Flaky(fake, ConnectionError), Flaky(fake, ConnectionError)
    t = tenacity.retry(stop=tenacity.stop_after_attempt(3), reraise=True, sleep=fake.sleep)(theirs)
    outcome(t.retry_with(stop=tenacity.stop_after_attempt(6)))
    outcome(dr.retry(ours).retry_with(max_attempts=6))
    assert len(theirs.calls) == len(ours.calls) == 6


def test_tenacity_statistics_count_the_same_attempts(fake: FakeClock) -> None:
    t = tenacity.retry(stop=tenacity.stop_after_attempt(3), reraise=True, sleep=fake.sleep)(
        Flaky(fake, ConnectionError, succeed_on=3)
    )
    o = dr.retry(Flaky(fake, ConnectionError, succeed_on=3))
    assert t() == o() == "ok"
    assert t.statistics["attempt_number"] == o.statistics().attempts == 3


def test_tenacity_before_sleep_and_our_events_see_the_same_retries(fake: FakeClock) -> None:
    seen: list[object] = []
    t = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        reraise=True,
        sleep=fake.sleep,
        before_sleep=seen.append,
    )(Flaky(fake, ConnectionError))
    outcome(t)
    scheduled: list[RetryScheduled] = []
    o = dr.retry(Flaky(fake, ConnectionError))
    unsubscribe = dr.subscribe(
        lambda e: scheduled.append(e) if isinstance(e, RetryScheduled) else None
    )
    try:
        outcome(o)
    finally:
        unsubscribe()
    assert len(seen) == len(scheduled) == 2


def test_tenacity_retrying_iterator_is_equivalent(fake: FakeClock) -> None:
    theirs, ours = (
        Flaky(fake, ConnectionError, succeed_on=3),
        Flaky(fake, ConnectionError, succeed_on=3),
    )
    for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(3), sleep=fake.sleep):
        with attempt:
            theirs()
    for attempt in dr.retrying():
        with attempt:
            ours()
    assert len(theirs.calls) == len(ours.calls) == 3


def test_tenacity_side_by_side_example_makes_as_many_attempts_with_shorter_waits(
    fake: FakeClock,
) -> None:
    theirs, ours = Flaky(fake, ConnectionError), Flaky(fake, ConnectionError)
    t = tenacity.retry(
        stop=tenacity.stop_after_attempt(5),
        wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5),
        retry=tenacity.retry_if_exception_type((ConnectionError, TimeoutError)),
        reraise=True,
        sleep=fake.sleep,
    )(theirs)
    o = dr.retry(dr.RetryConfig(max_attempts=5, base_delay=0.2, max_delay=5.0))(ours)
    assert outcome(t) is outcome(o) is ConnectionError
    assert len(theirs.calls) == len(ours.calls) == 5
    for n, (w_t, w_o) in enumerate(zip(waits(theirs.calls), waits(ours.calls), strict=True)):
        assert 0.2 * 2**n <= w_t <= min(5.0, 0.2 * 2**n + 1.0)
        assert 0.0 <= w_o <= min(5.0, 0.2 * 2**n)


# --- stamina ------------------------------------------------------------------------------


@pytest.fixture
def stamina_waits() -> Iterator[list[float]]:
    found: list[float] = []
    stamina.instrumentation.set_on_retry_hooks([lambda details: found.append(details.wait_for)])
    try:
        yield found
    finally:
        stamina.instrumentation.set_on_retry_hooks(None)


def test_stamina_attempts_row_makes_as_many_attempts_with_other_waits(
    fake: FakeClock, stamina_waits: list[float]
) -> None:
    theirs, ours = Flaky(fake, ConnectionError), Flaky(fake, ConnectionError)
    assert outcome(stamina.retry(on=ConnectionError, attempts=3)(theirs)) is ConnectionError
    assert outcome(dr.retry(on=ConnectionError)(ours)) is ConnectionError
    assert len(theirs.calls) == len(ours.calls) == 3
    assert 0.1 <= stamina_waits[0] <= 1.1  # 0.1 * 2**0 + uniform(0, 1)
    assert 0.0 <= waits(ours.calls)[0] <= 0.1


def test_stamina_timeout_may_start_an_attempt_past_it_a_deadline_never_does(
    fake: FakeClock, stamina_waits: list[float]
) -> None:
    theirs, ours = Flaky(fake, ConnectionError), Flaky(fake, ConnectionError)
    outcome(
        stamina.retry(
            on=ConnectionError,
            attempts=None,
            timeout=10.0,
            wait_initial=3.0,
            wait_max=3.0,
            wait_jitter=0.0,
            wait_exp_base=1,
        )(theirs)
    )
    fixed = dr.RetryConfig(
        max_attempts=None, base_delay=3.0, max_delay=3.0, jitter="none", deadline=10.0
    )
    outcome(dr.retry(fixed, on=ConnectionError)(ours))
    assert [round(c - theirs.calls[0]) for c in theirs.calls] == [0, 3, 6, 9, 12]
    assert [round(c - ours.calls[0]) for c in ours.calls] == [0, 3, 6, 9]


def test_stamina_testing_mode_also_cuts_attempts_ours_keeps_them(fake: FakeClock) -> None:
    theirs, ours = Flaky(fake, ConnectionError), Flaky(fake, ConnectionError)
    with stamina.set_testing(True):
        outcome(stamina.retry(on=ConnectionError, attempts=3)(theirs))
    with testing.instant_retries():
        outcome(dr.retry(on=ConnectionError)(ours))
    assert len(theirs.calls) == 1  # set_testing(True) means attempts=1
    assert len(ours.calls) == 3 and waits(ours.calls) == [0.0, 0.0]
    capped = Flaky(fake, ConnectionError)
    with stamina.set_testing(True, attempts=3):
        outcome(stamina.retry(on=ConnectionError, attempts=3)(capped))
    assert len(capped.calls) == 3 and waits(capped.calls) == [0.0, 0.0]


def test_stamina_retry_context_is_equivalent_to_retrying(fake: FakeClock) -> None:
    theirs, ours = (
        Flaky(fake, ConnectionError, succeed_on=3),
        Flaky(fake, ConnectionError, succeed_on=3),
    )
    for attempt in stamina.retry_context(on=ConnectionError, attempts=3):
        with attempt:
            theirs()
    for attempt in dr.retrying(on=ConnectionError):
        with attempt:
            ours()
    assert len(theirs.calls) == len(ours.calls) == 3


# --- pybreaker ------------------------------------------------------------------------------


def run_calls(guard: Callable[[Callable[[], str]], Callable[[], str]], script: str) -> list[Any]:
    """Call a guarded function once per letter of ``script`` (f: fails, v: ValueError, o: ok)."""
    made = {"f": ConnectionError, "v": ValueError}
    calls: list[str] = []
    step = iter(script)

    def fn() -> str:
        kind = next(step)
        calls.append(kind)
        if kind in made:
            raise made[kind]()
        return "ok"

    guarded = guard(fn)
    seen: list[Any] = []
    for _ in script:
        before = len(calls)
        result = outcome(guarded)
        seen.append(result if len(calls) > before else ("refused", result))
        if len(calls) == before:
            next(step)  # a refused call still consumes its letter
    return seen


def test_pybreaker_fail_max_trips_on_the_same_failure_but_reports_it_otherwise(
    fake: FakeClock,
) -> None:
    theirs = run_calls(pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60), "ffffff")
    ours = run_calls(
        dr.CircuitBreaker("mig-trip", dr.BreakerConfig(consecutive_failures=5, open_duration=60.0)),
        "ffffff",
    )
    assert theirs[:4] == ours[:4] == [ConnectionError] * 4
    assert theirs[4] is pybreaker.CircuitBreakerError  # the tripping call's own error is replaced
    assert ours[4] is ConnectionError  # ours re-raises it, then refuses
    assert theirs[5] == ("refused", pybreaker.CircuitBreakerError)
    assert ours[5] == ("refused", dr.CircuitOpenError)


def test_pybreaker_exclude_counts_as_success_ignore_on_counts_as_nothing(
    fake: FakeClock,
) -> None:
    script = "ffffvff"
    theirs = run_calls(
        pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, exclude=[ValueError]), script
    )
    ours = run_calls(
        dr.CircuitBreaker(
            "mig-exclude",
            dr.BreakerConfig(consecutive_failures=5, open_duration=60.0, ignore_on=ValueError),
        ),
        script,
    )
    assert theirs[4] is ours[4] is ValueError  # raised as itself by both
    assert theirs[5:] == [ConnectionError, ConnectionError]  # the count restarted
    assert ours[5] is ConnectionError and ours[6] == ("refused", dr.CircuitOpenError)


def test_pybreaker_listeners_and_our_events_see_the_same_transition(fake: FakeClock) -> None:
    changes: list[tuple[str, str]] = []

    class Listener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            changes.append((old.name, new.name))

    run_calls(pybreaker.CircuitBreaker(fail_max=2, listeners=[Listener()]), "ff")
    with testing.record_events() as recorded:
        run_calls(dr.CircuitBreaker("mig-listen", dr.BreakerConfig(consecutive_failures=2)), "ff")
    assert changes == [("closed", "open")]
    assert recorded.transitions("mig-listen") == [("closed", "open")]


# --- backoff ----------------------------------------------------------------------------------


@pytest.fixture
def backoff_clock(fake: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """backoff reads datetime.now() and sleeps with time.sleep: both on the fake clock."""
    import datetime

    epoch = datetime.datetime(2026, 1, 1)

    def now() -> datetime.datetime:
        return epoch + datetime.timedelta(seconds=fake.now())

    monkeypatch.setattr(
        backoff._sync, "datetime", SimpleNamespace(datetime=SimpleNamespace(now=now))
    )
    monkeypatch.setattr(backoff._sync, "time", SimpleNamespace(sleep=fake.sleep))
    return fake


def test_backoff_expo_with_full_jitter_is_equivalent_to_our_default(
    backoff_clock: FakeClock,
) -> None:
    theirs, ours = Flaky(backoff_clock, ConnectionError), Flaky(backoff_clock, ConnectionError)
    t = backoff.on_exception(
        backoff.expo, ConnectionError, max_tries=3, factor=0.1, max_value=10.0
    )(theirs)
    o = dr.retry(on=ConnectionError)(ours)
    assert outcome(t) is outcome(o) is ConnectionError
    assert len(theirs.calls) == len(ours.calls) == 3
    for n, (w_t, w_o) in enumerate(zip(waits(theirs.calls), waits(ours.calls), strict=True)):
        assert 0.0 <= w_t <= 0.1 * 2**n and 0.0 <= w_o <= 0.1 * 2**n  # full jitter, same cap
    default = Flaky(backoff_clock, ConnectionError)
    outcome(backoff.on_exception(backoff.expo, ConnectionError, max_tries=3)(default))
    assert all(0.0 <= w <= 2.0**n for n, w in enumerate(waits(default.calls)))  # 1 s, 2 s...


def test_backoff_max_time_makes_a_last_attempt_at_the_limit_a_deadline_does_not(
    backoff_clock: FakeClock,
) -> None:
    theirs, ours = Flaky(backoff_clock, ConnectionError), Flaky(backoff_clock, ConnectionError)
    outcome(
        backoff.on_exception(
            backoff.constant, ConnectionError, interval=3, jitter=None, max_time=10
        )(theirs)
    )
    fixed = dr.RetryConfig(
        max_attempts=None, base_delay=3.0, max_delay=3.0, jitter="none", deadline=10.0
    )
    outcome(dr.retry(fixed, on=ConnectionError)(ours))
    assert [round(c - theirs.calls[0]) for c in theirs.calls] == [0, 3, 6, 9, 10]
    assert [round(c - ours.calls[0]) for c in ours.calls] == [0, 3, 6, 9]


def test_backoff_giveup_is_equivalent_to_on_with_the_opposite_predicate(
    backoff_clock: FakeClock,
) -> None:
    def fatal(exc: BaseException) -> bool:
        return isinstance(exc, ConnectionRefusedError)

    for error, expected in ((ConnectionResetError, 3), (ConnectionRefusedError, 1)):
        theirs, ours = Flaky(backoff_clock, error), Flaky(backoff_clock, error)
        outcome(
            backoff.on_exception(
                backoff.expo, ConnectionError, max_tries=3, giveup=fatal, factor=0.1
            )(theirs)
        )
        outcome(
            dr.retry(on=lambda exc: isinstance(exc, ConnectionError) and not fatal(exc))(ours)
        )
        assert len(theirs.calls) == len(ours.calls) == expected, error


def test_backoff_on_predicate_returns_the_last_value_ours_raises(
    backoff_clock: FakeClock,
) -> None:
    theirs: list[int] = []
    ours: list[int] = []

    def status(calls: list[int]) -> Callable[[], int]:
        def fn() -> int:
            calls.append(1)
            return 503

        return fn

    t = backoff.on_predicate(backoff.expo, lambda r: r >= 500, max_tries=3, factor=0.1)(
        status(theirs)
    )
    o = dr.retry(retry_if_result=lambda r: r >= 500)(status(ours))
    assert outcome(t) == "503"  # gives up by returning the rejected value
    assert outcome(o) is dr.RetryExhausted
    assert len(theirs) == len(ours) == 3


def test_backoff_on_backoff_and_our_events_see_the_same_retries(
    backoff_clock: FakeClock,
) -> None:
    seen: list[object] = []
    t = backoff.on_exception(
        backoff.expo, ConnectionError, max_tries=3, factor=0.1, on_backoff=seen.append
    )(Flaky(backoff_clock, ConnectionError))
    outcome(t)
    with testing.record_events() as recorded:
        outcome(dr.retry(Flaky(backoff_clock, ConnectionError)))
    assert len(seen) == len(recorded.retries()) == 2


# --- the guides say only what the tests above show --------------------------------------


def test_every_row_called_equivalent_names_a_passing_test_here() -> None:
    tests = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), flags=re.M))
    for guide in sorted((ROOT / "docs" / "migration").glob("*.md")):
        text = guide.read_text(encoding="utf-8")
        listed = dict(re.findall(r"^(\d+)\. `(test_\w+)`$", text, flags=re.M))
        assert set(listed.values()) <= tests, f"{guide.name}: a listed test does not exist"
        for line in text.splitlines():
            if line.startswith("|") and "equivalent" in line.lower():
                named = re.findall(r"\btest (\d+)\b", line)
                assert named, f"{guide.name}: an equivalence without its test: {line}"
                assert set(named) <= set(listed), f"{guide.name}: unlisted test in {line}"
