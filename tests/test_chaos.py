"""Chaos injection: faults, latency, outcomes and behaviours, switched at run time.

Read top to bottom, this file is the user's guide to :mod:`datapunk_recovery.chaos`.
"""

from __future__ import annotations

import inspect
import os
import random
import subprocess
import sys
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import pytest

from datapunk_recovery import RetryConfig, chaos, retry
from datapunk_recovery._core.events import Event
from datapunk_recovery.chaos import _injections, _injector, _rate, _switch, _timeline
from datapunk_recovery.flow.pipeline import Pipeline, RetryStage
from datapunk_recovery.testing import fake_clock


@pytest.fixture(autouse=True)
def _kill_switch_restored() -> Iterator[None]:
    yield
    chaos.enable_all()


def _double(x: int) -> int:
    return 2 * x


async def _adouble(x: int) -> int:
    return 2 * x


# -- what can be injected ----------------------------------------------------------


def test_a_fault_raises_a_fresh_exception_instead_of_calling() -> None:
    calls: list[int] = []

    @chaos.Chaos(chaos.Fault(ConnectionResetError), name="flaky-db")
    def query(x: int) -> int:
        calls.append(x)
        return x

    with pytest.raises(ConnectionResetError) as first:
        query(1)
    with pytest.raises(ConnectionResetError) as second:
        query(2)
    assert calls == []
    assert first.value is not second.value  # no traceback or note piles up on a shared one
    assert chaos.injected_by(first.value) == "flaky-db"
    assert chaos.injected_by(ConnectionResetError()) is None  # real failures are not marked


def test_a_fault_can_come_from_a_factory() -> None:
    fault = chaos.Fault(lambda: OSError(104, "connection reset by chaos"))
    with pytest.raises(OSError, match="reset by chaos"):
        chaos.Chaos(fault).call(_double, 1)


def test_cancellation_and_exit_are_never_injected_as_faults() -> None:
    with pytest.raises(ValueError, match=r"Fault\.error"):
        chaos.Fault(KeyboardInterrupt)  # type: ignore[arg-type]
    bad_factory = chaos.Chaos(chaos.Fault(lambda: SystemExit(1)))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return an Exception"):
        bad_factory.call(_double, 1)


def test_an_outcome_replaces_the_result() -> None:
    stale = chaos.Chaos(chaos.Outcome({"status": 503}))
    assert stale.call(_double, 21) == {"status": 503}


def test_a_behaviour_runs_instead_with_the_same_arguments() -> None:
    half = chaos.Chaos(chaos.Behaviour(lambda x: x // 2))
    assert half.call(_double, 42) == 21


def test_latency_waits_then_calls_on_the_library_clock() -> None:
    slow = chaos.Chaos(chaos.Latency(0.25))
    with fake_clock() as clock:
        assert slow.call(_double, 2) == 4
    assert clock.slept == [0.25]


def test_latency_can_be_drawn_from_a_range() -> None:
    slow = chaos.Chaos(chaos.Latency(0.1, up_to=0.3), seed=7)
    with fake_clock() as clock:
        for _ in range(50):
            slow.call(_double, 1)
    assert all(0.1 <= s <= 0.3 for s in clock.slept)
    assert len(set(clock.slept)) > 1


@pytest.mark.parametrize(
    ("build", "error", "field"),
    [
        (lambda: chaos.Latency(-1.0), ValueError, "Latency.seconds"),
        (lambda: chaos.Latency(float("nan")), ValueError, "Latency.seconds"),
        (lambda: chaos.Latency(1.0, up_to=0.5), ValueError, "Latency.up_to"),
        (lambda: chaos.Latency("1s"), TypeError, "Latency.seconds"),
        (lambda: chaos.Fault("boom"), TypeError, "Fault.error"),
        (lambda: chaos.Behaviour(42), TypeError, "Behaviour.fn"),
        (lambda: chaos.Chaos(chaos.Outcome(1), rate=1.5), ValueError, "Chaos.rate"),
        (lambda: chaos.Chaos(chaos.Outcome(1), rate=True), TypeError, "Chaos.rate"),
        (lambda: chaos.Chaos("fault"), TypeError, "Chaos.injection"),
        (lambda: chaos.Chaos(chaos.Outcome(1), seed="x"), TypeError, "Chaos.seed"),
        (lambda: chaos.Chaos(chaos.Outcome(1), seed=1, rng=random.Random()), ValueError, "Chaos"),
        (lambda: chaos.Chaos(chaos.Outcome(1), name=""), TypeError, "Chaos.name"),
        (lambda: chaos.Window(2.0, 1.0, chaos.Outcome(1)), ValueError, "Window.end"),
        (lambda: chaos.Window(0.0, 1.0, chaos.Outcome(1), rate=-0.1), ValueError, "Window.rate"),
        (lambda: chaos.Window(0.0, 1.0, chaos.Outcome(1), target=3), TypeError, "Window.target"),
        (lambda: chaos.Timeline([object()]), TypeError, "Timeline.windows"),
    ],
)
def test_bad_settings_name_the_field(build: object, error: type[Exception], field: str) -> None:
    with pytest.raises(error, match=field.replace(".", r"\.")):
        build()  # type: ignore[operator]


# -- the rate and the seeded RNG ------------------------------------------------------


def _pattern(injector: chaos.Injector, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        try:
            injector.call(_double, 1)
            out.append(False)
        except ConnectionError:
            out.append(True)
    return out


def test_the_same_seed_injects_into_the_same_calls() -> None:
    def make() -> chaos.Chaos:
        return chaos.Chaos(chaos.Fault(ConnectionError), rate=0.3, seed=2024)

    assert _pattern(make(), 200) == _pattern(make(), 200)


def test_the_rate_is_the_fraction_of_calls_injected() -> None:
    injector = chaos.Chaos(chaos.Fault(ConnectionError), rate=0.3, seed=1)
    hits = sum(_pattern(injector, 10_000))
    assert 2_700 < hits < 3_300
    stats = injector.statistics()
    assert (stats.calls, stats.faults, stats.injected) == (10_000, hits, hits)


def test_rate_zero_never_injects_and_rate_one_always_does() -> None:
    assert not any(_pattern(chaos.Chaos(chaos.Fault(ConnectionError), rate=0.0), 100))
    assert all(_pattern(chaos.Chaos(chaos.Fault(ConnectionError), rate=1.0), 100))


# -- the switches -----------------------------------------------------------------------


def test_an_injector_is_switched_at_run_time() -> None:
    injector = chaos.Chaos(chaos.Outcome(-1))
    wrapped = injector(_double)
    assert wrapped(5) == -1
    injector.disable()
    assert (injector.enabled, injector.active) == (False, False)
    assert wrapped(5) == 10
    injector.enable()
    assert wrapped(5) == -1
    # Calls made while switched off pass straight through, uncounted.
    assert injector.statistics().calls == 2


def test_an_injector_can_be_built_switched_off() -> None:
    injector = chaos.Chaos(chaos.Outcome(-1), enabled=False)
    assert injector(_double)(5) == 10
    assert injector.statistics().calls == 0


def test_the_kill_switch_stops_every_injector_at_once() -> None:
    a = chaos.Chaos(chaos.Outcome("a"))(_double)
    b = chaos.Chaos(chaos.Fault(ConnectionError)).call
    chaos.disable_all()
    assert not chaos.all_enabled()
    assert a(1) == 2
    assert b(_double, 1) == 2
    chaos.enable_all()
    assert a(1) == "a"
    with pytest.raises(ConnectionError):
        b(_double, 1)


def test_a_disarmed_process_returns_functions_untouched() -> None:
    # DATAPUNK_RECOVERY_CHAOS=off is read at import: check it in a fresh interpreter.
    script = (
        "from datapunk_recovery import chaos\n"
        "def f(): return 1\n"
        "c = chaos.Chaos(chaos.Fault(ConnectionError))\n"
        "assert not chaos.armed() and not chaos.all_enabled()\n"
        "assert c(f) is f\n"
        "assert c.call(f) == 1\n"
        "stage = c.stage()\n"
        "def nxt(fn, args, kwargs): return fn(*args, **kwargs)\n"
        "async def anxt(fn, args, kwargs): return await fn(*args, **kwargs)\n"
        "assert stage.sync(nxt) is nxt and stage.asyn(anxt) is anxt  # the stage costs nothing\n"
        "try:\n"
        "    chaos.enable_all()\n"
        "except RuntimeError as exc:\n"
        "    assert 'DATAPUNK_RECOVERY_CHAOS' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('enable_all must refuse')\n"
    )
    env = {**os.environ, chaos.DISARM_VARIABLE: "off"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert chaos.armed()  # this test process is armed


@pytest.mark.parametrize("value", ["disabled", "none", "n", "of", "0ff", "nein", "armed?"])
def test_a_typo_in_the_kill_switch_disarms_chaos_and_warns(value: str) -> None:
    armed, warning = _switch._read_switch(value)
    assert armed is False
    assert warning is not None
    assert chaos.DISARM_VARIABLE in warning and repr(value) in warning
    assert all(accepted in warning for accepted in (*chaos.ARMING_VALUES, *chaos.DISARMING_VALUES))


@pytest.mark.parametrize("value", [None, "", "  ", "1", "on", "TRUE", " yes "])
def test_only_the_documented_values_or_no_value_leave_chaos_armed(value: str | None) -> None:
    assert _switch._read_switch(value) == (True, None)


@pytest.mark.parametrize("value", ["0", "off", "False", " NO "])
def test_the_documented_disarming_values_disarm_quietly(value: str) -> None:
    assert _switch._read_switch(value) == (False, None)


def test_a_process_started_with_a_typo_is_disarmed_and_says_so() -> None:
    script = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "from datapunk_recovery import chaos\n"
        "def f(): return 1\n"
        "assert not chaos.armed() and not chaos.all_enabled()\n"
        "assert chaos.Chaos(chaos.Fault(ConnectionError))(f) is f\n"
    )
    env = {**os.environ, chaos.DISARM_VARIABLE: "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "DATAPUNK_RECOVERY_CHAOS='disabled'" in done.stderr
    assert "DISARMED" in done.stderr


# -- the decorator keeps the function's face ---------------------------------------------


def test_the_decorator_keeps_name_signature_and_kind() -> None:
    injector = chaos.Chaos(chaos.Outcome(0))
    wrapped = injector(_double)
    awrapped = injector(_adouble)
    assert wrapped.__name__ == "_double"
    assert inspect.signature(wrapped) == inspect.signature(_double)
    assert inspect.iscoroutinefunction(awrapped)
    assert wrapped.chaos is injector  # type: ignore[attr-defined]


def test_the_wrappers_are_plain_closures_and_no_code_is_generated() -> None:
    injector = chaos.Chaos(chaos.Outcome(0), enabled=False)
    for fn in (_double, _adouble, _positional_only, _keyword_only):
        wrapped = injector(fn)
        assert wrapped.__code__.co_filename == _injector.__file__
        assert wrapped.__wrapped__ is fn  # type: ignore[attr-defined]
        assert inspect.signature(wrapped) == inspect.signature(fn)
    for module in (chaos, _injections, _injector, _rate, _switch, _timeline):
        source = inspect.getsource(module)
        assert "exec(" not in source and "compile(" not in source


@pytest.mark.anyio
async def test_acall_is_the_former_name_of_call_async() -> None:
    injector = chaos.Chaos(chaos.Outcome(9))
    assert chaos.Injector.acall is chaos.Injector.call_async
    assert await injector.acall(_adouble, 1) == 9
    assert injector.statistics().injected == 1


def test_methods_are_decorated_like_functions() -> None:
    injector = chaos.Chaos(chaos.Behaviour(lambda self, x: -x), enabled=False)

    class Client:
        @injector
        def get(self, x: int) -> int:
            return x

    assert Client().get(3) == 3
    injector.enable()
    assert Client().get(3) == -3


def _positional_only(a, b=2, /, c=3):  # type: ignore[no-untyped-def]
    return ("po", a, b, c)


def _keyword_only(a, *, k, m=5):  # type: ignore[no-untyped-def]
    return ("ko", a, k, m)


def _everything(a, /, b, *rest, k=1, **extra):  # type: ignore[no-untyped-def]
    return ("all", a, b, rest, k, extra)


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (_positional_only, (1,), {}),
        (_positional_only, (1, 9), {"c": 8}),
        (_keyword_only, (1,), {"k": 2}),
        (_keyword_only, (), {"a": 1, "k": 2, "m": 3}),
        (_everything, (1, 2, 3, 4), {"k": 5, "z": 6}),
        (_everything, (1,), {"b": 2}),
        (len, ([1, 2],), {}),  # a builtin gets the generic wrapper
    ],
)
def test_arguments_pass_through_unchanged_switched_off_and_on(
    fn: object, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    # Switched on, a behaviour that is the function itself shows what it was given.
    injector = chaos.Chaos(chaos.Behaviour(fn), enabled=False)  # type: ignore[arg-type]
    wrapped = injector(fn)  # type: ignore[arg-type]
    expected = fn(*args, **kwargs)  # type: ignore[operator]
    assert wrapped(*args, **kwargs) == expected
    injector.enable()
    assert wrapped(*args, **kwargs) == expected
    assert injector.statistics().behaviours == 1


def test_a_wrapper_refuses_what_the_function_refuses() -> None:
    wrapped = chaos.Chaos(chaos.Outcome(0), enabled=False)(_positional_only)
    with pytest.raises(TypeError):
        wrapped(a=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        chaos.Chaos(chaos.Outcome(0))(_keyword_only)(1)  # k is required


# -- async, under asyncio and trio --------------------------------------------------------


@pytest.mark.anyio
async def test_async_calls_get_every_kind() -> None:
    assert await chaos.Chaos(chaos.Outcome(7))(_adouble)(1) == 7
    with pytest.raises(TimeoutError):
        await chaos.Chaos(chaos.Fault(TimeoutError))(_adouble)(1)

    async def aslow(x: int) -> int:
        return x + 100

    assert await chaos.Chaos(chaos.Behaviour(aslow)).call_async(_adouble, 1) == 101
    assert await chaos.Chaos(chaos.Behaviour(lambda x: x - 1)).call_async(_adouble, 1) == 0
    with fake_clock() as clock:
        assert await chaos.Chaos(chaos.Latency(1.5))(_adouble)(4) == 8
    assert clock.slept == [1.5]


@pytest.mark.anyio
async def test_a_cancelled_injected_wait_cancels_at_once_and_skips_the_call() -> None:
    injector = chaos.Chaos(chaos.Latency(30.0))
    called: list[int] = []

    @injector
    async def fetch(x: int) -> int:
        called.append(x)
        return x

    with anyio.CancelScope() as scope:
        # Cancel as soon as the wait is injected: the sleep must end at once.
        injector.events.subscribe(lambda event: scope.cancel())
        await fetch(1)
    assert scope.cancelled_caught
    assert called == []


@pytest.mark.anyio
async def test_cancellation_from_a_behaviour_passes_through_untouched() -> None:
    attempts: list[int] = []

    async def cancel_me(x: int) -> int:
        attempts.append(x)
        anyio_scope.cancel()
        await anyio.lowlevel.checkpoint()  # where the cancellation lands
        return x

    injector = chaos.Chaos(chaos.Behaviour(cancel_me))
    guarded = retry(RetryConfig(max_attempts=5, base_delay=0.0))(injector(_adouble))
    with anyio.CancelScope() as anyio_scope:
        await guarded(1)
    assert anyio_scope.cancelled_caught
    assert attempts == [1]  # never retried
    assert guarded.statistics().calls == 0  # never counted


@pytest.mark.anyio
async def test_injected_faults_drive_the_retry_engine() -> None:
    injector = chaos.Chaos(chaos.Fault(ConnectionResetError), rate=0.5, seed=3)
    guarded = retry(RetryConfig(max_attempts=10, base_delay=0.0))(injector(_adouble))
    results = [await guarded(i) for i in range(50)]
    assert results == [2 * i for i in range(50)]
    stats = guarded.statistics()
    assert stats.retries == injector.statistics().faults > 0


# -- as a pipeline stage ------------------------------------------------------------------------


def test_a_chaos_stage_breaks_each_attempt_inside_a_pipeline() -> None:
    injector = chaos.Chaos(chaos.Fault(ConnectionResetError), rate=0.5, seed=11)
    pipeline = Pipeline.of(
        "payments",
        [RetryStage(RetryConfig(max_attempts=10, base_delay=0.0)), injector.stage()],
    )
    assert [stage.name for stage in pipeline.stages] == ["retry", "chaos"]
    assert [pipeline.call(_double, i) for i in range(40)] == [2 * i for i in range(40)]
    assert pipeline.statistics().retries == injector.statistics().faults > 0


def test_a_switched_off_stage_passes_calls_through() -> None:
    injector = chaos.Chaos(chaos.Behaviour(lambda x: -x), enabled=False)
    pipeline = Pipeline.of("svc", [injector.stage()])
    assert pipeline.call(_double, 3) == 6
    injector.enable()
    assert pipeline.call(_double, 3) == -3  # a behaviour gets the call's own arguments
    with pytest.raises(TypeError, match="ChaosStage"):
        chaos.ChaosStage("not an injector")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_chaos_stage_works_for_async_calls_and_cancels_cleanly() -> None:
    script = chaos.Timeline([chaos.Window(0.0, None, chaos.Latency(30.0), target="db")])
    injector = script.injector("db")
    pipeline = Pipeline.of("db", [RetryStage(RetryConfig(max_attempts=3)), injector.stage()])
    called: list[int] = []

    async def query(x: int) -> int:
        called.append(x)
        return x

    script.start()
    with anyio.CancelScope() as scope:
        injector.events.subscribe(lambda event: scope.cancel())
        await pipeline.call_async(query, 1)
    assert scope.cancelled_caught
    assert called == []
    assert pipeline.statistics().calls == 0  # the cancellation was not counted
    script.stop()
    assert await pipeline.call_async(query, 2) == 2


# -- events -----------------------------------------------------------------------------------


def test_every_injection_is_reported_without_messages() -> None:
    seen: list[Event] = []
    injector = chaos.Chaos(chaos.Fault(lambda: ValueError("password=hunter2")), name="pay")
    injector.events.subscribe(seen.append)
    with pytest.raises(ValueError, match="hunter2"):
        injector.call(_double, 1)
    (event,) = seen
    assert isinstance(event, chaos.ChaosInjected)
    assert (event.name, event.area, event.operation) == ("chaos.injected", "chaos", "pay")
    assert (event.kind, event.error_type, event.delay) == ("fault", "ValueError", 0.0)
    assert "hunter2" not in repr(event)


# -- timelines: faults scripted over time -------------------------------------------------------


def test_a_timeline_injects_each_window_in_its_time() -> None:
    script = chaos.Timeline(
        [
            chaos.Window(10.0, 20.0, chaos.Fault(ConnectionError), target="cache"),
            chaos.Window(15.0, 30.0, chaos.Outcome("from the secondary"), target="primary"),
        ]
    )
    cache = script.injector("cache")(_double)
    primary = script.injector("primary")(_double)
    with fake_clock() as clock:
        assert cache(1) == 2  # not started: nothing is injected
        script.start()
        clock.advance(9.9)
        assert cache(1) == 2
        clock.advance(0.1)
        with pytest.raises(ConnectionError):
            cache(1)
        assert primary(1) == 2
        clock.advance(5.0)
        assert primary(1) == "from the secondary"
        assert [w.target for w in script.active()] == ["cache", "primary"]
        assert [w.target for w in script.active("primary")] == ["primary"]
        clock.advance(5.0)  # t = 20: the cache's window is closed (end excluded)
        assert cache(1) == 2
        script.stop()
        assert primary(1) == 2
        assert script.elapsed() is None
    assert script.duration == 30.0


def test_overlapping_windows_apply_together_and_untargeted_ones_apply_to_all() -> None:
    script = chaos.Timeline(
        [
            chaos.Window(0.0, None, chaos.Latency(0.5)),  # everyone, forever
            chaos.Window(1.0, 2.0, chaos.Fault(TimeoutError), target="db"),
        ]
    )
    db = script.injector("db")
    with fake_clock() as clock:
        script.start()
        assert db.call(_double, 1) == 2
        clock.advance(1.0 - 0.5)  # the injected wait itself moved the clock by 0.5
        with pytest.raises(TimeoutError):
            db.call(_double, 1)
        assert clock.slept == [0.5, 0.5]  # the wait came first, then the fault
    assert script.duration is None
    assert db.statistics().latencies == 2


def test_a_wait_comes_before_a_fault_of_a_window_that_opened_earlier() -> None:
    script = chaos.Timeline(
        [
            chaos.Window(0.0, None, chaos.Fault(TimeoutError), target="db"),
            chaos.Window(1.0, None, chaos.Latency(0.5), target="db"),
        ]
    )
    db = script.injector("db")
    with fake_clock() as clock:
        script.start()
        clock.advance(1.0)
        with pytest.raises(TimeoutError):
            db.call(_double, 1)
        assert clock.slept == [0.5]  # slow, and then failing
    stats = db.statistics()
    assert (stats.latencies, stats.faults) == (1, 1)


def test_a_window_rate_is_drawn_from_the_timeline_seed() -> None:
    def run(seed: int) -> list[bool]:
        script = chaos.Timeline(
            [chaos.Window(0.0, 100.0, chaos.Fault(ConnectionError), rate=0.25)], seed=seed
        )
        with fake_clock():
            script.start()
            return _pattern(script.injector(), 400)

    first = run(9)
    assert first == run(9)
    assert 60 < sum(first) < 140


@pytest.mark.anyio
async def test_a_timeline_drives_async_calls() -> None:
    script = chaos.Timeline([chaos.Window(0.0, 1.0, chaos.Outcome(None), target="api")])
    api = script.injector("api")(_adouble)
    with fake_clock() as clock:
        script.start()
        assert await api(2) is None
        clock.advance(1.0)
        assert await api(2) == 4
