"""The read-through recovery: reads that survive the cache and, where they can, the source.

[`ReadThroughCache`][datapunk_recovery.cache.recovering.ReadThroughCache] puts a
[`Cache`][datapunk_recovery.cache.protocols.Cache]
in front of a [`Source`][datapunk_recovery.cache.protocols.Source]:

- **The cache failing** (refused, timed out, a killed connection, a
  blackholed server) sends reads to the source at once.  The cache has its
  own circuit breaker, so once it is known dead a read pays a permit check,
  not a timeout; every failure is counted by kind (``timeout``, ``refused``,
  ``connection``, ``open`` for a breaker refusal, ``error``).
- **Single-flight**: concurrent misses of one key make one source load; the
  other readers wait for it.
- **Stale-if-error**: an entry past its ``ttl`` is kept ``stale_for`` more
  seconds; when the source fails, it is served and the answer says so
  ([`Lookup.stale`][datapunk_recovery.cache.recovering.Lookup.stale]).
- **Writes lose nothing**:
  [`ReadThroughCache.write()`][datapunk_recovery.cache.recovering.ReadThroughCache.write] writes the
  source
  first, then invalidates, also when the write failed (a lost answer is not
  a "no") or was cancelled.  An invalidation the cache could not take goes to
  a bounded repair list, applied when the cache is back; keys on it are read
  from the source meanwhile.  When the list overflows, the whole namespace
  is invalidated instead: keys carry a generation number, kept in the cache
  itself, and bumping it orphans every old key at once.
- **No refill older than an invalidation**: a load (or a warming batch)
  remembers the invalidation sequence number it started at, and does not
  write back a value when the key was invalidated meanwhile (checked before
  and after the write).
- **Garbage in the cache** (bytes the codec cannot read, or not the
  recovery's envelope) is a miss, counted as the failure kind ``corrupt``
  with an event; it never raises and never trips the cache's breaker.
- **Warming**:
  [`ReadThroughCache.maintain()`][datapunk_recovery.cache.recovering.ReadThroughCache.maintain] (run
  it in a task you own)
  warms the keys the warming policies choose at start and after each
  recovery from an outage, at ``warm_rate`` keys per second.

Scope of the guarantees: one process.  Another process sharing the same Redis
may refill a key with a value it loaded before this process's write; across
replicas the shared Redis is the truth, and such a value lives at most
``ttl`` seconds (see [docs/cache.md](https://datapunk.github.io/datapunk-recovery/cache/)).

Freshness is judged on wall-clock seconds (``clock.wall()``: ``time.time()``,
or the fake time under a fake clock), because entries are shared between processes and
monotonic clocks are not.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar

from datapunk_recovery._core import clock
from datapunk_recovery._core.errors import CircuitOpenError, ErrorCategory, classify
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.validate import check_count, check_number, check_seconds, shown
from datapunk_recovery._execution import runtime as _runtime
from datapunk_recovery.breaker import BreakerConfig, CircuitBreaker

from .memory import MemoryCache
from .protocols import Cache, CorruptEntry, Source
from .warming import HotKeySketch, WarmingPolicy, WarmReason

__all__ = [
    "CacheConfig",
    "CacheFailed",
    "CacheRecovered",
    "CacheStats",
    "CacheWarmed",
    "Lookup",
    "ReadThroughCache",
    "RepairQueued",
    "StaleServed",
]

V = TypeVar("V")
T = TypeVar("T")

_OWNER: Final = "CacheConfig"
# Invalidations remembered per key for the refill check; beyond this the
# oldest are forgotten and the check falls back to "maybe invalidated" (a
# skipped refill costs one miss later, never a stale value).
_INVALIDATION_MEMORY: Final = 10_000
_REPAIR_BATCH: Final = 100
# Full key names (``namespace:generation:key``) `get()` remembers; a larger
# set of keys in use makes it start afresh, at the cost of one string.
_KEY_MEMORY: Final = 4096


def _default_breaker() -> BreakerConfig:
    return BreakerConfig(consecutive_failures=3, open_duration=1.0, half_open_timeout=2.0)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """How the read-through cache keeps, serves and repairs entries.  Durations in seconds.

    - ``ttl``: how long an entry is fresh; ``stale_for``: how much longer it
      is kept to be served when the source fails (0: never serve stale).
    - ``namespace``: prefix of every key (``namespace:generation:key``).
    - ``cache_timeout``: a hard bound on each cache call (``None``: rely on
      the client's own socket timeouts, as
      [`RedisCache.from_url()`][datapunk_recovery.cache.redis.RedisCache.from_url] sets).
    - ``repair_limit``: invalidations kept for a cache that is down; one more
      invalidates the whole namespace instead.
    - ``generation_refresh``: how often the namespace generation is re-read,
      so that a namespace invalidated by another process is seen.
    - ``breaker``: the cache's own breaker (default: open after 3 failures in
      a row, probe again after 1 s).
    - ``warm_rate``: keys per second warming may load; ``warm_batch``: keys
      per source call while warming.
    """

    ttl: float = 60.0
    stale_for: float = field(default=300.0, metadata={"unit": "seconds"})
    namespace: str = "dp"
    cache_timeout: float | None = None
    repair_limit: int = 1000
    generation_refresh: float = field(default=5.0, metadata={"unit": "seconds"})
    breaker: BreakerConfig = field(default_factory=_default_breaker)
    warm_rate: float = 500.0
    warm_batch: int = 50

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "ttl", check_seconds(_OWNER, "ttl", self.ttl, positive=True))
        s(self, "stale_for", check_seconds(_OWNER, "stale_for", self.stale_for))
        if not isinstance(self.namespace, str) or not self.namespace or ":" in self.namespace:
            raise ValueError(
                f"{_OWNER}.namespace: expected a non-empty string without ':', "
                f"got {shown(self.namespace)}"
            )
        if self.cache_timeout is not None:
            s(
                self,
                "cache_timeout",
                check_seconds(_OWNER, "cache_timeout", self.cache_timeout, positive=True),
            )
        check_count(_OWNER, "repair_limit", self.repair_limit)
        s(
            self,
            "generation_refresh",
            check_seconds(_OWNER, "generation_refresh", self.generation_refresh),
        )
        if not isinstance(self.breaker, BreakerConfig):
            raise TypeError(
                f"{_OWNER}.breaker: expected a BreakerConfig, got {shown(self.breaker)}"
            )
        rate = check_number(_OWNER, "warm_rate", self.warm_rate)
        if rate <= 0:
            raise ValueError(f"{_OWNER}.warm_rate: must be > 0 keys per second, got {shown(rate)}")
        s(self, "warm_rate", rate)
        check_count(_OWNER, "warm_batch", self.warm_batch)


Origin = Literal["cache", "source", "stale"]


@dataclass(frozen=True, slots=True)
class Lookup(Generic[V]):
    """A read's answer: the value (``None``: the source has no such key) and where it came from.

    ``stale`` is true when the value is past its ``ttl`` and was served
    because the source failed (``origin == "stale"``).
    """

    value: V | None
    origin: Origin

    @property
    def stale(self) -> bool:
        """Whether the value is past its time-to-live (served because the source failed)."""
        return self.origin == "stale"


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one cache since it was built; ``failures`` by kind."""

    hits: int
    misses: int
    stale_served: int
    source_loads: int
    shared_loads: int
    failures: Mapping[str, int]
    repairs_pending: int
    namespace_invalidation_pending: bool
    generation: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheFailed(Event):
    """A cache call failed, the breaker refused it, or the cache held garbage.

    ``op`` is the cache call, ``kind`` the failure kind (``timeout``,
    ``refused``, ``connection``, ``open``, ``corrupt``, ``error``) and
    ``error_type`` the exception's type name.
    """

    name: ClassVar[str] = "cache.failed"
    area: ClassVar[str] = "cache"

    op: str
    kind: str
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleServed(Event):
    """A value past its ttl was served because the source failed with ``error_type``."""

    name: ClassVar[str] = "cache.stale_served"
    area: ClassVar[str] = "cache"

    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RepairQueued(Event):
    """An invalidation waits for the cache; ``overflowed``: the namespace will be invalidated."""

    name: ClassVar[str] = "cache.repair_queued"
    area: ClassVar[str] = "cache"

    pending: int
    overflowed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheRecovered(Event):
    """The cache answered again after failing; pending repairs follow."""

    name: ClassVar[str] = "cache.recovered"
    area: ClassVar[str] = "cache"

    repairs_pending: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheWarmed(Event):
    """Warming for ``reason`` stored ``stored`` of ``requested`` keys."""

    name: ClassVar[str] = "cache.warmed"
    area: ClassVar[str] = "cache"

    reason: str
    requested: int
    stored: int


#: No envelope's time is this far: an infinite one is garbage (see `_envelope()`).
_NO_TIME: Final = math.inf

#: Decimals an envelope's ``fresh_until`` keeps (10 µs).  A wall-clock time
#: of 10 integer digits then has at most 15 significant ones, which a reader
#: of its text (JSON) turns back into a float on the fast path of float
#: parsing, not the big-number one (~2,000 instructions per hit), and which
#: a time that already has 5 decimals or fewer (a fake clock's) keeps exactly.
_TIME_DECIMALS: Final = 5


def _entry_time(fresh_until: Any) -> float | None:
    """An envelope's ``fresh_until`` as a finite float (seconds), or None when it is garbage.

    An integer too large for a float (``OverflowError``) is garbage too.
    """
    try:
        until = float(fresh_until)
    except (TypeError, ValueError, OverflowError):
        return None
    return until if math.isfinite(until) else None


def _envelope(entry: Any) -> tuple[float, Any] | None:
    """``(fresh_until, value)`` of a stored entry, or None when it is not our envelope.

    ``fresh_until`` is a wall-clock time in seconds; an entry that is not a
    pair, or whose time is not a finite number, is garbage (the caller reports
    it as corrupt and treats it as a miss).
    """
    try:
        fresh_until, value = entry
    except (TypeError, ValueError):
        return None
    until = _entry_time(fresh_until)
    return None if until is None else (until, value)


#: Seconds a cache is not asked again after it refused our login or a command
#: (``WRONGPASS``, ``NOAUTH``, ``NOPERM``): each try would be another failed
#: login, which can lock the account, so the breaker's probes do not retry it.
AUTH_RETRY_INTERVAL: Final = 300.0


def _failure_kind(exc: BaseException) -> str:
    if classify(exc).category is ErrorCategory.AUTH:
        return "auth"
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return "timeout"
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        return "refused"
    if isinstance(exc, ConnectionError | EOFError) or name.endswith("ConnectionError"):
        return "connection"
    return "error"


class _Flight:
    """One source load that concurrent readers of a key share.

    ``done`` is made by the first follower: a load nobody waits for builds no event.
    """

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done: _runtime.TaskEvent | None = None
        self.value: Any = None
        self.error: BaseException | None = None


class _Abandoned(Exception):
    """Internal: the leader of a flight was cancelled; a follower leads a new one."""


_ABANDONED: Final = _Abandoned()


class ReadThroughCache(Generic[V]):
    """A cache in front of a source whose reads survive either failing (see the module docs).

    ``cache`` defaults to a [`MemoryCache`][datapunk_recovery.cache.memory.MemoryCache].
    ``warming`` is a list of
    [`WarmingPolicy`][datapunk_recovery.cache.warming.WarmingPolicy] objects used by
    [`maintain()`][datapunk_recovery.cache.recovering.ReadThroughCache.maintain]; ``sketch``
    tracks hot keys for them (default: one, when there is a policy).
    ``name`` names the cache in events and its breaker (``cache:<name>``).
    """

    __slots__ = (
        "_bump_pending",
        "_calm",
        "_down",
        "_failures",
        "_flights",
        "_floor",
        "_full",
        "_gen",
        "_gen_key",
        "_gen_read_at",
        "_hits",
        "_invalidated",
        "_keep",
        "_loads",
        "_misses",
        "_prefix",
        "_recoveries",
        "_refresh",
        "_refused_until",
        "_repairing",
        "_repairs",
        "_seq",
        "_shared",
        "_stale",
        "_ttl",
        "_wake",
        "breaker",
        "bus",
        "cache",
        "config",
        "name",
        "sketch",
        "source",
        "warming",
    )

    def __init__(
        self,
        source: Source[V],
        cache: Cache | None = None,
        config: CacheConfig | None = None,
        *,
        name: str = "cache",
        warming: Iterable[WarmingPolicy] = (),
        sketch: HotKeySketch | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.config = config if config is not None else CacheConfig()
        if not isinstance(self.config, CacheConfig):
            raise TypeError(f"ReadThroughCache.config: expected a CacheConfig, got {shown(config)}")
        self.source = source
        self.cache: Cache = cache if cache is not None else MemoryCache()
        self.name = name
        self.bus = bus if bus is not None else EventBus()
        self.breaker = CircuitBreaker(f"cache:{name}", self.config.breaker)
        self.warming = tuple(warming)
        for policy in self.warming:
            if not isinstance(policy, WarmingPolicy):
                raise TypeError(
                    "ReadThroughCache.warming: expected objects with keys_to_warm(), "
                    f"got {shown(policy)}"
                )
        self.sketch = sketch if sketch is not None or not self.warming else HotKeySketch()
        cfg = self.config
        self._ttl = cfg.ttl
        self._keep = cfg.ttl + cfg.stale_for
        self._refresh = cfg.generation_refresh
        self._gen_key = f"{cfg.namespace}:generation"
        self._gen: int | None = None
        self._gen_read_at = -math.inf
        self._prefix = ""
        self._full: dict[str, str] = {}  # key -> prefix + key, for get(); see _full_key()
        self._flights: dict[str, _Flight] = {}
        self._seq = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._floor = 0  # every key counts as invalidated at this sequence number
        self._repairs: dict[str, None] = {}
        self._bump_pending = False
        self._repairing = False
        self._down = False
        self._refused_until = 0.0
        # Whether get() may take its fast path as far as this cache's own
        # state goes: no cache_timeout (it awaits the cache bare), no breaker
        # refusal or login failure remembered, no repair or namespace
        # invalidation pending.  Every change of those calls _rearm().
        self._calm = cfg.cache_timeout is None
        self._recoveries = 0
        self._wake: _runtime.TaskEvent | None = None
        self._hits = self._misses = self._stale = self._loads = self._shared = 0
        self._failures: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"ReadThroughCache(name={self.name!r}, cache={self.cache!r})"

    # -- statistics ------------------------------------------------------------

    def stats(self) -> CacheStats:
        """The counters now."""
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            stale_served=self._stale,
            source_loads=self._loads,
            shared_loads=self._shared,
            failures=dict(self._failures),
            repairs_pending=len(self._repairs),
            namespace_invalidation_pending=self._bump_pending,
            generation=self._gen,
        )

    # -- talking to the cache ----------------------------------------------------

    async def _call(
        self, op: str, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> tuple[bool, T | None]:
        """``(True, result)`` of a cache call, or ``(False, None)`` if the cache is unavailable.

        ``(True, None)`` when the cache answered with garbage
        ([`CorruptEntry`][datapunk_recovery.cache.protocols.CorruptEntry]).
        """
        if self._refused_until and clock.now() < self._refused_until:
            # The breaker refused a moment ago and said for how long: skip
            # asking it again (and building its exception) until then.
            self._failed(op, "open", "CircuitOpenError")
            return False, None
        try:
            permit = self.breaker.allow()
        except CircuitOpenError as exc:
            # At most one open period: a half-open breaker waiting for its
            # probe says how long the probe may take, not when it will answer.
            skip = min(exc.remaining, self.config.breaker.open_duration)
            self._refused_until = clock.now() + skip
            self._rearm()
            self._failed(op, "open", "CircuitOpenError")
            return False, None
        timeout = self.config.cache_timeout
        result: T | None
        try:
            if timeout is None:
                result = await fn(*args)
            else:
                timed_out, got = await _runtime.call_within(fn, args, {}, timeout)
                if timed_out:
                    raise TimeoutError(f"cache {op} took longer than {timeout:g} s")
                result = got
        except CorruptEntry:
            # The cache answered (it is up), with garbage: a miss, not an outage.
            self._failed(op, "corrupt", "CorruptEntry")
            result = None
        except Exception as exc:
            permit.failure(exc)
            self._unavailable(op, exc)
            return False, None
        except BaseException:
            permit.cancel()
            raise
        permit.success()
        if self._refused_until:
            self._refused_until = 0.0
            self._rearm()
        if self._down:
            self._recovered()
        return True, result

    def _unavailable(self, op: str, exc: Exception) -> None:
        """Cache call ``op`` failed with ``exc`` (its breaker is told by the caller)."""
        self._down = True
        kind = _failure_kind(exc)
        if kind == "auth":
            self._refused_until = clock.now() + AUTH_RETRY_INTERVAL
            self._rearm()
        self._failed(op, kind, type(exc).__name__)

    def _rearm(self) -> None:
        """Work out ``_calm`` again after a change of what it depends on."""
        self._calm = self.config.cache_timeout is None and not (
            self._refused_until or self._repairs or self._bump_pending
        )

    def _failed(self, op: str, kind: str, error_type: str) -> None:
        self._failures[kind] = self._failures.get(kind, 0) + 1
        if listening(self.bus, CacheFailed):
            emit(
                CacheFailed(
                    operation=self.name,
                    at=clock.now(),
                    op=op,
                    kind=kind,
                    error_type=error_type,
                ),
                self.bus,
            )

    def _recovered(self) -> None:
        self._down = False
        self._recoveries += 1
        if self._wake is not None:
            self._wake.set()
        if listening(self.bus, CacheRecovered):
            emit(
                CacheRecovered(
                    operation=self.name, at=clock.now(), repairs_pending=len(self._repairs)
                ),
                self.bus,
            )

    def _set_generation(self, generation: int) -> None:
        if generation != self._gen:
            if self._gen is not None:
                # Another namespace now: nothing loaded before may be written back.
                self._seq += 1
                self._floor = self._seq
            self._gen = generation
            self._prefix = f"{self.config.namespace}:{generation}:"
            self._full = {}  # the old names are the old namespace's
        self._gen_read_at = clock.now()

    def _full_key(self, key: str) -> str:
        """``key`` in the namespace now (``namespace:generation:key``), remembered for `get()`.

        A hit then finds the name it asks the cache for without building a
        new string (and hashing it) each time.  At most `_KEY_MEMORY` names
        are kept; the memory starts afresh beyond, and when the generation
        changes.
        """
        full = self._prefix + key
        names = self._full
        if len(names) >= _KEY_MEMORY:
            names.clear()
        names[key] = full
        return full

    async def _read_prefix(self) -> str | None:
        """The key prefix to use now, or ``None`` when the cache must not be used."""
        if self._repairs or self._bump_pending:
            await self.repair()
            if self._bump_pending:
                return None
        if self._gen is None or clock.now() - self._gen_read_at >= self._refresh:
            ok, generation = await self._call("generation", self.cache.counter, self._gen_key)
            if ok and generation is not None:  # None: the counter holds garbage
                self._set_generation(generation)
        return None if self._gen is None else self._prefix

    # -- reading ------------------------------------------------------------------

    async def get(self, key: str) -> V | None:
        """The value of ``key``: from the cache, else the source (``None``: no such key)."""
        now = clock.now()
        breaker = self.breaker
        # No generation read yet leaves _gen_read_at at -inf: the time check fails.
        if not (
            self._calm
            and self.sketch is None
            and now - self._gen_read_at < self._refresh
            and (gen := breaker.grant()) is not None
        ):
            return (await self.lookup(key)).value
        # The fast path: what lookup() does, without a Lookup, a breaker
        # permit (the breaker grants the call without one: closed, nobody
        # wants its per-call event) or two coroutine frames; a MemoryCache
        # (exactly: a subclass may override get) is read without a coroutine.
        cache = self.cache
        try:
            full = self._full.get(key)
            if full is None:
                full = self._full_key(key)
            if type(cache) is MemoryCache:
                entry = cache.get_nowait(full)
            else:
                entry = await cache.get(full)
        except CorruptEntry:
            self._failed("get", "corrupt", "CorruptEntry")
            entry = None
        except Exception as exc:
            breaker.granted_failure(gen, exc, now)
            self._unavailable("get", exc)
            self._misses += 1
            value: V | None = await self._load(key, refill=False)
            return value
        except BaseException as exc:
            breaker.granted_failure(gen, exc, now)  # counts as nothing
            raise
        breaker.granted_success(gen, now)
        if self._down:
            self._recovered()
        if entry is not None:
            try:
                fresh_until, value = entry  # our envelope is a pair
            except (TypeError, ValueError):
                fresh_until = None  # not a pair: garbage (below)
            if type(fresh_until) is float and clock.wall() < fresh_until and fresh_until < _NO_TIME:
                # A fresh envelope as a MemoryCache keeps it and JSON gives it back.
                self._hits += 1
                return value
            until = _entry_time(fresh_until)
            if until is None:
                self._failed("get", "corrupt", "CorruptEntry")
            elif clock.wall() < until:
                self._hits += 1
                return value
            else:
                return (await self._refresh_stale(key, value, until)).value
        self._misses += 1
        loaded: V | None = await self._load(key, refill=True)
        return loaded

    async def lookup(self, key: str) -> Lookup[V]:
        """Like `get()`, and says where the value came from and whether it is stale."""
        if self.sketch is not None:
            self.sketch.record(key)
        if (
            self._gen is None
            or self._repairs
            or self._bump_pending
            or clock.now() - self._gen_read_at >= self._refresh
        ):
            prefix = await self._read_prefix()
        else:
            prefix = self._prefix
        if prefix is None or key in self._repairs:
            self._misses += 1
            return Lookup(await self._load(key, refill=False), "source")
        ok, entry = await self._call("get", self.cache.get, prefix + key)
        if ok and entry is not None:
            envelope = _envelope(entry)
            if envelope is None:
                # Not our envelope: a miss, and the refill overwrites it.
                self._failed("get", "corrupt", "CorruptEntry")
            else:
                fresh_until, value = envelope
                if clock.wall() < fresh_until:
                    self._hits += 1
                    return Lookup(value, "cache")
                return await self._refresh_stale(key, value, fresh_until)
        self._misses += 1
        return Lookup(await self._load(key, refill=ok), "source")

    async def _refresh_stale(self, key: str, value: Any, fresh_until: float) -> Lookup[V]:
        try:
            fresh = await self._load(key, refill=True)
        except Exception as exc:
            if clock.wall() < fresh_until + self.config.stale_for:
                self._stale += 1
                if listening(self.bus, StaleServed):
                    emit(
                        StaleServed(
                            operation=self.name, at=clock.now(), error_type=type(exc).__name__
                        ),
                        self.bus,
                    )
                return Lookup(value, "stale")
            raise
        self._misses += 1
        return Lookup(fresh, "source")

    async def _load(self, key: str, *, refill: bool) -> Any:
        """Load ``key`` from the source once for all concurrent readers; ``refill`` the cache."""
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            if flight.done is None:
                flight.done = _runtime.task_event()
            await flight.done.wait()
            if flight.error is _ABANDONED:
                continue  # its leader was cancelled: lead a new load
            self._shared += 1
            if flight.error is not None:
                raise flight.error
            return flight.value
        flight = self._flights[key] = _Flight()
        seq = self._seq
        try:
            flight.value = value = await self.source.load(key)
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.error = _ABANDONED
            raise
        finally:
            # Followers wake with the value or the error already in place.
            if self._flights.get(key) is flight:
                del self._flights[key]
            if flight.done is not None:
                flight.done.set()
        self._loads += 1
        if refill and value is not None:
            await self._refill(key, value, seq)
        return value

    def _invalidated_since(self, key: str, seq: int) -> bool:
        return self._invalidated.get(key, self._floor) > seq

    async def _refill(self, key: str, value: Any, seq: int, op: str = "set") -> bool | None:
        """Cache ``value``, loaded at sequence ``seq``, unless ``key`` was invalidated since.

        True when the value stays cached, False when it was not fit to keep,
        ``None`` when the cache failed.
        """
        if self._invalidated_since(key, seq) or self._gen is None:
            return False  # the value may predate a write: do not cache it
        entry = [round(clock.wall() + self._ttl, _TIME_DECIMALS), value]
        try:
            ok, _ = await self._call(op, self.cache.set, self._prefix + key, entry, self._keep)
        except BaseException:
            self._queue_repair(key)  # cancelled mid-set: it may land, undo it later
            raise
        if not ok:
            # The set may still land later (a timeout is not a "no"): make
            # sure a later invalidation of it is not lost.
            self._queue_repair(key)
            return None
        if self._invalidated_since(key, seq):
            # An invalidation raced the write: undo the write.
            await self._delete(key)
            return False
        return True

    # -- writing ------------------------------------------------------------------

    async def write(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Write the source of truth with ``fn()``, then invalidate ``key``; returns the result.

        ``key`` is invalidated whatever ``fn`` does: when it raises, the write
        may still have reached the source (a lost answer is not a "no"), and
        a needless invalidation costs one miss where a missing one serves a
        stale value for up to ``ttl`` seconds.  If ``fn`` is cancelled, the
        invalidation goes to the repair list (nothing may be awaited then).
        The invalidation itself never raises: a cache that cannot take it
        gets it later (the repair list).
        """
        try:
            result = await fn()
        except Exception:
            await self.invalidate(key)
            raise
        except BaseException:
            self._forget(key)
            self._queue_repair(key)
            raise
        await self.invalidate(key)
        return result

    async def invalidate(self, key: str) -> None:
        """Remove ``key`` from the cache now, or as soon as the cache is back."""
        self._forget(key)
        await self._delete(key)

    def _forget(self, key: str) -> None:
        """Make every load of ``key`` begun until now unfit to refill the cache."""
        self._seq += 1
        invalidated = self._invalidated
        invalidated[key] = self._seq
        invalidated.move_to_end(key)
        if len(invalidated) > _INVALIDATION_MEMORY:
            _, forgotten = invalidated.popitem(last=False)
            self._floor = max(self._floor, forgotten)
        self._flights.pop(key, None)  # readers from now on load afresh

    async def invalidate_all(self) -> None:
        """Invalidate every key of the namespace (now, or as soon as the cache is back)."""
        self._seq += 1
        self._floor = self._seq
        self._flights.clear()
        self._repairs.clear()
        self._bump_pending = True
        self._rearm()
        await self.repair()

    async def _delete(self, key: str) -> None:
        if self._bump_pending:
            return  # the whole namespace goes anyway
        ok = False
        if self._gen is not None:
            try:
                ok, _ = await self._call("delete", self.cache.delete, [self._prefix + key])
            except BaseException:
                self._queue_repair(key)  # cancelled: the delete is applied later
                raise
        if not ok:
            self._queue_repair(key)

    def _queue_repair(self, key: str) -> None:
        if self._bump_pending:
            return
        overflowed = len(self._repairs) >= self.config.repair_limit and key not in self._repairs
        if overflowed:
            self._repairs.clear()
            self._bump_pending = True
        else:
            self._repairs[key] = None
        self._rearm()
        if listening(self.bus, RepairQueued):
            emit(
                RepairQueued(
                    operation=self.name,
                    at=clock.now(),
                    pending=len(self._repairs),
                    overflowed=overflowed,
                ),
                self.bus,
            )

    async def repair(self) -> bool:
        """Apply the pending invalidations if the cache takes them; True when none is left."""
        if self._repairing:
            return False
        self._repairing = True
        try:
            if self._bump_pending:
                ok, generation = await self._call("repair", self.cache.incr, self._gen_key)
                if not ok or generation is None:
                    return False
                self._bump_pending = False
                self._set_generation(generation)
            if self._repairs and self._gen is None:
                ok, generation = await self._call("generation", self.cache.counter, self._gen_key)
                if not ok or generation is None:
                    return False
                self._set_generation(generation)
            while self._repairs:
                batch = list(itertools.islice(self._repairs, _REPAIR_BATCH))
                keys = [self._prefix + k for k in batch]
                ok, _ = await self._call("repair", self.cache.delete, keys)
                if not ok:
                    return False
                for key in batch:
                    self._repairs.pop(key, None)
            return True
        finally:
            self._repairing = False
            self._rearm()  # what was applied (a concurrent queueing kept it off)

    # -- warming ------------------------------------------------------------------

    async def warm(self, keys: Iterable[str], *, reason: WarmReason = "start") -> int:
        """Load ``keys`` from the source into the cache at ``warm_rate``; returns how many stored.

        Stops early (returning what it stored) when the cache or the source fails.
        """
        wanted = list(dict.fromkeys(keys))
        batch_size = self.config.warm_batch
        pause = batch_size / self.config.warm_rate
        stored = 0
        for start in range(0, len(wanted), batch_size):
            if start:
                await _runtime.sleep_async(pause)
            prefix = await self._read_prefix()
            if prefix is None:
                break
            batch = [k for k in wanted[start : start + batch_size] if k not in self._repairs]
            seq = self._seq
            try:
                values = await self.source.load_many(batch)
            except Exception:
                break
            self._loads += len(values)
            failed = False
            for key in batch:
                value = values.get(key)
                if value is None:
                    continue
                kept = await self._refill(key, value, seq, "warm")
                if kept is None:
                    failed = True  # the cache failed: the next recovery warms again
                    break
                stored += kept
            if failed:
                break
        if listening(self.bus, CacheWarmed):
            emit(
                CacheWarmed(
                    operation=self.name,
                    at=clock.now(),
                    reason=reason,
                    requested=len(wanted),
                    stored=stored,
                ),
                self.bus,
            )
        return stored

    def _keys_for(self, reason: WarmReason) -> list[str]:
        hot = self.sketch if self.sketch is not None else HotKeySketch(width=1, depth=1, top=1)
        keys: list[str] = []
        for policy in self.warming:
            keys.extend(policy.keys_to_warm(reason, hot))
        return keys

    async def maintain(self) -> None:
        """Warm at start, then repair and warm after every recovery; runs until cancelled.

        Run it in a task your application owns (``tg.start_soon(cache.maintain)``).
        """
        await self.warm(self._keys_for("start"), reason="start")
        handled = self._recoveries
        while True:
            if self._recoveries == handled:
                self._wake = _runtime.task_event()
                await self._wake.wait()
                self._wake = None
            handled = self._recoveries
            await self.repair()
            await self.warm(self._keys_for("recovered"), reason="recovered")

    async def get_many(self, keys: Sequence[str]) -> dict[str, V]:
        """The values of the existing ``keys`` (each read as by `get()`)."""
        found: dict[str, V] = {}
        for key in keys:
            value = await self.get(key)
            if value is not None:
                found[key] = value
        return found
