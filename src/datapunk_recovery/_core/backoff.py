"""RetryConfig and the backoff family: how long to wait before each retry.

Numbering, used everywhere in the library: attempt 1 is the first call; retry
``n`` is attempt ``n + 1``; "the delay of retry ``n``" is waited before attempt
``n + 1``.  All durations are seconds.

The exponential envelope of retry ``n`` is
``min(max_delay, base_delay * exponential_base ** (n - 1))``; the jitter kinds
spread delays around or under it so that many clients failing together do not
retry together (the thundering herd):

- ``none``: the envelope itself (only for a single client; herds stay herds).
- ``full``: ``uniform(0, envelope)``; the least total work under contention.
- ``equal``: ``envelope / 2 + uniform(0, envelope / 2)``; never shorter than half.
- ``decorrelated``: ``min(max_delay, uniform(base_delay, 3 * previous))``,
  previous starting at ``base_delay``; finishes a little sooner, does more work.
- ``decorrelated_v2``: Polly's smoothed decorrelated formula, medians about
  0.9, 1.2, 2, 4, 8 x ``base_delay``, capped at ``max_delay``.
- ``proportional``: ``envelope * uniform(1 - jitter_factor, 1 + jitter_factor)``,
  capped at ``max_delay`` (gRPC, Polly and resilience4j style).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from .validate import check_choice, check_count, check_fraction, check_number, check_seconds, shown

__all__ = ["Jitter", "RetryConfig", "ServerDelay", "server_delay"]


class Jitter(StrEnum):
    """The jitter kinds; see the module documentation for each formula."""

    NONE = "none"
    FULL = "full"
    EQUAL = "equal"
    DECORRELATED = "decorrelated"
    DECORRELATED_V2 = "decorrelated_v2"
    PROPORTIONAL = "proportional"


_STATEFUL: Final = frozenset({Jitter.DECORRELATED, Jitter.DECORRELATED_V2})
_OWNER: Final = "RetryConfig"
# Past this exponent 2**t overflows a float; the delay is long capped by then.
_V2_MAX_T: Final = 1000.0
# Draws of a decorrelated sequence after which its start no longer matters.
_FORGOTTEN: Final = 10_000
# One shared generator when the caller brings none: seeding a new Random costs
# microseconds, more than the whole failure path of a retry.
_RNG: Final = random.Random()


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """How often to try and how long to wait in between; validated when built.

    ``max_attempts`` counts every attempt, the first included; ``None`` means
    unbounded, and then ``deadline`` (seconds for the whole operation, sleeps
    included) is required so that no retry loop runs forever.
    ``max_server_delay`` bounds a server-given delay (``Retry-After``): a longer
    one makes the engine give up at once instead of obeying it.
    """

    max_attempts: int | None = 3
    base_delay: float = 0.1
    max_delay: float = 10.0
    exponential_base: float = 2.0
    jitter: Jitter = Jitter.FULL
    jitter_factor: float = 0.2
    deadline: float | None = None
    max_server_delay: float = 300.0
    #: Whether each delay depends on the previous one (the decorrelated kinds).
    stateful: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.max_attempts is not None:
            check_count(_OWNER, "max_attempts", self.max_attempts)
        s(self, "base_delay", check_seconds(_OWNER, "base_delay", self.base_delay))
        s(self, "max_delay", check_seconds(_OWNER, "max_delay", self.max_delay))
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"{_OWNER}.max_delay: must be >= base_delay ({self.base_delay!r}), "
                f"got {shown(self.max_delay)}"
            )
        s(
            self,
            "exponential_base",
            check_number(_OWNER, "exponential_base", self.exponential_base, minimum=1.0),
        )
        s(self, "jitter", check_choice(_OWNER, "jitter", self.jitter, Jitter))
        s(self, "stateful", self.jitter in _STATEFUL)
        s(self, "jitter_factor", check_fraction(_OWNER, "jitter_factor", self.jitter_factor))
        if self.deadline is not None:
            s(self, "deadline", check_seconds(_OWNER, "deadline", self.deadline, positive=True))
        elif self.max_attempts is None:
            raise ValueError(
                f"{_OWNER}.deadline: required when max_attempts is None (unbounded), got None"
            )
        s(
            self,
            "max_server_delay",
            check_seconds(_OWNER, "max_server_delay", self.max_server_delay),
        )

    def envelope(self, n: int) -> float:
        """The un-jittered exponential delay of retry ``n`` (n >= 1), capped."""
        try:
            e = self.base_delay * self.exponential_base ** (n - 1)
        except OverflowError:  # far past the cap (a zero base stays zero)
            return self.max_delay if self.base_delay else 0.0
        return e if e < self.max_delay else self.max_delay

    def compute_delay(self, n: int, rng: random.Random | None = None) -> float:
        """The delay of retry ``n`` for the stateless jitter kinds.

        The decorrelated kinds depend on the previous delay: use
        [`delays()`][datapunk_recovery._core.backoff.RetryConfig.delays].
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"compute_delay: retry number must be an int >= 1, got {shown(n)}")
        if self.jitter in _STATEFUL:
            raise ValueError(
                f"compute_delay: jitter {self.jitter.value!r} depends on the previous delay; "
                "use RetryConfig.delays()"
            )
        return self._jittered(n, rng)

    def _jittered(self, n: int, rng: random.Random | None) -> float:
        # Unchecked compute_delay for the engine's failure path.
        e = self.envelope(n)
        jitter = self.jitter
        if jitter is Jitter.FULL:
            return (rng or _RNG).uniform(0.0, e) if e else 0.0
        if jitter is Jitter.NONE:
            return e
        if jitter is Jitter.EQUAL:
            return e / 2 + (rng or _RNG).uniform(0.0, e / 2)
        f = self.jitter_factor
        return min(self.max_delay, e * (rng or _RNG).uniform(1.0 - f, 1.0 + f))

    def retry_delay(self, n: int, rng: random.Random | None = None) -> float:
        """The delay the engine waits before retry ``n`` of a call, in seconds.

        The engine's own rule and numbering: ``n = 1`` is the first retry
        (waited after attempt 1), ``n = 0`` means no retry yet and gives 0.
        Any ``n >= 0`` is answered whatever ``max_attempts`` says (whether
        retry ``n`` happens is the engine's decision, not the delay's); the
        result is in ``[0, max_delay]``.  The decorrelated kinds depend on the
        delays before: retry ``n``'s is the ``n``-th draw of a fresh sequence
        (beyond 10,000 retries, the 10,000th stands for it: the sequence has
        long forgotten its start, and the cost stays bounded).  Without
        jitter the delay never decreases as ``n`` grows.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"the retry number must be an int, got {shown(n)}")
        if n < 0:
            raise ValueError(f"the retry number must be >= 0, got {shown(n)}")
        if n == 0:
            return 0.0
        draws = None
        if self.stateful and self.base_delay != 0.0:
            draws = _sequence(self, rng or _RNG, None)
            # Past _FORGOTTEN draws the sequence has long forgotten where it
            # started: that draw stands for every later one (the cost stays
            # bounded for any n; decorrelated_v2 is at its cap by then).
            for _ in range(min(n, _FORGOTTEN) - 1):
                next(draws)
        return self.next_delay(n, rng, draws)

    def next_delay(self, n: int, rng: random.Random | None, draws: Iterator[float] | None) -> float:
        """The library's one delay rule: the delay of retry ``n`` (n >= 1), unchecked.

        ``draws`` is the call's own sequence for the decorrelated kinds (its
        next value is retry ``n``'s), ``None`` for the others.  The engine
        calls it on its failure path;
        [`retry_delay()`][datapunk_recovery._core.backoff.RetryConfig.retry_delay] is its checked
        face.
        """
        if self.base_delay == 0.0:  # every jitter kind then waits zero
            return 0.0
        if draws is not None:
            return next(draws)
        return self._jittered(n, rng)

    def longest_delays(self) -> Iterator[float]:
        """For retry 1, 2, ... of a call: the longest delay the engine can draw, endlessly.

        The engine's own formulas, run with a generator that always draws the
        top of every range (so the bound cannot drift from what the engine
        does).  For the decorrelated kinds, whose sequence counts this
        configuration's own retries within the call, the value for retry
        ``n`` bounds the ``n``-th draw and every earlier one (the longest
        sequence never decreases); ``decorrelated_v2`` is bounded by
        ``max_delay``.  Never decreasing, never above ``max_delay``.
        """
        if self.jitter is Jitter.DECORRELATED_V2:
            return itertools.repeat(self.max_delay)
        if self.jitter is Jitter.DECORRELATED:
            return _decorrelated(self, _HIGHEST, None)
        return _stateless(self, _HIGHEST, None)

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield the delay of retry 1, 2, ...: ``max_attempts - 1`` of them, or endlessly.

        Stateful kinds keep their state inside the iterator, so two iterators
        never disturb each other.  Every delay is in ``[0, max_delay]``; with a
        seeded ``rng`` the sequence is reproducible.
        """
        count = None if self.max_attempts is None else self.max_attempts - 1
        if self.stateful:
            return _sequence(self, rng or _RNG, count)
        return _stateless(self, rng, count)


def _sequence(config: RetryConfig, rng: random.Random, count: int | None) -> Iterator[float]:
    # The delays of a stateful (decorrelated) kind: the engine's per-call draws.
    if config.jitter is Jitter.DECORRELATED:
        return _decorrelated(config, rng, count)
    return _decorrelated_v2(config, rng, count)


class _Highest(random.Random):
    """A generator that always draws the top of the range asked (never random)."""

    def random(self) -> float:
        return _BELOW_ONE

    def uniform(self, a: float, b: float) -> float:
        return b if b > a else a


_BELOW_ONE: Final = math.nextafter(1.0, 0.0)
_HIGHEST: Final = _Highest(0)


def _stateless(
    config: RetryConfig, rng: random.Random | None, count: int | None
) -> Iterator[float]:
    n = 1
    while count is None or n <= count:
        yield config._jittered(n, rng)
        n += 1


def _decorrelated(config: RetryConfig, rng: random.Random, count: int | None) -> Iterator[float]:
    base, cap = config.base_delay, config.max_delay
    previous = base
    n = 0
    while count is None or n < count:
        previous = min(cap, rng.uniform(base, previous * 3.0))
        yield previous
        n += 1


def _decorrelated_v2(config: RetryConfig, rng: random.Random, count: int | None) -> Iterator[float]:
    # Polly's "DecorrelatedJitterBackoffV2": t = i + U(0, 1) with i counting
    # from 0; next = 2**t * tanh(sqrt(4 t)); delay = (next - prev) / 1.4 * base.
    base, cap = config.base_delay, config.max_delay
    previous = 0.0
    i = 0
    while count is None or i < count:
        t = i + rng.random()
        if t >= _V2_MAX_T:
            yield cap
        else:
            nxt = 2.0**t * math.tanh(math.sqrt(4.0 * t))
            yield min(cap, max(0.0, (nxt - previous) / 1.4 * base))
            previous = nxt
        i += 1


@dataclass(frozen=True, slots=True)
class ServerDelay:
    """What to do with a server-given delay hint (the outcome of `server_delay()`).

    ``delay`` is what to wait, in seconds; ``from_server`` says whether the
    hint set it; ``give_up`` is true when the hint is too long to obey;
    ``ignored`` is true when the hint was garbage (not a finite, non-negative
    number) and was ignored.
    """

    delay: float
    from_server: bool
    give_up: bool = False
    ignored: bool = False


def server_delay(
    computed: float, hint: object, config: RetryConfig, remaining: float | None
) -> ServerDelay:
    """The library's one rule for server-given delays (``Retry-After`` and friends).

    A hint above ``config.max_server_delay`` or beyond the remaining deadline
    (``remaining`` seconds, ``None`` when there is none) makes the caller give
    up at once; otherwise the larger of the hint and the computed delay is
    waited (the hint is not cut to ``max_delay``: the server knows best).  A
    hint that is not a finite non-negative number is ignored.
    """
    if hint is None:
        return ServerDelay(computed, False)
    if isinstance(hint, bool) or not isinstance(hint, int | float):
        return ServerDelay(computed, False, ignored=True)
    try:
        hint = float(hint)
    except OverflowError:  # an int too large for a float: absurd, so give up
        return ServerDelay(math.inf, True, give_up=True)
    if not math.isfinite(hint) or hint < 0:
        return ServerDelay(computed, False, ignored=True)
    if hint > config.max_server_delay or (remaining is not None and hint > remaining):
        return ServerDelay(float(hint), True, give_up=True)
    if hint >= computed:
        return ServerDelay(float(hint), True)
    return ServerDelay(computed, False)
