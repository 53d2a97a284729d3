"""Transactions replayed from the start, statements retried only when safe.

:func:`transaction` runs ``fn(conn)`` between ``BEGIN`` and ``COMMIT`` and,
on a failure that another attempt can cure (serialization failure,
deadlock, a lost connection, a server out of connections), rolls back or
discards the connection and runs the *whole* function again on a fresh
connection.  ``fn`` must therefore do all of its database work through
``conn`` and keep no side effects outside the database before it returns.

The one failure never replayed blindly is a connection lost while ``COMMIT``
was in flight: the server may have committed before the answer was lost.
Without an idempotency check that raises :class:`CommitOutcomeUnknown`; with
one (``idempotency_check(conn) -> bool``, run on a fresh connection, true
when the work is already there) the recovery waits until the server process
that received the COMMIT has ended (so the COMMIT cannot land after the
check), looks, returns the result if the work committed, and replays only if
it did not.

:func:`run` runs ``fn(conn)`` outside a transaction, where each statement
commits on its own.  Failures that happen before ``fn`` starts (no
connection, a full server) are retried as usual.  Once ``fn`` has started,
only work the caller marks idempotent is retried: even an error the server
reported (a deadlock) may come after earlier statements of ``fn`` committed,
which a replay would repeat.  Without the mark, such an error is raised
marked final (:func:`~datapunk_recovery.errors.mark_final`: no outer layer
retries it either), and a connection lost while a statement was in flight
becomes :class:`CommitOutcomeUnknown`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, TypeVar

from datapunk_recovery import _runtime, clock
from datapunk_recovery.backoff import RetryConfig
from datapunk_recovery.engine import retry
from datapunk_recovery.errors import ErrorCategory, classify, mark_final
from datapunk_recovery.events import Event, EventBus, emit, listening
from datapunk_recovery.policy import RetryPolicy

from .errors import (
    CommitOutcomeUnknown,
    ConnectionLost,
    DbErrorKind,
    MissingExtensionError,
    classify_database,
    describe,
    explain_missing,
)
from .pool import ManagedPool

__all__ = [
    "DEFAULT_POLICY",
    "CommitUncertain",
    "IdempotencyCheck",
    "Isolation",
    "TransactionConfig",
    "replayable",
    "run",
    "transaction",
]

T = TypeVar("T")

IdempotencyCheck = Callable[[Any], Awaitable[bool]]
"""``check(conn) -> bool``: on a fresh connection, is the work already committed?"""

DEFAULT_POLICY: Final = RetryPolicy(
    RetryConfig(max_attempts=5, base_delay=0.01, max_delay=1.0),
    per_category={
        # Too many connections, pool exhausted: the server needs room, not speed.
        ErrorCategory.RESOURCE: RetryConfig(max_attempts=5, base_delay=0.25, max_delay=5.0),
    },
)
"""Five attempts, 10 ms to 1 s full jitter; resource errors 0.25 s to 5 s."""

# How long to wait for the backend of a lost COMMIT to end before checking (s).
_SETTLE_TIME: Final = 5.0
# The idempotency check itself survives a connection or two failing.
_CHECK_POLICY: Final = RetryConfig(max_attempts=4, base_delay=0.05, max_delay=1.0)


class Isolation(StrEnum):
    """Transaction isolation levels (PostgreSQL's names, underscores for spaces)."""

    READ_COMMITTED = "read_committed"
    REPEATABLE_READ = "repeatable_read"
    SERIALIZABLE = "serializable"


@dataclass(frozen=True, slots=True)
class TransactionConfig:
    """How transactions and statements are run and replayed.

    ``retry``: a :class:`RetryConfig` or a per-category :class:`RetryPolicy`
    (default :data:`DEFAULT_POLICY`); ``isolation``: the isolation level
    (``None``: the server's default); ``read_only``: begin a read-only
    transaction.
    """

    retry: RetryPolicy | RetryConfig = DEFAULT_POLICY
    isolation: Isolation | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "retry", RetryPolicy.of(self.retry))
        if self.isolation is not None:
            try:
                object.__setattr__(self, "isolation", Isolation(self.isolation))
            except ValueError:
                kinds = ", ".join(i.value for i in Isolation)
                raise ValueError(
                    f"TransactionConfig.isolation: expected one of {kinds}, got {self.isolation!r}"
                ) from None
        if not isinstance(self.read_only, bool):
            raise TypeError(f"TransactionConfig.read_only: expected a bool, got {self.read_only!r}")


_DEFAULT_CONFIG: Final = TransactionConfig()


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitUncertain(Event):
    """A connection died while COMMIT was in flight.

    ``resolution``: ``unknown`` (no idempotency check: CommitOutcomeUnknown
    raised), ``committed`` (the check found the work), ``absent`` (it did not:
    replayed), ``check_failed`` (the check itself failed).
    """

    name: ClassVar[str] = "database.commit_uncertain"
    area: ClassVar[str] = "database"

    resolution: str
    error_type: str


def replayable(exc: BaseException) -> bool:
    """Whether another attempt can cure ``exc`` (the retry predicate of this module)."""
    verdict = classify_database(exc)
    if verdict.kind is DbErrorKind.NOT_DATABASE:
        return classify(exc).retryable
    return verdict.retryable


def _surfaced(exc: Exception, broken: bool) -> Exception | None:
    """The error to raise instead of ``exc``, or ``None`` to re-raise ``exc`` itself."""
    verdict = classify_database(exc)
    if verdict.kind is DbErrorKind.MISSING and not isinstance(exc, MissingExtensionError):
        return explain_missing(exc)
    if broken and verdict.kind is DbErrorKind.FATAL and verdict.code is None:
        # A driver complaint with no SQLSTATE about a connection that broke
        # under it: the connection is what failed.
        return ConnectionLost(f"the connection broke ({describe(exc)})")
    return None


def _uncertain(bus: EventBus, operation: str, resolution: str, error: BaseException) -> None:
    if listening(bus):
        emit(
            CommitUncertain(
                operation=operation,
                at=clock.now(),
                resolution=resolution,
                error_type=type(error).__name__,
            ),
            bus,
        )


async def _check(pool: ManagedPool, check: IdempotencyCheck, pid: int | None) -> bool:
    async with pool.connection() as conn:
        if pid is not None:
            await _settled(pool, conn, pid)
        return bool(await check(conn))


async def _settled(pool: ManagedPool, conn: Any, pid: int) -> None:
    """Wait until the backend that received the lost COMMIT has ended.

    Until then its transaction may still commit, and a check would race it.
    Past half of :data:`_SETTLE_TIME` the backend is terminated (a COMMIT it
    is running still completes; one it has not started is rolled back).
    """
    driver = pool._driver
    start = clock.now()
    delay = 0.005
    while await driver.backend_alive(conn, pid, clock.now() - start > _SETTLE_TIME / 2):
        if clock.now() - start > _SETTLE_TIME:
            raise TimeoutError(f"the backend of the lost COMMIT still runs after {_SETTLE_TIME} s")
        await _runtime.sleep_async(delay)
        delay = min(delay * 2, 0.1)


async def _resolve(
    pool: ManagedPool,
    error: Exception,
    result: T,
    check: IdempotencyCheck | None,
    name: str,
    pid: int | None,
) -> T:
    """COMMIT's answer was lost: find out with ``check``, or raise CommitOutcomeUnknown."""
    lost = describe(error)
    if check is None:
        _uncertain(pool.bus, name, "unknown", error)
        raise CommitOutcomeUnknown(
            f"{name!r}: the connection was lost while COMMIT was in flight ({lost}); "
            "the transaction may or may not have committed. Pass idempotency_check= "
            "to let the recovery look on a fresh connection.",
            context={"operation": name},
        ) from error
    checked = retry(_CHECK_POLICY, on=replayable, name=f"{name}.idempotency_check")(_check)
    try:
        committed = await checked(pool, check, pid)
    except Exception as check_error:
        _uncertain(pool.bus, name, "check_failed", error)
        raise CommitOutcomeUnknown(
            f"{name!r}: the connection was lost while COMMIT was in flight ({lost}) "
            f"and the idempotency check failed too ({describe(check_error)}); "
            "the transaction may or may not have committed.",
            context={"operation": name},
        ) from check_error
    if committed:
        _uncertain(pool.bus, name, "committed", error)
        return result
    _uncertain(pool.bus, name, "absent", error)
    raise ConnectionLost(
        f"{name!r}: the connection was lost during COMMIT ({lost}) and the idempotency "
        "check found the work absent: replaying it"
    ) from error


async def _transaction_attempt(
    pool: ManagedPool,
    fn: Callable[[Any], Awaitable[T]],
    config: TransactionConfig,
    check: IdempotencyCheck | None,
    name: str,
) -> T:
    driver = pool._driver
    conn = await pool.acquire()
    handle = None
    try:
        handle = await driver.begin(conn, config.isolation, config.read_only)
        result = await fn(conn)
        if driver.is_broken(conn):
            raise ConnectionLost(f"{name!r}: the connection broke before COMMIT was sent")
    except BaseException as exc:
        broken = driver.is_broken(conn)
        await pool.settle(conn, exc, handle)
        if isinstance(exc, Exception) and (replacement := _surfaced(exc, broken)) is not None:
            raise replacement from exc
        raise
    pid = driver.backend_pid(conn)
    try:
        await driver.commit(conn, handle)
    except Exception as exc:
        verdict = classify_database(exc)
        if verdict.definite:
            # The server answered: the transaction was rolled back.
            await pool.settle(conn, exc, handle)
            if (replacement := _surfaced(exc, False)) is not None:
                raise replacement from exc
            raise
        await pool.discard(conn, exc)
        return await _resolve(pool, exc, result, check, name, pid)
    except BaseException:
        await pool.discard(conn, None)
        raise
    await pool.release(conn)
    return result


async def _run_attempt(
    pool: ManagedPool,
    fn: Callable[[Any], Awaitable[T]],
    idempotent: bool,
    name: str,
) -> T:
    driver = pool._driver
    conn = await pool.acquire()
    try:
        result = await fn(conn)
    except BaseException as exc:
        broken = driver.is_broken(conn)
        await pool.settle(conn, exc)
        if isinstance(exc, Exception):
            replacement = _surfaced(exc, broken)
            surfaced = exc if replacement is None else replacement
            if not idempotent and replayable(surfaced):
                verdict = classify_database(surfaced)
                in_doubt = broken or not verdict.definite
                if in_doubt and verdict.kind is not DbErrorKind.NOT_DATABASE:
                    raise CommitOutcomeUnknown(
                        f"{name!r}: the connection was lost while the statement was in flight "
                        f"({describe(exc)}); it may or may not have taken effect, and it is "
                        "not marked idempotent, so it is not retried",
                        context={"operation": name},
                    ) from exc
                # The server refused this statement, but earlier statements of
                # fn committed on their own: replaying fn would repeat them.
                mark_final(surfaced, "work outside a transaction not marked idempotent")
            if replacement is not None:
                raise replacement from exc
        raise
    await pool.release(conn)
    return result


# Retry-wrapped attempt functions, built once per (kind, config, name): the
# engine's per-operation statistics then add up across calls.
_ENGINES_MAX: Final = 256
_engines: dict[tuple[str, int, str], tuple[TransactionConfig, Any]] = {}


def _engine(kind: str, config: TransactionConfig, name: str, attempt: Any) -> Any:
    key = (kind, id(config), name)
    found = _engines.get(key)
    if found is not None and found[0] is config:
        return found[1]
    policy = config.retry
    assert isinstance(policy, RetryPolicy)
    wrapped = retry(policy, on=replayable, name=name)(attempt)
    if len(_engines) >= _ENGINES_MAX:
        _engines.pop(next(iter(_engines)))
    _engines[key] = (config, wrapped)
    return wrapped


async def transaction(
    pool: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    config: TransactionConfig | None = None,
    idempotency_check: IdempotencyCheck | None = None,
    name: str | None = None,
) -> T:
    """Run ``fn(conn)`` in a transaction on ``pool``, replayed whole on a retryable failure.

    ``pool`` is a :class:`ManagedPool`, an ``asyncpg.Pool`` or a
    ``psycopg_pool.AsyncConnectionPool``.  Returns what ``fn`` returned.
    Raises the last error when attempts run out; :class:`CommitOutcomeUnknown`
    when COMMIT's answer was lost and ``idempotency_check`` was not given (or
    failed); :class:`MissingExtensionError` (from the driver's error) when a
    function, type or extension is missing.
    """
    managed = ManagedPool.of(pool)
    cfg = config if config is not None else _DEFAULT_CONFIG
    operation = name or f"{managed.config.name}.transaction"
    attempt = _engine("transaction", cfg, operation, _transaction_attempt)
    result: T = await attempt(managed, fn, cfg, idempotency_check, operation)
    return result


async def run(
    pool: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    idempotent: bool = False,
    config: TransactionConfig | None = None,
    name: str | None = None,
) -> T:
    """Run ``fn(conn)`` outside a transaction (each statement commits alone).

    Failures before ``fn`` starts (no connection, a full server) are retried
    either way.  A failure once ``fn`` has started is retried only with
    ``idempotent=True``: otherwise a connection lost mid-statement raises
    :class:`CommitOutcomeUnknown`, and any other error (even a deadlock the
    server reported, which may follow statements of ``fn`` that committed) is
    raised as itself, marked final so no outer layer replays it either.
    ``config.isolation`` and ``read_only`` do not apply here.
    """
    managed = ManagedPool.of(pool)
    cfg = config if config is not None else _DEFAULT_CONFIG
    operation = name or f"{managed.config.name}.run"
    attempt = _engine("run", cfg, operation, _run_attempt)
    result: T = await attempt(managed, fn, idempotent, operation)
    return result
