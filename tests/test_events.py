"""The event model: immutable events, buses, and the global subscription."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Callable

import pytest

from datapunk_recovery import CallFinished, EventBus, GaveUp, GiveUpReason, subscribe
from datapunk_recovery._core.events import (
    AttemptFinished,
    Event,
    emit,
    event_kinds,
    global_bus,
    listening,
)


def test_events_are_slotted_and_carry_a_stable_name() -> None:
    event = CallFinished(operation="op", at=1.0, attempts=2, elapsed=0.5, succeeded=False)
    with pytest.raises(AttributeError):
        event.extra = 3  # type: ignore[attr-defined]
    assert not hasattr(event, "__dict__")
    assert (event.name, event.area, event.outcome) == ("retry.call", "retry", "failure_after_retry")


def test_events_take_their_fields_by_position_or_keyword_and_compare_by_value() -> None:
    by_keyword = CallFinished(operation="op", at=1.0, attempts=2, elapsed=0.5, succeeded=False)
    by_position = CallFinished("op", 1.0, 2, 0.5, False)
    assert by_keyword == by_position and hash(by_keyword) == hash(by_position)
    assert repr(by_position) == (
        "CallFinished(operation='op', at=1.0, attempts=2, elapsed=0.5, succeeded=False)"
    )
    assert CallFinished._fields == ("operation", "at", "attempts", "elapsed", "succeeded")
    assert not dataclasses.is_dataclass(by_keyword)


def test_an_event_class_still_written_as_a_dataclass_is_built_as_a_plain_one() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Shed(Event):
        name: typing.ClassVar[str] = "loadshed.shed"
        requests: int
        reason: str = "full"

    shed = Shed(operation="api", at=0.0, requests=7)
    assert (shed.requests, shed.reason, Shed._fields[-2:]) == (7, "full", ("requests", "reason"))
    assert copy.copy(shed) == shed == Shed("api", 0.0, 7, "full")


@pytest.mark.parametrize(
    ("attempts", "succeeded", "outcome"),
    [
        (1, True, "success"),
        (3, True, "success_after_retry"),
        (1, False, "failure"),
        (2, False, "failure_after_retry"),
    ],
)
def test_call_outcomes_use_resilience4j_kinds(attempts: int, succeeded: bool, outcome: str) -> None:
    event = CallFinished(
        operation="op", at=0.0, attempts=attempts, elapsed=0.0, succeeded=succeeded
    )
    assert event.outcome == outcome


def test_an_event_reaches_its_bus_then_the_global_one() -> None:
    order: list[str] = []
    bus = EventBus()
    bus.subscribe(lambda e: order.append("local"))
    unsubscribe = subscribe(lambda e: order.append("global"))
    try:
        assert listening(bus) and listening()
        emit(
            GaveUp(
                operation="op",
                at=0.0,
                attempts=3,
                elapsed=1.0,
                reason=GiveUpReason.ATTEMPTS,
                error_type="ConnectionError",
            ),
            bus,
        )
    finally:
        unsubscribe()
    assert order == ["local", "global"]
    assert not listening()


def test_unsubscribing_twice_is_harmless() -> None:
    bus = EventBus()
    unsubscribe = bus.subscribe(print)
    unsubscribe()
    unsubscribe()
    assert not bus.active


def test_subscribers_must_be_callable() -> None:
    with pytest.raises(TypeError, match="subscriber"):
        global_bus.subscribe(42)  # type: ignore[arg-type]


def test_a_subscriber_gets_only_the_kinds_it_asked_for() -> None:
    bus = EventBus()
    got: list[str] = []
    bus.subscribe(lambda e: got.append(e.name), kinds={GaveUp, "retry.call"})
    give_up = GaveUp(
        operation="op", at=0.0, attempts=1, elapsed=0.0, reason=GiveUpReason.ATTEMPTS,
        error_type="E",
    )  # fmt: skip
    bus.emit(give_up)
    bus.emit(CallFinished(operation="op", at=0.0, attempts=1, elapsed=0.0, succeeded=True))
    bus.emit(AttemptFinished(operation="op", at=0.0, attempt=1, duration=0.0, succeeded=True))
    assert got == ["retry.gave_up", "retry.call"]
    assert bus.wants(GaveUp) and not bus.wants(AttemptFinished)
    assert listening(bus, GaveUp) and not listening(bus, AttemptFinished)


def test_a_subscriber_may_say_what_it_wants_with_a_wants_attribute() -> None:
    class OnlyRetries:
        def __init__(self) -> None:
            self.got: list[str] = []
            self.kind = "retry.scheduled"

        def wants(self, name: str) -> bool:
            return name == self.kind

        def __call__(self, event: Event) -> None:
            self.got.append(event.name)

    bus, subscriber = EventBus(), OnlyRetries()
    bus.subscribe(subscriber)
    assert not bus.wants("retry.gave_up")
    subscriber.kind = "retry.gave_up"
    assert not bus.wants("retry.gave_up")  # kept until the bus is told
    bus.refresh()
    assert bus.wants("retry.gave_up")


def test_the_mode_says_whether_a_successful_call_is_reported() -> None:
    bus = EventBus()
    assert bus.mode == 0
    bus.time_attempts(True)
    assert bus.mode == 1
    unsubscribe = bus.subscribe(lambda e: None, kinds={AttemptFinished})
    assert bus.mode == 2
    unsubscribe()
    bus.time_attempts(False)
    rare = bus.subscribe(lambda e: None, kinds={GaveUp})
    assert bus.mode == 0
    rare()


def test_kinds_must_be_event_classes_or_names() -> None:
    with pytest.raises(TypeError, match="kinds"):
        EventBus().subscribe(lambda e: None, kinds={42})  # type: ignore[arg-type]


def test_every_event_class_of_the_library_is_a_plain_slotted_class() -> None:
    import importlib
    import pkgutil

    import datapunk_recovery

    for module in pkgutil.walk_packages(datapunk_recovery.__path__, "datapunk_recovery."):
        if not module.name.startswith(("datapunk_recovery.telemetry", "datapunk_recovery.demo")):
            importlib.import_module(module.name)
    kinds = event_kinds()
    assert {"retry.call", "breaker.state", "cache.failed", "network.failover"} <= set(kinds)
    for name, klass in kinds.items():
        if not klass.__module__.startswith("datapunk_recovery."):
            continue
        # written as dataclasses or not: no frozen __setattr__ on the way in
        assert not dataclasses.is_dataclass(klass), name
        assert "__setattr__" not in vars(klass), name
        assert not hasattr(klass(*range(len(klass._fields))), "__dict__"), name


# Every event kind as it was named before events became plain classes (issue
# 16; taken from b144b72): the class name and its ``.name``.  Dashboards,
# log queries and subscribers filtering by name depend on both.
BEFORE_ISSUE_16 = {
    "adaptive.limit": "LimitChanged",
    "breaker.corrupt_state": "CorruptStateIgnored",
    "breaker.outcome": "OutcomeRecorded",
    "breaker.rejected": "CallRejected",
    "breaker.shadow_trip": "ShadowTrip",
    "breaker.state": "BreakerStateChanged",
    "breaker.store_fallback": "StoreFallback",
    "breaker.store_resumed": "StoreResumed",
    "budget.corrupt_state": "BudgetCorruptStateIgnored",
    "budget.refused": "BudgetRefused",
    "budget.store_fallback": "BudgetStoreFallback",
    "budget.store_resumed": "BudgetStoreResumed",
    "bulkhead.admitted": "BulkheadAdmitted",
    "bulkhead.rejected": "BulkheadRejected",
    "bulkhead.released": "BulkheadReleased",
    "cache.failed": "CacheFailed",
    "cache.recovered": "CacheRecovered",
    "cache.repair_queued": "RepairQueued",
    "cache.stale_served": "StaleServed",
    "cache.warmed": "CacheWarmed",
    "chaos.injected": "ChaosInjected",
    "database.commit_uncertain": "CommitUncertain",
    "database.discarded": "ConnectionDiscarded",
    "database.pool": "PoolStatus",
    "deadline.expired": "DeadlineExpired",
    "fallback.used": "FallbackUsed",
    "hedge.refused": "HedgeRefused",
    "hedge.started": "HedgeStarted",
    "hedge.won": "HedgeWon",
    "hint.ignored": "HintIgnored",
    "network.endpoint_failed": "EndpointFailed",
    "network.failover": "FailedOver",
    "network.fallthrough": "PriorityFallthrough",
    "network.routing_changed": "RoutingChanged",
    "pipeline.stage": "StageEntered",
    "ratelimit.admitted": "RateLimitAdmitted",
    "ratelimit.drained": "RateLimitDrained",
    "ratelimit.rejected": "RateLimitRejected",
    "recovery.fallback": "RecoveryFallback",
    "resource.acquisition": "PoolAcquisition",
    "resource.batch": "BatchFinished",
    "resource.batch_round": "BatchRound",
    "resource.cleanup": "CleanupFinished",
    "resource.compensation": "CompensationRan",
    "resource.inference": "InferenceFinished",
    "resource.inference_fallback": "InferenceFallback",
    "resource.inference_split": "InferenceSplit",
    "resource.leak": "ResourceLeaked",
    "resource.usage": "PoolUsage",
    "retry.attempt": "AttemptFinished",
    "retry.call": "CallFinished",
    "retry.gave_up": "GaveUp",
    "retry.scheduled": "RetryScheduled",
    "timeout.expired": "AttemptTimeoutExpired",
    "timeout.overran": "AttemptOverran",
}


def _library_kinds() -> dict[str, type[Event]]:
    import importlib
    import pkgutil

    import datapunk_recovery

    for module in pkgutil.walk_packages(datapunk_recovery.__path__, "datapunk_recovery."):
        if not module.name.startswith("datapunk_recovery.demo"):
            importlib.import_module(module.name)
    return {
        name: klass
        for name, klass in event_kinds().items()
        if klass.__module__.startswith("datapunk_recovery.")
    }


def test_every_event_class_and_name_of_before_the_plain_events_is_still_there() -> None:
    kinds = _library_kinds()
    now = {name: kinds[name].__name__ for name in BEFORE_ISSUE_16 if name in kinds}
    assert now == BEFORE_ISSUE_16


class _Mutated(AssertionError):
    pass


def test_no_exporter_of_the_library_changes_an_event_it_receives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Immutable by convention, checked here: once built, setting a field of
    # an event (from any subscriber) is recorded and refused.
    import logging

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry
    from structlog.testing import capture_logs

    from datapunk_recovery import RetryConfig, retry
    from datapunk_recovery.telemetry import CallbackExporter, LoggingExporter, StatisticsCollector
    from datapunk_recovery.telemetry.otel import OpenTelemetryExporter
    from datapunk_recovery.telemetry.prometheus import PrometheusExporter
    from datapunk_recovery.telemetry.structlog import StructlogExporter
    from datapunk_recovery.testing import fake_clock, instant_retries

    kinds = _library_kinds()
    mutations: list[str] = []

    def guard(self: Event, name: str, value: object) -> None:
        try:
            object.__getattribute__(self, name)
        except AttributeError:  # not set yet: the constructor
            object.__setattr__(self, name, value)
            return
        mutations.append(f"{type(self).__name__}.{name}")
        raise _Mutated(name)

    monkeypatch.setattr(Event, "__setattr__", guard)
    retry_logger = logging.getLogger("datapunk_recovery")
    saved = retry_logger.level
    retry_logger.setLevel(logging.DEBUG)
    exporters = [
        LoggingExporter(),
        StructlogExporter(),
        PrometheusExporter(CollectorRegistry(), buckets=(0.3, 1.0)),  # attempts from events
        OpenTelemetryExporter(
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
            span_events=set(kinds),
        ),
        CallbackExporter(on_update=lambda u: None, on_event=lambda f: None),
        StatisticsCollector(),
    ]
    tracer = TracerProvider().get_tracer("t")
    samples = [klass(*range(len(klass._fields))) for klass in kinds.values()]
    before = [event._values() for event in samples]
    try:
        for exporter in exporters:
            exporter.install()
        with (
            instant_retries(),
            fake_clock(),
            capture_logs(),
            tracer.start_as_current_span("request"),
        ):
            left = [1]

            @retry(RetryConfig(max_attempts=2), name="mutable")
            def call() -> str:
                if left[0]:
                    left[0] -= 1
                    raise ConnectionError("reset")
                return "ok"

            call()
            call()
            for event in samples:
                emit(event)
    finally:
        for exporter in exporters:
            exporter.close()
        retry_logger.setLevel(saved)
    assert mutations == []
    assert [event._values() for event in samples] == before
    with pytest.raises(_Mutated):
        samples[0].operation = "changed"  # the guard does catch a change


def test_a_first_try_success_builds_one_event_whatever_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry
    from structlog.testing import capture_logs

    from datapunk_recovery import retry
    from datapunk_recovery.telemetry import CallbackExporter, LoggingExporter, StatisticsCollector
    from datapunk_recovery.telemetry.otel import OpenTelemetryExporter
    from datapunk_recovery.telemetry.prometheus import PrometheusExporter
    from datapunk_recovery.telemetry.structlog import StructlogExporter

    built: list[str] = []
    for klass in (CallFinished, AttemptFinished):
        init = vars(klass)["__init__"]

        def counting(self: Event, *a: object, _init: typing.Any = init, **k: object) -> None:
            built.append(type(self).name)
            _init(self, *a, **k)

        monkeypatch.setattr(klass, "__init__", counting)

    @retry(name="once")
    def call() -> str:
        return "ok"

    logger = logging.getLogger("datapunk_recovery")
    saved = logger.level
    logger.setLevel(logging.DEBUG)
    exporters = [
        LoggingExporter(),
        StructlogExporter(),
        PrometheusExporter(CollectorRegistry(), buckets=(0.3, 1.0)),
        OpenTelemetryExporter(
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
        ),
        CallbackExporter(on_update=lambda u: None, on_event=lambda f: None),
        StatisticsCollector(),
    ]
    attempts_only: list[Event] = []
    try:
        with capture_logs():
            for exporter in exporters:
                exporter.install()
            call()
            assert built == ["retry.call"]
            built.clear()
            for exporter in exporters:
                exporter.close()
            stop = subscribe(attempts_only.append, kinds={AttemptFinished})
            call()
            stop()
    finally:
        for exporter in exporters:
            exporter.close()
        logger.setLevel(saved)
    assert built == ["retry.attempt"] and len(attempts_only) == 1


@pytest.mark.parametrize("round", range(4))  # more chances for the threads to interleave
def test_threads_subscribing_and_unsubscribing_at_once_lose_no_change(round: int) -> None:
    import sys
    import threading

    bus = EventBus()
    old = [(lambda event, i=i: None) for i in range(400)]
    new = [(lambda event, i=i: None) for i in range(400)]
    for subscriber in old:
        bus.subscribe(subscriber, kinds=("retry.scheduled",))
    start = threading.Barrier(4)

    def adding(mine: list[Callable[[Event], None]]) -> None:
        start.wait()
        for subscriber in mine:
            bus.subscribe(subscriber, kinds=("retry.scheduled",))
            bus.time_attempts(True)

    def removing(mine: list[Callable[[Event], None]]) -> None:
        start.wait()
        for subscriber in mine:
            bus.unsubscribe(subscriber)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [
            threading.Thread(target=adding, args=(new[:200],)),
            threading.Thread(target=adding, args=(new[200:],)),
            threading.Thread(target=removing, args=(old[:200],)),
            threading.Thread(target=removing, args=(old[200:],)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert {id(s) for s, _ in bus.subscriptions()} == {id(s) for s in new}
    assert len(bus.route("retry.scheduled")) == 400
    for _ in range(400):
        bus.time_attempts(False)
    assert bus.mode == 0  # every timer counted, so every one is taken back


def test_a_subscribers_wants_may_itself_subscribe_without_hanging_the_bus() -> None:
    """refresh() asks ``wants`` outside the bus's lock (a ``wants`` may take other locks)."""
    bus = EventBus()
    late: list[str] = []

    def wants(name: str) -> bool:
        if not late:
            late.append(name)
            bus.subscribe(lambda event: None, kinds=("retry.gave_up",))
        return name == "retry.scheduled"

    bus.subscribe(lambda event: None, kinds=wants)
    assert len(bus.subscriptions()) == 2
    assert len(bus.route("retry.gave_up")) == 1
    assert len(bus.route("retry.scheduled")) == 1
