"""What chaos can inject into a call: a fault, a latency, an outcome or a behaviour.

The four kinds are plain frozen values, checked when built, so that an
experiment is described apart from the injector that applies it (a rate, a
timeline window).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from .._core.validate import check_seconds, shown


@dataclass(frozen=True, slots=True)
class Fault:
    """Raise a fresh exception instead of making the call.

    ``error`` is an ``Exception`` subclass (instantiated without arguments) or
    a zero-argument factory returning an exception: each injection raises a
    new instance, so tracebacks and notes never pile up on a shared one.
    Cancellation and exit (``BaseException`` that is not an ``Exception``) are
    refused: they are not failures a recovery should handle.
    """

    kind: ClassVar[str] = "fault"

    error: type[Exception] | Callable[[], Exception]

    def __post_init__(self) -> None:
        error = self.error
        if isinstance(error, type):
            if not issubclass(error, Exception):
                raise ValueError(
                    f"Fault.error: expected an Exception subclass (cancellation and exit are "
                    f"never injected), got {shown(error)}"
                )
        elif not callable(error):
            raise TypeError(
                f"Fault.error: expected an exception type or a factory, got {shown(error)} "
                f"({type(error).__name__})"
            )

    def make(self) -> Exception:
        """A new exception to raise."""
        exc = self.error()
        if not isinstance(exc, Exception):
            raise TypeError(
                f"Fault.error: the factory must return an Exception, got {shown(exc)} "
                f"({type(exc).__name__})"
            )
        return exc


@dataclass(frozen=True, slots=True)
class Latency:
    """Wait ``seconds`` (or a uniform draw in ``[seconds, up_to]``), then make the call.

    Both in seconds.  The wait goes through the execution layer: a fake clock
    advances instead of waiting, and a cancellation interrupts it at once.
    """

    kind: ClassVar[str] = "latency"

    seconds: float
    up_to: float | None = field(default=None, metadata={"unit": "seconds"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", check_seconds("Latency", "seconds", self.seconds))
        if self.up_to is not None:
            up_to = check_seconds("Latency", "up_to", self.up_to)
            if up_to < self.seconds:
                raise ValueError(
                    f"Latency.up_to: must be >= seconds ({self.seconds!r}), got {shown(self.up_to)}"
                )
            object.__setattr__(self, "up_to", up_to)

    def draw(self, rng: random.Random) -> float:
        """The wait of one injection, in seconds."""
        if self.up_to is None:
            return self.seconds
        return rng.uniform(self.seconds, self.up_to)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Return ``value`` instead of making the call (a stale answer, an empty page, a 503)."""

    kind: ClassVar[str] = "outcome"

    value: object


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Call ``fn`` with the call's own arguments instead of the real function.

    For an async call, ``fn`` may be sync or async (its result is awaited when
    it is awaitable).  Use it for what the other kinds cannot express: a
    partial write, a slow drip, a fault that depends on the arguments.
    """

    kind: ClassVar[str] = "behaviour"

    fn: Callable[..., Any]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(
                f"Behaviour.fn: expected a callable,"
                f" got {shown(self.fn)} ({type(self.fn).__name__})"
            )


Injection = Fault | Latency | Outcome | Behaviour
"""Any of the four kinds of injection."""

_KINDS: Final = (Fault, Latency, Outcome, Behaviour)


def _check_injection(owner: str, value: object) -> Injection:
    if not isinstance(value, _KINDS):
        raise TypeError(
            f"{owner}: expected a Fault, Latency, Outcome or Behaviour, got {shown(value)} "
            f"({type(value).__name__})"
        )
    return value
