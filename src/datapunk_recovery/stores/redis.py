"""The Redis store: one connection to Redis that shared primitives run their scripts on.

When a service runs as many replicas, each with its own breaker or retry
budget, one replica keeps hammering a dead dependency the others already gave
up on.  A [`RedisStore`][datapunk_recovery.stores.redis.RedisStore] is where
their shared state lives; it knows how to talk to Redis, never what a breaker
or a budget is (each primitive's shared link holds its own script and rules:
``breaker/shared.py`` with ``breaker/shared.lua``, ``budget/shared.py``).

What the store gives a link:

- **Keys** (`RedisStore.keys()`) are ``{prefix}:{<kind>:<name>}:<part>``: the
  hash tag ``{<kind>:<name>}`` puts every key of one primitive in one Redis
  Cluster slot, so a script may touch them all; every write refreshes a TTL
  (``key_ttl`` seconds) so abandoned keys expire.
- **Scripts** (`RedisStore.script()`) are registered once per store
  (``EVALSHA``, reloaded by redis-py after a server restart).  State is plain
  hash fields (numbers), validated by the script on every read: a state that
  does not parse is reset and reported, never trusted.  Nothing is pickled.
- **Commands** (`RedisStore.run()`) run in tasks the store owns: a caller
  waits at most ``timeout`` seconds for one and never cancels it, so our
  timeouts close no connection and no driver can swallow a caller's
  cancellation; [`RedisStore.aclose()`][datapunk_recovery.stores.redis.RedisStore.aclose]
  lands the writes of every attached link (`RedisStore.attach()`) and ends
  every task, within bounds.
- **Settings** every link follows: ``cache_ttl``, ``timeout``,
  ``retry_interval``, ``key_ttl``, ``on_unavailable``, ``max_pending``,
  ``flush_interval``, ``flush_max`` (see the class).

Redis errors never reach the caller: a link catches every failed or late
command and falls back to its primitive's local state (``on_unavailable=
"local"``) or refuses (``"closed"``) until Redis answers again, tried every
``retry_interval`` seconds.

A Redis Cluster or a Sentinel-managed master is used like one server (a
client object, or a ``redis+cluster://`` / ``redis+sentinel://`` URL): every
script names all its keys, which share one hash tag, and keeps them all in
existence, so the cluster client routes it, follows ``MOVED`` and ``ASK``
through a failover or a live slot migration, and reloads a script a new
master lacks (``NOSCRIPT``).

One command sent runs at most once: redis-py re-sends a command whose
connection failed by itself (ten times for a ``Redis(host=..., port=...)`` or
a ``RedisCluster`` in redis-py 6 and later), and when Redis had run it and
only the reply was lost, the re-send runs it again unseen.  The store turns
that off on the client it is given or builds
(`no_hidden_resend()`, for every user of that client); a failed command is
the link's to judge, as when Redis is away.

Async only, asyncio only (redis.asyncio); a sync breaker asked to use it raises
``TypeError``.  Time in shared state is Redis's own clock (``TIME``), so
processes whose monotonic clocks differ still agree on when an open period ends;
under an installed [`FakeClock`][datapunk_recovery._core.clock.FakeClock] the scripts take the
fake time instead (see `script_time()`), so tests drive shared state like local state.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Final, Literal

from .._core import clock
from .._core.errors import ErrorCategory, classify
from .._core.validate import check_count, check_seconds, shown
from .._execution import runtime as _runtime
from . import Attached
from .clients import client_from_url, no_hidden_resend

__all__ = ["RedisStore"]

_OWNER: Final = "RedisStore"

#: Seconds a store waits, after Redis refused its login or a command, before
#: asking again (at most one failed login per store in that time).
AUTH_RETRY_INTERVAL: Final = 300.0


class StoreRefused(RuntimeError):
    """Redis refused this store's login or command lately: not asked again yet."""


class StoreBusy(RuntimeError):
    """``max_pending`` commands already wait for Redis: the caller falls back at once.

    Raised inside the store only, never to a caller.
    """


class StoreClosed(RuntimeError):
    """The store was closed (`RedisStore.aclose()`): its primitives decide locally.

    Raised inside the store only, never to a caller: without it, redis-py
    would quietly open a new connection that nobody closes.
    """


class RedisStore:
    """A connection to Redis that shared breakers and budgets keep their state through.

    ``client`` is a ``redis.asyncio.Redis``, a
    ``redis.asyncio.cluster.RedisCluster`` or a
    ``Sentinel(...).master_for(...)`` client (the store never closes it), or
    a URL: ``redis://`` / ``rediss://`` / ``unix://`` (one server),
    ``redis+cluster://host:port[,host:port...]`` (a Redis Cluster) or
    ``redis+sentinel://host:port[,host:port...]/service[/db]`` (the master
    the sentinels name); the store makes that client and closes it in
    [`aclose()`][datapunk_recovery.stores.redis.RedisStore.aclose].  Settings, in
    seconds:

    - ``cache_ttl``: how long a read of the shared state is trusted locally;
      it bounds how long a process may keep admitting calls after another one
      opened the breaker.  Default 0.5.
    - ``timeout``: the longest any Redis operation may take before the link
      falls back to local state.  Default 0.25.
    - ``retry_interval``: how often a link whose store failed tries it again.
      Default 1.0.
    - ``key_ttl``: abandoned keys expire after this long (every write renews
      it); at least ``2 * max_open_duration`` of the breakers is used.  Default 3600.
    - ``on_unavailable``: ``"local"`` (default: judge calls on the breaker's
      local state while Redis is away) or ``"closed"`` (refuse every call).
    - ``max_pending``: Redis commands in flight per store (and outcome writes
      per breaker); past it, the caller decides locally at once and outcomes
      are applied locally (so a slow Redis cannot pile up tasks).  Default 256.
    - ``flush_interval``: outcomes of closed calls are aggregated per breaker
      and sent in one script call; a batch holding a failure or a slow call
      is sent within this many seconds (default 0.005), a batch of plain
      successes within ``cache_ttl`` (or with the next read, which carries
      it).  A batch that would trip the breaker is sent at once, as are probe
      results and server delays.
    - ``flush_max``: a batch of this many outcomes is sent at once (default
      200): with it, a busy closed breaker sends at most one command per
      ``flush_max`` calls, plus one read per ``cache_ttl``.
    """

    kind = "redis"
    is_async = True

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "datapunk",
        cache_ttl: float = 0.5,
        timeout: float = 0.25,
        retry_interval: float = 1.0,
        key_ttl: float = 3600.0,
        on_unavailable: Literal["local", "closed"] = "local",
        max_pending: int = 256,
        flush_interval: float = 0.005,
        flush_max: int = 200,
    ) -> None:
        self.cache_ttl = check_seconds(_OWNER, "cache_ttl", cache_ttl)
        self.timeout = check_seconds(_OWNER, "timeout", timeout, positive=True)
        self.retry_interval = check_seconds(_OWNER, "retry_interval", retry_interval)
        self.key_ttl = check_seconds(_OWNER, "key_ttl", key_ttl, positive=True)
        self.max_pending = check_count(_OWNER, "max_pending", max_pending)
        self.flush_interval = check_seconds(_OWNER, "flush_interval", flush_interval)
        self.flush_max = check_count(_OWNER, "flush_max", flush_max)
        if on_unavailable not in ("local", "closed"):
            raise ValueError(
                f"{_OWNER}.on_unavailable: expected 'local' or 'closed',"
                f" got {shown(on_unavailable)}"
            )
        self.on_unavailable = on_unavailable
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(
                f"{_OWNER}.prefix: expected a non-empty str without braces, got {shown(prefix)}"
            )
        self.prefix = prefix
        # The sentinels' clients of a redis+sentinel URL: closed with the client.
        self._also_close: list[Any] = []
        if isinstance(client, str):
            # The driver's own socket timeouts are looser than ``timeout``: the
            # store stops *waiting* after ``timeout`` (see run) while the
            # command lands on its connection; a driver timeout would close a
            # healthy connection that is merely slow.  They still bound a
            # blackholed server (the command then fails and its task ends).
            slack = _driver_timeout(self.timeout)
            self.client, self._also_close = client_from_url(
                client, timeout=slack, owner=_OWNER
            )
            self._owns_client = True
        elif hasattr(client, "register_script") and hasattr(client, "evalsha"):
            # A Redis, a RedisCluster or a Sentinel's master_for(): every
            # script call names all its keys (one hash tag, one slot), so a
            # cluster client routes it, follows MOVED/ASK and reloads a script
            # a new master lacks (NOSCRIPT) on its own.
            self.client = client
            self._owns_client = False
        else:
            raise TypeError(
                f"{_OWNER}.client: expected a redis.asyncio.Redis, RedisCluster, "
                f"Sentinel master_for() client or a URL, got {type(client).__name__}"
            )
        # The driver never re-sends a command by itself: a command whose reply
        # was lost may have run, and a re-send would run it again unseen.
        no_hidden_resend(self.client)
        # Registered scripts by source (see script()).
        self._scripts: dict[str, Any] = {}
        # Every link attached here, so that aclose() can land their background writes.
        self._links: weakref.WeakSet[Attached] = weakref.WeakSet()
        # Commands running now (see run): owned here, cancelled by aclose().
        self._inflight: set[asyncio.Task[Any]] = set()
        self._serial: dict[object, asyncio.Task[Any]] = {}
        self._closing = False
        self._closed = False
        self._refused_until = 0.0  # clock.now() before which Redis is not asked (auth)
        # No reply yet: the first commands also make the first connection (and,
        # in a process starting up, pay for first use of the driver's code).
        self._answered = False

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    # -- keys -----------------------------------------------------------------------
    def keys(self, kind: str, name: str, *parts: str) -> list[str]:
        """Keys of one primitive, all in one cluster slot: ``prefix:{kind:name}:part``."""
        tag = f"{self.prefix}:{{{kind}:{name}}}"
        return [f"{tag}:{part}" for part in parts]

    # -- scripts -----------------------------------------------------------------------
    def script(self, source: str) -> Any:
        """``source`` (a Lua script) registered on the client, once per store."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    def attach(self, link: Attached) -> None:
        """Land ``link``'s writes in `aclose()`, then detach it (held weakly)."""
        self._links.add(link)

    async def run(
        self, script: Any, keys: list[str], args: list[Any], *, serial: object = None
    ) -> Any:
        """Run ``script`` (one round trip); the caller waits at most ``timeout`` seconds.

        The command runs in a task of its own, owned by the store, and the
        caller only *waits* for it.  Two faults follow from cancelling a
        command inside the caller's task, and this shape avoids both:

        - redis-py closes a connection whose command is cancelled mid-reply, so
          every timeout on a busy loop would cost a new connection (churn, and
          more timeouts while it is made);
        - a driver may swallow a cancellation that lands as its reply arrives
          and return the reply: the caller's task then carries on as if never
          cancelled, and a background loop stopped by ``cancel()`` waits for
          ever (the hang of 8 processes sharing a breaker and a budget).

        A command our timeout gave up on keeps running on its connection and
        lands (or fails on the driver's own socket timeout);
        [`aclose()`][datapunk_recovery.stores.redis.RedisStore.aclose]
        cancels what is still running, after a bounded wait.  At most
        ``max_pending`` commands run at once per store: past it the caller
        falls back at once ([`StoreBusy`][datapunk_recovery.stores.redis.StoreBusy]) instead of
        piling up tasks on a
        Redis that does not answer.

        After Redis refused the login or the command (``WRONGPASS``,
        ``NOAUTH``, ``NOPERM``), nothing is sent for `AUTH_RETRY_INTERVAL`
        seconds (`StoreRefused`).

        Commands given the same ``serial`` key run one after the other: one
        waits (within the same ``timeout``) for the previous one to land, so
        Redis applies them in the order they were made even when a caller gave
        up on a reply (a budget's batches rely on it).
        """
        if self._closed or self._closing:
            raise StoreClosed(f"{self!r} is closed")
        if clock.now() < self._refused_until:
            raise StoreRefused(f"{self!r}: Redis refused our login or command; not asked again yet")
        if len(self._inflight) >= self.max_pending:
            raise StoreBusy(f"{self!r}: {len(self._inflight)} commands already in flight")
        # Until the store's first reply, a command is waited for as long as the
        # driver's connect timeout: making the first connection in a busy
        # process starting up is not Redis being away (8 processes starting at
        # once took 0.1-0.4 s for it, and fell back on a healthy Redis).
        wait = self.timeout if self._answered else _driver_timeout(self.timeout)
        deadline = _runtime.loop_time() + wait
        if serial is not None:
            previous = self._serial.get(serial)
            if previous is not None and not previous.done():
                await _runtime.wait_tasks((previous,), self.timeout)
                if not previous.done():
                    raise TimeoutError(f"{self!r}: the previous command is still running")
        task = _runtime.spawn(script(keys=keys, args=args))
        self._inflight.add(task)
        task.add_done_callback(self._landed)
        if serial is not None:
            self._serial[serial] = task
        done, _ = await _runtime.wait_tasks((task,), max(deadline - _runtime.loop_time(), 0.0))
        if not done:
            raise TimeoutError(f"{self!r}: no reply within {self.timeout} s")
        if task.cancelled():  # (by aclose, or inside the driver): never the caller's
            if self._closing:
                raise StoreClosed(f"{self!r} is closed")
            raise ConnectionError(f"{self!r}: the command was cancelled inside the driver")
        try:
            reply = task.result()
        except Exception as exc:
            if classify(exc).category is ErrorCategory.AUTH:
                # Another try would be another failed login, which can lock
                # the account: no link asks again for AUTH_RETRY_INTERVAL s.
                self._refused_until = clock.now() + AUTH_RETRY_INTERVAL
            raise
        self._answered = True
        return reply

    def _landed(self, task: asyncio.Task[Any]) -> None:
        """A command ended: forget it; its error (if nobody waited for it) is consumed."""
        self._inflight.discard(task)
        for key in [k for k, t in self._serial.items() if t is task]:
            del self._serial[key]
        if not task.cancelled() and task.exception() is None:  # (retrieved: no warning)
            self._answered = True

    @property
    def in_flight(self) -> int:
        """How many commands the store started that have not ended yet (at most ``max_pending``)."""
        return len(self._inflight)

    @property
    def closing(self) -> bool:
        """Whether `aclose()` has begun: links apply new outcomes locally."""
        return self._closing

    @property
    def closed(self) -> bool:
        """Whether `aclose()` has finished: the store sends nothing more."""
        return self._closed

    async def aclose(self) -> None:
        """Land the outcome writes in flight, then close the client if the store made it.

        Every wait is bounded: the writes get ``timeout`` seconds (a write
        scheduled meanwhile is applied locally instead); commands still running
        after that are cancelled and get ``timeout`` seconds more to end, and
        closing the client gets ``timeout`` seconds too.  Whatever a driver
        does, ``aclose`` returns.  Afterwards the store opens no connection: its
        breakers decide on their local state (as when Redis is away) and
        outcomes count there only.  Closing twice is harmless.
        """
        if self._closing:
            return
        await _runtime.await_bounded(
            _runtime.gather(*(link.flush() for link in list(self._links))), self.timeout
        )
        self._closing = True  # from now on no new command starts
        running = list(self._inflight)
        if running:
            _, late = await _runtime.wait_tasks(running, self.timeout)
            for task in late:
                task.cancel()
            if late:
                await _runtime.wait_tasks(late, self.timeout)
        for link in list(self._links):
            link.detach()
        self._closed = True
        if self._owns_client:
            await _runtime.await_bounded(self.client.aclose(), self.timeout)
            for extra in self._also_close:
                await _runtime.await_bounded(extra.aclose(), self.timeout)


def script_time() -> str:
    """The time a script takes as "now": the installed fake clock's, else Redis's own.

    Shared state is timed on Redis's clock (``TIME``) so that processes whose
    monotonic clocks differ agree; under a
    [`FakeClock`][datapunk_recovery._core.clock.FakeClock] (tests, simulations) the
    scripts run on the fake time instead, so that a shared primitive moves
    exactly as a local one driven by the same clock.  Returns seconds as a
    string, or ``""`` for Redis's clock.
    """
    fake = clock.current_fake()
    return "" if fake is None else repr(fake.now())


def _driver_timeout(timeout: float) -> float:
    """Socket timeouts of a client the store makes: 4x its own, at least 2 s (seconds)."""
    return max(4.0 * timeout, 2.0)
