"""Model-inference recovery: smaller batches on out-of-memory, then an alternative model.

A batch that does not fit on a device fails with an out-of-memory error;
retrying the same batch fails the same way.  What helps is a smaller batch:
[`InferenceRecovery`][datapunk_recovery.resource.inference.InferenceRecovery] halves the chunk size
until the chunks fit (down
to ``min_batch_size``), runs the rest of the batch at the size that worked,
and merges the outputs back in input order.  When even the smallest chunk
does not fit, it falls back to the next alternative (another device, a
smaller model) for every item not yet served.  Each step is an event.

Out-of-memory errors are recognised by the *name* of their type or of one
of its bases (``OutOfMemoryError`` as torch raises, ``MemoryError``,
TensorFlow's ``ResourceExhaustedError``), so no framework is imported.
Transient errors (what [`classify()`][datapunk_recovery._core.errors.classify] calls
retryable) get a plain retry of the same chunk through the retry engine;
anything else propagates.  Works with any callable that maps a list of
inputs to a sequence of outputs of the same length.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Generic, TypeVar, cast

from datapunk_recovery._core import clock
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.errors import classify
from datapunk_recovery._core.events import Event, EventBus, emit, listening
from datapunk_recovery._core.validate import check_count, shown
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.budget import RetryGate

from ._calls import as_async

__all__ = [
    "DEFAULT_OOM_TYPES",
    "InferenceConfig",
    "InferenceFallback",
    "InferenceFinished",
    "InferenceRecovery",
    "InferenceResult",
    "InferenceSplit",
    "is_out_of_memory",
]

I = TypeVar("I")  # noqa: E741 - an input item
O = TypeVar("O")  # noqa: E741 - an output item

Model = Callable[[Sequence[I]], Sequence[O]] | Callable[[Sequence[I]], Awaitable[Sequence[O]]]

DEFAULT_OOM_TYPES: Final = frozenset({"OutOfMemoryError", "MemoryError", "ResourceExhaustedError"})
"""Type names that mean "this batch does not fit in memory"."""


def is_out_of_memory(exc: BaseException, names: Iterable[str] = DEFAULT_OOM_TYPES) -> bool:
    """Whether ``exc``'s type, or one of its bases, has one of ``names``."""
    wanted = names if isinstance(names, frozenset) else frozenset(names)
    return any(t.__name__ in wanted for t in type(exc).__mro__)


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    """How inference recovers.

    ``min_batch_size``: the smallest chunk tried before falling back.
    ``retry``: the retry of a chunk after a transient error (its
    ``max_attempts`` counts the first try; its deadline covers one chunk).
    ``oom_types``: type names recognised as out-of-memory.
    """

    min_batch_size: int = 1
    retry: RetryConfig = field(
        default_factory=lambda: RetryConfig(max_attempts=3, base_delay=0.05, max_delay=1.0)
    )
    oom_types: frozenset[str] = DEFAULT_OOM_TYPES

    def __post_init__(self) -> None:
        check_count("InferenceConfig", "min_batch_size", self.min_batch_size)
        if not isinstance(self.retry, RetryConfig):
            raise TypeError(
                f"InferenceConfig.retry: expected a RetryConfig, got {shown(self.retry)}"
            )
        names = frozenset(self.oom_types)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"InferenceConfig.oom_types: expected non-empty type names,"
                f" got {shown(self.oom_types)}"
            )
        object.__setattr__(self, "oom_types", names)


@dataclass(frozen=True, slots=True)
class InferenceResult(Generic[O]):
    """The outputs in input order, and which model served each item."""

    outputs: list[O]
    served_by: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceSplit(Event):
    """``model`` ran out of memory on a chunk of ``from_size`` items; now ``to_size``."""

    name: ClassVar[str] = "resource.inference_split"
    area: ClassVar[str] = "resource"

    model: str
    from_size: int
    to_size: int
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceFallback(Event):
    """``from_model`` could not serve even ``min_batch_size`` items; ``to_model`` takes
    the ``remaining`` items."""

    name: ClassVar[str] = "resource.inference_fallback"
    area: ClassVar[str] = "resource"

    from_model: str
    to_model: str
    remaining: int
    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceFinished(Event):
    """A batch of ``items`` was served in ``chunks`` successful calls by the ``models`` named."""

    name: ClassVar[str] = "resource.inference"
    area: ClassVar[str] = "resource"

    items: int
    chunks: int
    models: tuple[str, ...]
    elapsed: float


# One step of the plan: run model ``index`` on items [start, stop).
_Step = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class _OutOfMemory:
    """What the plan keeps of an out-of-memory error: its type name and message, no frames."""

    error_type: str
    message: str


class _GaveUp(Exception):
    """The plan's verdict that no model can serve the rest; ``note`` says why."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


def _after_oom(plan: Generator[_Step, Any, Any], exc: Exception) -> _Step:
    """Tell ``plan`` that the last step ran out of memory; the next step, or raise ``exc``.

    Only a summary of ``exc`` reaches the plan, which outlives this call; the
    caller drops ``exc`` when its ``except`` block ends, before the next step
    runs, so the failed attempt's frames and tensors can be freed.
    """
    try:
        return plan.send(_OutOfMemory(type(exc).__name__, str(exc)))
    except _GaveUp as gave_up:
        note = gave_up.note
    exc.add_note(note)
    raise exc


class InferenceRecovery(Generic[I, O]):
    """Run a model over a batch with out-of-memory and transient-error recovery.

    ``model`` is the preferred callable; ``fallbacks`` are ``(name, callable)``
    pairs tried in order once it cannot serve even ``min_batch_size`` items.
    ``budget`` is the retry budget of the transient retries.
    [`run()`][datapunk_recovery.resource.inference.InferenceRecovery.run]
    accepts sync and async callables;
    [`run_sync()`][datapunk_recovery.resource.inference.InferenceRecovery.run_sync] needs sync ones.
    """

    __slots__ = ("_async_callers", "_bus", "_callers", "_names", "config", "name")

    def __init__(
        self,
        model: Model[I, O],
        *,
        fallbacks: Sequence[tuple[str, Model[I, O]]] = (),
        model_name: str = "primary",
        config: InferenceConfig | None = None,
        budget: RetryGate | None = None,
        name: str = "inference",
        bus: EventBus | None = None,
    ) -> None:
        if config is not None and not isinstance(config, InferenceConfig):
            raise TypeError(
                f"InferenceRecovery.config: expected InferenceConfig, got {shown(config)}"
            )
        self.config = config if config is not None else InferenceConfig()
        self.name = name
        self._bus = bus
        models = [(model_name, model), *fallbacks]
        for label, fn in models:
            if not isinstance(label, str) or not callable(fn):
                raise TypeError(
                    f"InferenceRecovery: expected (name, callable) pairs, got {shown((label, fn))}"
                )
        self._names = tuple(label for label, _ in models)
        oom = self.config.oom_types

        def transient(exc: BaseException) -> bool:
            return not is_out_of_memory(exc, oom) and classify(exc).retryable

        def retried(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            return retry(self.config.retry, on=transient, name=f"{name}.{label}", budget=budget)(fn)

        self._callers: tuple[Callable[..., Any], ...] = tuple(
            retried(label, fn) for label, fn in models
        )
        # For run(): async faces, so that a sync model's retry sleeps suspend
        # the task instead of blocking the event loop.
        self._async_callers: tuple[Callable[..., Awaitable[Any]], ...] = tuple(
            retried(label, as_async(fn)) for label, fn in models
        )

    def _plan(self, total: int) -> Generator[_Step, Sequence[O] | _OutOfMemory, InferenceResult[O]]:
        """The I/O-free decisions: yields steps, receives outputs or an out-of-memory summary.

        It never sees the exception itself: an exception's traceback keeps the
        frames of the failed forward pass (and every tensor they hold) alive,
        and this generator stays suspended across the next model call.  When
        it gives up it raises `_GaveUp`; the caller raises the original
        error with the note.
        """
        start_time = clock.now()
        outputs: list[O] = []
        served: list[str] = []
        model, cursor, size, chunks = 0, 0, total, 0
        min_size = self.config.min_batch_size
        while cursor < total:
            stop = min(cursor + size, total)
            got = yield model, cursor, stop
            if not isinstance(got, _OutOfMemory):
                chunks += 1
                if len(got) != stop - cursor:
                    raise ValueError(
                        f"{self.name}: model {self._names[model]!r} returned {len(got)} outputs "
                        f"for {stop - cursor} inputs"
                    )
                outputs.extend(got)
                served.extend([self._names[model]] * (stop - cursor))
                cursor = stop
                continue
            chunk = stop - cursor
            if chunk > min_size:
                size = max(min_size, (chunk + 1) // 2)
                self._emit(
                    InferenceSplit,
                    model=self._names[model],
                    from_size=chunk,
                    to_size=size,
                    error_type=got.error_type,
                )
                continue
            if model + 1 >= len(self._names):
                raise _GaveUp(
                    f"datapunk-recovery: {self.name!r} ran out of memory on every model "
                    f"({', '.join(self._names)}), down to {chunk} item(s) per call"
                )
            self._emit(
                InferenceFallback,
                from_model=self._names[model],
                to_model=self._names[model + 1],
                remaining=total - cursor,
                error_type=got.error_type,
            )
            model, size = model + 1, total - cursor
        if listening(self._bus):
            at = clock.now()
            emit(
                InferenceFinished(
                    operation=self.name,
                    at=at,
                    items=total,
                    chunks=chunks,
                    models=tuple(dict.fromkeys(served)),
                    elapsed=at - start_time,
                ),
                self._bus,
            )
        return InferenceResult(outputs, tuple(served))

    def _emit(self, kind: Callable[..., Event], **fields: Any) -> None:
        if listening(self._bus):
            emit(kind(operation=self.name, at=clock.now(), **fields), self._bus)

    def _oom(self, exc: Exception) -> bool:
        return is_out_of_memory(exc, self.config.oom_types)

    def run_sync(self, batch: Sequence[I]) -> InferenceResult[O]:
        """Serve ``batch`` with sync models, blocking the thread."""
        plan = self._plan(len(batch))
        try:
            step = next(plan)
            while True:
                model, start, stop = step
                try:
                    got: Sequence[O] = self._callers[model](batch[start:stop])
                except Exception as exc:
                    if not self._oom(exc):
                        raise
                    # Decided inside the handler: ``exc`` (and the failed
                    # pass's frames) is gone before the next model call.
                    step = _after_oom(plan, exc)
                    continue
                if inspect.isawaitable(got):
                    if inspect.iscoroutine(got):
                        got.close()  # never started: nothing ran, nothing to warn about
                    raise TypeError(
                        f"{self.name}: model {self._names[model]!r} is async; use `await run()`"
                    )
                step = plan.send(got)
        except StopIteration as done:
            return cast(InferenceResult[O], done.value)

    async def run(self, batch: Sequence[I]) -> InferenceResult[O]:
        """Serve ``batch``; sync models are called in the task (they block it while
        they run, but their retry backoff does not), async ones awaited."""
        plan = self._plan(len(batch))
        try:
            step = next(plan)
            while True:
                model, start, stop = step
                try:
                    got: Any = await self._async_callers[model](batch[start:stop])
                except Exception as exc:
                    if not self._oom(exc):
                        raise
                    step = _after_oom(plan, exc)  # see run_sync
                    continue
                step = plan.send(got)
                got = None  # the outputs are in the plan now
        except StopIteration as done:
            return cast(InferenceResult[O], done.value)
