"""The replay of database work, shared by ``transaction.py`` and ``ManagedPool``.

What a transaction and a statement run need (their configuration, the
attempt functions, the COMMIT-in-doubt resolution, the retry engines) lives
here, below both the pool and the public face of ``transaction.py``: the pool's
``transaction()`` / ``run()`` methods and the module functions of the same
names both drive it, and it knows a pool only through
[`ReplayPool`][datapunk_recovery.database._replay.ReplayPool], so no import
goes round in a circle.  Users import these names from
``datapunk_recovery.database.transaction``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Protocol, TypeVar

from datapunk_recovery._core import clock
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import ErrorCategory, classify, mark_final
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.policy import RetryGate, RetryPolicy
from datapunk_recovery._core.validate import check_choice, shown
from datapunk_recovery._execution import runtime as _runtime
from datapunk_recovery._execution.engine import retry

from .errors import (
    CommitOutcomeUnknown,
    ConnectionLost,
    DbErrorKind,
    MissingExtensionError,
    TransactionRolledBack,
    classify_database,
    describe,
    explain_missing,
)

#: A connection's transaction state, as a driver reports it (``driver.state(conn)``).
OPEN: Final = "open"
ABORTED: Final = "aborted"
IDLE: Final = "idle"


class ReplayDriver(Protocol):
    """What the replay asks a driver adapter (``ManagedPool.adapter``)."""

    async def begin(self, conn: Any, isolation: str | None, read_only: bool) -> Any: ...
    async def commit(self, conn: Any, handle: Any) -> bool: ...
    def is_broken(self, conn: Any) -> bool: ...
    def state(self, conn: Any) -> str: ...
    def abort_code(self, handle: Any) -> str | None: ...
    def backend_pid(self, conn: Any) -> int | None: ...
    async def backend_alive(self, conn: Any, pid: int, terminate: bool) -> bool: ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class ReplayPool(Protocol):
    """What the replay asks a pool.

    A [`ManagedPool`][datapunk_recovery.database.pool.ManagedPool] is one.
    """

    @property
    def bus(self) -> EventBus: ...
    @property
    def config(self) -> _Named: ...
    @property
    def adapter(self) -> ReplayDriver: ...
    async def acquire(self) -> Any: ...
    async def release(self, conn: Any) -> None: ...
    async def settle(self, conn: Any, error: BaseException | None, handle: Any = None) -> None: ...
    async def discard(self, conn: Any, error: BaseException | None) -> None: ...
    def connection(self) -> AbstractAsyncContextManager[Any]: ...


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

# Why an error after fn ended the transaction itself is never replayed.
_ENDED_BY_FN: Final = (
    "fn ended the transaction itself before failing: what it committed would be committed again"
)
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

    ``retry``: a [`RetryConfig`][datapunk_recovery._core.backoff.RetryConfig] or a per-category
    [`RetryPolicy`][datapunk_recovery._core.policy.RetryPolicy]
    (default [`DEFAULT_POLICY`][datapunk_recovery.database.transaction.DEFAULT_POLICY]);
    ``isolation``: the isolation level
    (``None``: the server's default); ``read_only``: begin a read-only
    transaction; ``budget``: a retry budget
    ([`TokenBudget`][datapunk_recovery.budget.TokenBudget],
    [`RatioBudget`][datapunk_recovery.budget.RatioBudget], any
    [`RetryGate`][datapunk_recovery._core.policy.RetryGate]) asked before every
    replay, so that replays count against the same budget as the service's
    other retries (``None``: no budget).
    """

    retry: RetryPolicy | RetryConfig = DEFAULT_POLICY
    isolation: Isolation | None = None
    read_only: bool = False
    budget: RetryGate | None = None

    def __post_init__(self) -> None:
        retry = RetryPolicy.of(self.retry, where="TransactionConfig.retry")
        object.__setattr__(self, "retry", retry)
        if self.isolation is not None:
            isolation = check_choice("TransactionConfig", "isolation", self.isolation, Isolation)
            object.__setattr__(self, "isolation", isolation)
        if not isinstance(self.read_only, bool):
            raise TypeError(
                f"TransactionConfig.read_only: expected a bool, got {shown(self.read_only)}"
            )
        check_gate("TransactionConfig", self.budget)


def check_gate(owner: str, budget: object) -> None:
    """Raise ``TypeError`` naming ``owner.budget`` unless it is ``None`` or a retry budget."""
    if budget is not None and not (
        callable(getattr(budget, "allow_retry", None))
        and callable(getattr(budget, "on_attempt", None))
    ):
        raise TypeError(
            f"{owner}.budget: expected a retry budget (allow_retry, on_attempt) or None, "
            f"got {type(budget).__name__}"
        )


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


async def _check(pool: ReplayPool, check: IdempotencyCheck, pid: int | None) -> bool:
    async with pool.connection() as conn:
        if pid is not None:
            await _settled(pool, conn, pid)
        return bool(await check(conn))


async def _settled(pool: ReplayPool, conn: Any, pid: int) -> None:
    """Wait until the backend that received the lost COMMIT has ended.

    Until then its transaction may still commit, and a check would race it.
    Past half of `_SETTLE_TIME` the backend is terminated (a COMMIT it
    is running still completes; one it has not started is rolled back).
    """
    driver = pool.adapter
    start = clock.now()
    delay = 0.005
    while await driver.backend_alive(conn, pid, clock.now() - start > _SETTLE_TIME / 2):
        if clock.now() - start > _SETTLE_TIME:
            raise TimeoutError(f"the backend of the lost COMMIT still runs after {_SETTLE_TIME} s")
        await _runtime.sleep_async(delay)
        delay = min(delay * 2, 0.1)


async def _resolve(
    pool: ReplayPool,
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


def _not_committed(name: str, state: str, code: str | None) -> TransactionRolledBack:
    """The error for a transaction that cannot commit: ``state`` is how we know."""
    cause = f" (SQLSTATE {code})" if code is not None else ""
    if state == IDLE:
        why = (
            "no transaction was open when COMMIT was due: the database rolled it back "
            "after an error fn caught, or fn ended it itself (ROLLBACK or COMMIT on conn; "
            "what it committed then is outside this transaction)"
        )
    elif state == ABORTED:
        why = f"the server had aborted the transaction after an error{cause} that fn caught"
    else:
        why = (
            "COMMIT answered ROLLBACK: the server had aborted the transaction "
            f"after an error{cause} that fn caught"
        )
    return TransactionRolledBack(
        f"{name!r}: {why}; the transaction did not commit. Not replayed: to carry on after an "
        "error inside a transaction, run the statement in a savepoint.",
        code=code,
        operation=name,
    )


async def _transaction_attempt(
    pool: ReplayPool,
    fn: Callable[[Any], Awaitable[T]],
    config: TransactionConfig,
    check: IdempotencyCheck | None,
    name: str,
) -> T:
    driver = pool.adapter
    conn = await pool.acquire()
    handle = None
    try:
        handle = await driver.begin(conn, config.isolation, config.read_only)
        result = await fn(conn)
        if driver.is_broken(conn):
            raise ConnectionLost(f"{name!r}: the connection broke before COMMIT was sent")
        state = driver.state(conn)
        if state != OPEN:  # known not to commit: no COMMIT sent
            # PostgreSQL never ends a transaction on an error by itself (it
            # aborts it): an idle connection means fn ended it, no error did.
            code = driver.abort_code(handle) if state == ABORTED else None
            raise _not_committed(name, state, code)
    except BaseException as exc:
        broken = driver.is_broken(conn)
        ended = handle is not None and not broken and driver.state(conn) == IDLE
        await pool.settle(conn, exc, handle)
        if isinstance(exc, Exception):
            raised = _surfaced(exc, broken) or exc
            if ended:
                # fn ended our transaction itself (COMMIT or ROLLBACK on conn)
                # before failing: what it committed stays, a replay repeats it.
                mark_final(raised, _ENDED_BY_FN)
            if raised is not exc:
                raise raised from exc
        raise
    pid = driver.backend_pid(conn)
    try:
        committed = await driver.commit(conn, handle)
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
    if not committed:
        raise _not_committed(name, OPEN, driver.abort_code(handle))
    return result


async def _run_attempt(
    pool: ReplayPool,
    fn: Callable[[Any], Awaitable[T]],
    idempotent: bool,
    name: str,
) -> T:
    driver = pool.adapter
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
    if not driver.is_broken(conn) and driver.state(conn) != IDLE:
        # fn began a transaction and returned with it open: giving the
        # connection back rolls it back, so the work must not be acknowledged.
        left_open = TransactionRolledBack(
            f"{name!r}: fn returned with a transaction still open; it was rolled back and "
            "nothing of it was committed (commit it in fn, or use transaction())",
            operation=name,
        )
        await pool.settle(conn, left_open)
        raise left_open
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
    wrapped = retry(policy, on=replayable, name=name, budget=config.budget)(attempt)
    if len(_engines) >= _ENGINES_MAX:
        _engines.pop(next(iter(_engines)))
    _engines[key] = (config, wrapped)
    return wrapped


async def replay_transaction(
    pool: ReplayPool,
    fn: Callable[[Any], Awaitable[T]],
    config: TransactionConfig | None,
    idempotency_check: IdempotencyCheck | None,
    name: str | None,
) -> T:
    """``transaction()`` on a managed pool (see ``datapunk_recovery.database.transaction``)."""
    cfg = config if config is not None else _DEFAULT_CONFIG
    operation = name or f"{pool.config.name}.transaction"
    attempt = _engine("transaction", cfg, operation, _transaction_attempt)
    result: T = await attempt(pool, fn, cfg, idempotency_check, operation)
    return result


async def replay_run(
    pool: ReplayPool,
    fn: Callable[[Any], Awaitable[T]],
    idempotent: bool,
    config: TransactionConfig | None,
    name: str | None,
) -> T:
    """``run()`` on a managed pool (see ``datapunk_recovery.database.transaction``)."""
    cfg = config if config is not None else _DEFAULT_CONFIG
    operation = name or f"{pool.config.name}.run"
    attempt = _engine("run", cfg, operation, _run_attempt)
    result: T = await attempt(pool, fn, idempotent, operation)
    return result
