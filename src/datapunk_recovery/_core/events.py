"""One event model for the whole library.

Every primitive reports what it did as a typed, immutable
[`Event`][datapunk_recovery._core.events.Event]
(an attempt finished, a retry was scheduled, the engine gave up, a breaker
opened, ...).  Subscribers are plain callables registered globally with
[`subscribe()`][datapunk_recovery._core.events.subscribe] or on one
[`EventBus`][datapunk_recovery._core.events.EventBus] (each decorated function has
its own).  Exporters to logging, Prometheus and OpenTelemetry are subscribers
like any other: there is no second mechanism.

When nobody listens, no event object is built: producers check
[`listening()`][datapunk_recovery._core.events.listening] first, so an unobserved call pays two
attribute
reads.
Subscribers may say which event kinds they want (``subscribe(fn,
kinds={RetryScheduled, GaveUp})``, or a ``wants(name) -> bool`` attribute):
a bus delivers an event only to those who want its kind, and the retry
engine stays on its fast path when nobody wants a successful call's events.

Events are plain ``__slots__`` classes built by [`Event`][datapunk_recovery._core.events.Event]
itself:
the
annotated fields of a subclass become its slots and its constructor
(positional or keyword), with equality, hashing and a repr.  They are
immutable by convention: producers build them, subscribers only read.  A
subclass still decorated with ``@dataclass(frozen=True, slots=True)`` is
rebuilt the same way (its frozen ``__setattr__`` dropped).

Events carry names, numbers and exception *type* names, never exception
messages, keys or connection strings: a message may hold a secret.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from enum import StrEnum
from typing import Any, ClassVar, dataclass_transform

from datapunk_recovery._core.validate import shown

from .errors import ErrorCategory

__all__ = [
    "AttemptFinished",
    "CallFinished",
    "Event",
    "EventBus",
    "GaveUp",
    "GiveUpReason",
    "HintIgnored",
    "RetryScheduled",
    "Subscriber",
    "emit",
    "event_kinds",
    "global_bus",
    "listening",
    "subscribe",
]

_log = logging.getLogger("datapunk_recovery.events")


_MISSING: Any = object()
_DATACLASS_ADDED = (
    "__dataclass_fields__",
    "__dataclass_params__",
    "__delattr__",
    "__eq__",
    "__getstate__",
    "__hash__",
    "__init__",
    "__match_args__",
    "__repr__",
    "__setattr__",
    "__setstate__",
)


@dataclass_transform()
class _EventType(type):
    """Builds each event class: annotated fields become slots and a constructor.

    The constructor takes the fields, base fields first, positionally or by
    keyword (keyword only from the first field with a default, when a later
    one has none).  Building an event is then a few slot stores: a fraction
    of a frozen dataclass, whose every field goes through ``object.__setattr__``.
    """

    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any]) -> Any:
        if "__dataclass_fields__" in ns:
            # An event class still written as a frozen, slotted dataclass (the
            # model before events were plain): ``@dataclass(slots=True)``
            # rebuilds the class built below; keep our slots and constructor,
            # drop what the decorator added (a constructor through
            # ``object.__setattr__``, defaults it read from our slots).
            for added in _DATACLASS_ADDED:
                ns.pop(added, None)
            # dataclasses may take a ClassVar for a field (when it cannot
            # resolve the annotation) and drop its value: put it back.
            ns.update(ns["_class_values"])
            ns["__match_args__"] = ns["_fields"]  # every field, as for a plain event
            inherited_fields = {f for base in bases for f in getattr(base, "_fields", ())}
            ns["__slots__"] = tuple(f for f, _ in ns["_spec"] if f not in inherited_fields)
            ns["__init__"] = _make_init(name, ns["_spec"])
            return super().__new__(mcs, name, bases, ns)
        own: list[tuple[str, Any]] = []
        class_values: dict[str, Any] = {}
        for field, annotation in ns.get("__annotations__", {}).items():
            text = annotation if isinstance(annotation, str) else repr(annotation)
            if "ClassVar" in text:
                if field in ns:
                    class_values[field] = ns[field]
                continue
            own.append((field, ns.pop(field, _MISSING)))
        inherited: list[tuple[str, Any]] = []
        for base in bases:
            inherited += getattr(base, "_spec", ())
        spec = tuple(inherited + own)
        ns["__slots__"] = tuple(field for field, _ in own)
        ns["_spec"] = spec
        ns["_class_values"] = class_values
        ns["_fields"] = tuple(field for field, _ in spec)
        ns["__match_args__"] = ns["_fields"]
        ns["__slotnames__"] = list(ns["_fields"])  # for copy and pickle, see below
        if "__init__" not in ns:
            ns["__init__"] = _make_init(name, spec)
        cls = super().__new__(mcs, name, bases, ns)
        if bases:
            # The slots exist; hiding the declaration lets a subclass still
            # written with ``@dataclass(slots=True)`` through (it refuses a
            # class that declares ``__slots__``).
            type.__delattr__(cls, "__slots__")
        return cls

    def __setattr__(cls, name: str, value: Any) -> None:
        # ``@dataclass(frozen=True, slots=True)`` sets pickling helpers that
        # read dataclass fields after the rebuild above: events need none.
        if name in ("__getstate__", "__setstate__") and value.__module__ == "dataclasses":
            return
        super().__setattr__(name, value)


def _make_init(name: str, spec: tuple[tuple[str, Any], ...]) -> Callable[..., None]:
    params: list[str] = []
    defaults: dict[str, Any] = {}
    keyword_only = False
    for i, (field, default) in enumerate(spec):
        later_required = any(d is _MISSING for _, d in spec[i + 1 :])
        if default is not _MISSING and later_required and not keyword_only:
            params.append("*")
            keyword_only = True
        if default is _MISSING:
            params.append(field)
        else:
            defaults[f"_d_{field}"] = default
            params.append(f"{field}=_d_{field}")
    body = "".join(f"    self.{field} = {field}\n" for field, _ in spec) or "    pass\n"
    source = f"def __init__(self, {', '.join(params)}):\n{body}"
    namespace: dict[str, Any] = {}
    exec(source, dict(defaults), namespace)  # built from field names only
    init: Callable[..., None] = namespace["__init__"]
    init.__qualname__ = f"{name}.__init__"
    return init


class Event(metaclass=_EventType):
    """Base of every event.

    ``operation`` names what the event is about (a decorated function, a
    breaker, a cache); ``at`` is the library clock's monotonic time in seconds.
    ``name`` is a stable dotted identifier (``"retry.scheduled"``) and ``area``
    the part of the library that emits it, used to pick a logger.

    A subclass declares its fields as annotations (``attempt: int``, with an
    optional default); `_EventType` makes them slots and the
    constructor.  ``_fields`` lists every field, base fields first.
    """

    name: ClassVar[str] = "event"
    area: ClassVar[str] = "core"
    _fields: ClassVar[tuple[str, ...]]
    _spec: ClassVar[tuple[tuple[str, Any], ...]]

    operation: str
    at: float

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, field) for field in self._fields])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{field}={getattr(self, field)!r}" for field in self._fields)
        return f"{self.__class__.__qualname__}({fields})"


class GiveUpReason(StrEnum):
    """Why a retrying operation stopped trying."""

    ATTEMPTS = "attempts"
    DEADLINE = "deadline"
    NON_RETRYABLE = "non_retryable"
    SERVER_DELAY_TOO_LONG = "server_delay_too_long"
    BUDGET = "budget"
    #: The library itself failed while deciding the next attempt (a bug, or a
    #: value past what the platform can sleep): the caller's exception is
    #: raised, with a note naming the internal error.
    INTERNAL_ERROR = "internal_error"


class AttemptFinished(Event):
    """One attempt ended; ``duration`` in seconds; ``error_type`` is None on success."""

    name: ClassVar[str] = "retry.attempt"
    area: ClassVar[str] = "retry"

    attempt: int
    duration: float
    succeeded: bool
    error_type: str | None = None
    category: ErrorCategory | None = None


class RetryScheduled(Event):
    """Retry ``retry`` (so attempt ``retry + 1``) will start after ``delay`` seconds.

    ``from_server`` is true when a server-given delay set the wait.
    """

    name: ClassVar[str] = "retry.scheduled"
    area: ClassVar[str] = "retry"

    retry: int
    delay: float
    from_server: bool
    category: ErrorCategory
    error_type: str


class GaveUp(Event):
    """The operation stopped after ``attempts`` attempts over ``elapsed`` seconds."""

    name: ClassVar[str] = "retry.gave_up"
    area: ClassVar[str] = "retry"

    attempts: int
    elapsed: float
    reason: GiveUpReason
    error_type: str


class CallFinished(Event):
    """A whole call (all its attempts) ended, successfully or not.

    ``outcome`` is one of ``success``, ``success_after_retry``, ``failure``,
    ``failure_after_retry`` (resilience4j's kinds).  For a first-try success
    (``first_try``) it is also the report of the call's one attempt.
    """

    name: ClassVar[str] = "retry.call"
    area: ClassVar[str] = "retry"

    attempts: int
    elapsed: float
    succeeded: bool

    @property
    def outcome(self) -> str:
        kind = "success" if self.succeeded else "failure"
        return kind if self.attempts == 1 else f"{kind}_after_retry"

    @property
    def first_try(self) -> bool:
        """Whether the call succeeded at its first attempt.

        This event then stands for that attempt too (``elapsed`` is its
        duration): a subscriber that takes ``CallFinished`` gets no
        ``AttemptFinished`` for it (a first-try success builds one event).
        """
        return self.succeeded and self.attempts == 1


class HintIgnored(Event):
    """A server-given delay or a shared state was garbage and was ignored.

    ``value`` is a short, safe rendering of what was refused.
    """

    name: ClassVar[str] = "hint.ignored"
    area: ClassVar[str] = "core"

    value: str
    reason: str


Subscriber = Callable[[Event], None]

Kinds = Collection[type[Event] | str] | Callable[[str], bool] | None
"""Which event kinds a subscriber wants: classes or names, a predicate on the
name, or ``None`` for every kind."""

_HOT_KINDS = ("retry.attempt", "retry.call")
"""The kinds a successful call reports: wanting one takes calls off the fast path."""


def event_kinds() -> dict[str, type[Event]]:
    """Every event class defined so far, by ``name``."""
    found: dict[str, type[Event]] = {}
    pending: list[type[Event]] = [Event]
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        if klass is not Event:
            found.setdefault(klass.name, klass)
    return found


def _predicate(kinds: Kinds) -> Callable[[str], bool] | None:
    if kinds is None or (callable(kinds) and not isinstance(kinds, type)):
        return kinds
    if isinstance(kinds, str | type):
        kinds = (kinds,)
    names: set[str] = set()
    for kind in kinds:
        if isinstance(kind, str):
            names.add(kind)
        elif isinstance(kind, type) and issubclass(kind, Event):
            names.add(kind.name)
        else:
            raise TypeError(f"kinds: expected event classes or names, got {shown(kind)}")
    return frozenset(names).__contains__


class EventBus:
    """A list of subscribers; `emit()` calls each that wants the event.

    A subscriber that raises is logged and never breaks the call being
    observed.  Who wants
    which kind is worked out once per kind and kept
    ([`refresh()`][datapunk_recovery._core.events.EventBus.refresh] forgets
    it, for subscribers whose wishes change).  ``mode`` is what the retry
    engine reads on every call: 0 when it may run bare, 1 when a metrics
    reader wants attempt durations timed
    ([`time_attempts()`][datapunk_recovery._core.events.EventBus.time_attempts]), 2 when a
    subscriber wants a successful call's events.  ``active`` is whether anyone
    is subscribed: the one check a hot path makes before building an event
    (``global_bus.active or bus.active``).
    """

    __slots__ = (
        "__weakref__",
        "_changing",
        "_entries",
        "routes",
        "_timers",
        "_unless",
        "active",
        "mode",
    )

    def __init__(self) -> None:
        # Held while the subscriptions or the timers change, never by emit
        # nor around a subscriber's code (``wants``: logging's own lock may be
        # taken there): two threads subscribing at once lose neither.
        self._changing = threading.Lock()
        self._entries: tuple[tuple[Subscriber, Callable[[str], bool] | None], ...] = ()
        #: The subscribers per kind name, filled by
        #: [`route()`][datapunk_recovery._core.events.EventBus.route] and emptied
        #: when subscriptions change.  Public so that a hot path can ask
        #: ``bus.routes.get(name)`` without a method call; read it, never write
        #: it (a missing name means "not asked yet": call ``route(name)``).
        self.routes: dict[str, tuple[Subscriber, ...]] = {}
        self._unless: dict[tuple[str, str], tuple[Subscriber, ...]] = {}
        self._timers = 0
        #: 0: nothing to report; 1: time attempts; 2: a successful call's
        #: events are wanted.  A plain attribute (the engine reads it on every
        #: call); only the bus sets it.
        self.mode = 0
        #: Whether anyone listens on this bus: the cheap check hot paths make
        #: (``global_bus.active or bus.active``) before building an event.  A
        #: plain attribute; only the bus sets it.
        self.active = False

    def subscribe(self, subscriber: Subscriber, kinds: Kinds = None) -> Callable[[], None]:
        """Add ``subscriber`` for ``kinds`` (default: its ``wants`` attribute, else every kind).

        Returns a function that removes it again.
        """
        if not callable(subscriber):
            raise TypeError(f"subscriber: expected a callable, got {shown(subscriber)}")
        if kinds is None:
            kinds = getattr(subscriber, "wants", None)
        wants = _predicate(kinds)
        with self._changing:
            self._entries = (*self._entries, (subscriber, wants))
        self.refresh()
        return lambda: self.unsubscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Remove ``subscriber`` (no error if it is not there)."""
        with self._changing:
            self._entries = tuple(e for e in self._entries if e[0] is not subscriber)
        self.refresh()

    def subscriptions(self) -> tuple[tuple[Subscriber, Callable[[str], bool] | None], ...]:
        """Who is subscribed and for which kinds.

        Give it back to [`restore()`][datapunk_recovery._core.events.EventBus.restore]
        to undo later subscriptions (what test isolation does).
        """
        return self._entries

    def restore(
        self, subscriptions: tuple[tuple[Subscriber, Callable[[str], bool] | None], ...]
    ) -> None:
        """Put back the subscriptions that ``subscriptions()`` returned."""
        with self._changing:
            self._entries = subscriptions
        self.refresh()

    def refresh(self) -> None:
        """Ask the subscribers again which kinds they want (their wishes changed)."""
        # Lock-free, so that a ``wants`` may take any lock; a change made
        # meanwhile by another thread is caught by the check and worked out
        # again.  ``routes`` is emptied after the change it follows, so a
        # route() filling it reads subscriptions at least as new as it.
        while True:
            entries, timers = self._entries, self._timers
            self.routes = {}
            self._unless = {}
            self.active = bool(entries)
            hot = any(self.route(kind) for kind in _HOT_KINDS)
            self.mode = 2 if hot else 1 if timers else 0
            if entries is self._entries and timers == self._timers:
                return

    def time_attempts(self, on: bool) -> None:
        """A metrics reader starts (``True``) or stops wanting the engine to time attempts."""
        with self._changing:
            self._timers += 1 if on else -1
        self.refresh()

    def route(self, name: str) -> tuple[Subscriber, ...]:
        """The subscribers that want events named ``name`` (cached in ``routes``)."""
        routes = self.routes
        route = routes.get(name)
        if route is None:
            route = routes[name] = tuple(
                [s for s, wants in self._entries if wants is None or wants(name)]
            )
        return route

    def _route_unless(self, name: str, unless: str) -> tuple[Subscriber, ...]:
        key = (name, unless)
        route = self._unless.get(key)
        if route is None:
            route = self._unless[key] = tuple(
                [
                    s
                    for s, wants in self._entries
                    if (wants is None or wants(name)) and not (wants is None or wants(unless))
                ]
            )
        return route

    def wants(self, kind: type[Event] | str, unless: type[Event] | str | None = None) -> bool:
        """Whether a subscriber of this bus wants events of ``kind``.

        With ``unless``, only subscribers that do not also want ``unless``
        count (see [`emit()`][datapunk_recovery._core.events.EventBus.emit]).
        """
        name = kind if isinstance(kind, str) else kind.name
        if unless is None:
            route = self.routes.get(name)
            return bool(route if route is not None else self.route(name))
        return bool(self._route_unless(name, unless if isinstance(unless, str) else unless.name))

    def emit(self, event: Event, unless: type[Event] | str | None = None) -> None:
        """Deliver ``event`` to every subscriber of this bus that wants its kind.

        With ``unless``, only to those that do not also want the kind
        ``unless``: the retry engine reports a first-try success as one
        ``CallFinished`` and sends its ``AttemptFinished`` only to subscribers
        that do not take the call's event.
        """
        if unless is None:
            route = self.routes.get(event.name)
            if route is None:
                route = self.route(event.name)
        else:
            route = self._route_unless(
                event.name, unless if isinstance(unless, str) else unless.name
            )
        for subscriber in route:
            try:
                subscriber(event)
            except Exception:
                _log.exception("event subscriber %r failed on %s", subscriber, event.name)


global_bus = EventBus()
"""The bus every event reaches, whichever bus it was emitted on first."""


def subscribe(subscriber: Subscriber, kinds: Kinds = None) -> Callable[[], None]:
    """Subscribe to the library's events of ``kinds`` (default: every kind).

    Returns the unsubscribe function.
    """
    return global_bus.subscribe(subscriber, kinds)


def listening(
    bus: EventBus | None = None,
    kind: type[Event] | str | None = None,
    unless: type[Event] | str | None = None,
) -> bool:
    """Whether an event (of ``kind``, if given) emitted on ``bus`` or globally reaches anyone.

    With ``unless``: anyone who does not also want events of kind ``unless``.
    """
    if kind is None:
        return global_bus.active or (bus is not None and bus.active)
    return global_bus.wants(kind, unless) or (bus is not None and bus.wants(kind, unless))


def emit(
    event: Event, bus: EventBus | None = None, unless: type[Event] | str | None = None
) -> None:
    """Deliver ``event`` to ``bus``'s subscribers, then to the global ones (see `EventBus.emit`)."""
    if bus is not None and bus is not global_bus:
        bus.emit(event, unless)
    global_bus.emit(event, unless)
