"""The circuit breaker: stop calling a dependency that keeps failing, probe, recover.

States: ``CLOSED`` (calls pass, outcomes are judged), ``OPEN`` (calls are
refused with [`CircuitOpenError`][datapunk_recovery._core.errors.CircuitOpenError] until the open
duration ends), ``HALF_OPEN`` (a few probes pass; their outcomes close or
re-open it), plus three manual ones: ``DISABLED`` (everything passes, nothing is
recorded), ``FORCED_OPEN`` (everything is refused:
[`CircuitBreaker.isolate()`][datapunk_recovery.breaker.breaker.CircuitBreaker.isolate])
and ``METRICS_ONLY`` (shadow mode: outcomes are recorded and a would-be trip is
reported as a [`ShadowTrip`][datapunk_recovery.breaker.ShadowTrip] event, but nothing is ever
refused).

Trip criteria, any of which opens the breaker: consecutive failures (the
default, 5), failure rate and slow-call rate over a sliding window (count-based
or time-based, judged once ``minimum_calls`` are in it), a custom
[`TripPolicy`][datapunk_recovery.breaker.TripPolicy], and a server-given delay (``Retry-After``)
when enabled.

Every transition bumps a generation number; a permit carries the generation it
was granted in, so a late outcome (a call that started before the breaker
opened) never counts in a later period and never extends an open period.

The closed-state hot path of the default configuration takes no lock, builds no
object and reads no clock: it reads the generation and the ``fast`` flag,
runs the call, and on success touches the failure counter only when it is
not already zero (an outcome is recorded against the generation read before
the call, so a late one never counts in a later period).  Every
other path runs under the breaker's lock.  See
[docs/breaker.md](https://datapunk.github.io/datapunk-recovery/breaker/).

One concept per module, their public names re-exported here: ``config``
(states, window kinds, trip policy, `BreakerConfig`), ``events``, ``machine``
(the state machine: the one home of the rules), ``breaker``
(`CircuitBreaker`, `Permit`, `BreakerSnapshot`), ``shared`` (the link of a
breaker shared through a Redis store, with its Lua twin of the machine in
``shared.lua``) and ``registry``.
"""

from __future__ import annotations

from .breaker import BreakerSnapshot, CircuitBreaker, Permit
from .config import BreakerConfig, BreakerState, TripPolicy, WindowKind
from .events import (
    BreakerStateChanged,
    CallRejected,
    CorruptStateIgnored,
    OutcomeRecorded,
    OutcomesFolded,
    ShadowTrip,
    StoreFallback,
    StoreResumed,
    WriteShed,
)

__all__ = [
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerStateChanged",
    "CallRejected",
    "CircuitBreaker",
    "CorruptStateIgnored",
    "OutcomeRecorded",
    "OutcomesFolded",
    "WriteShed",
    "Permit",
    "ShadowTrip",
    "StoreFallback",
    "StoreResumed",
    "TripPolicy",
    "WindowKind",
]
