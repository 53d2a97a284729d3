"""Server-given delays in every common dialect, parsed into the core's delay hint.

A server that is rate limiting or restarting usually says when to come back:

- ``Retry-After`` (RFC 9110): delta-seconds (``"120"``) or an HTTP date
  (``"Wed, 21 Oct 2015 07:28:00 GMT"``), relative to the wall clock;
- ``X-RateLimit-Reset`` (GitHub, Twitter, many APIs): when the quota resets,
  as a Unix timestamp (GitHub) or as seconds from now (others); a value large
  enough to be a timestamp (past 2001) is read as one;
- ``grpc-retry-pushback-ms`` (gRPC): milliseconds, and a *negative* value
  means "do not retry at all".

:func:`server_hint` reads them (pushback first: it is the most specific,
then ``Retry-After``, then ``X-RateLimit-Reset``) into a :class:`ServerHint`:
a delay in seconds for :func:`datapunk_recovery.errors.classify`'s
``delay_hint``, or ``never``.  A value that cannot be parsed or is negative
(a ``Retry-After: -5``, a date that is not a date) is ignored and reported
with :class:`~datapunk_recovery.events.HintIgnored`; a value that parses but
is absurdly long is passed on, so that the core's rule
(:func:`datapunk_recovery.backoff.server_delay`) gives up instead of
waiting hours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Final

from datapunk_recovery import clock
from datapunk_recovery.events import EventBus, HintIgnored, emit, listening

__all__ = [
    "GRPC_PUSHBACK",
    "RATELIMIT_RESET",
    "RETRY_AFTER",
    "ServerHint",
    "parse_grpc_pushback",
    "parse_rate_limit_reset",
    "parse_retry_after",
    "server_hint",
]

RETRY_AFTER: Final = "retry-after"
RATELIMIT_RESET: Final = "x-ratelimit-reset"
GRPC_PUSHBACK: Final = "grpc-retry-pushback-ms"

# A reset value at or above this (2001-09-09 as a Unix time) is a timestamp.
_EPOCH_THRESHOLD: Final = 1e9


@dataclass(frozen=True, slots=True)
class ServerHint:
    """What a server said about retrying: wait ``delay`` seconds, or ``never``.

    ``delay`` is ``None`` when the server said nothing usable; ``source`` is
    the header it came from.
    """

    delay: float | None = None
    never: bool = False
    source: str | None = None


_NOTHING: Final = ServerHint()


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_retry_after(value: str, *, wall: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value; ``None`` if it is not valid.

    ``wall`` is the current Unix time (default: ``time.time()``), used for the
    HTTP-date form; a date in the past means "now" (0 seconds).
    """
    seconds = _number(value)
    if seconds is not None:
        return seconds if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is read as such
        return None
    now = time.time() if wall is None else wall
    return max(0.0, when.timestamp() - now)


def parse_rate_limit_reset(value: str, *, wall: float | None = None) -> float | None:
    """Seconds to wait from an ``X-RateLimit-Reset`` value (timestamp or seconds)."""
    number = _number(value)
    if number is None or number < 0:
        return None
    if number >= _EPOCH_THRESHOLD:
        now = time.time() if wall is None else wall
        return max(0.0, number - now)
    return number


def parse_grpc_pushback(value: str) -> ServerHint | None:
    """A ``grpc-retry-pushback-ms`` value: a delay, or ``never`` when negative."""
    number = _number(value)
    if number is None or number != int(number):
        return None
    if number < 0:
        return ServerHint(never=True, source=GRPC_PUSHBACK)
    return ServerHint(number / 1000.0, source=GRPC_PUSHBACK)


def server_hint(
    headers: Mapping[str, str],
    *,
    wall: float | None = None,
    operation: str = "server-hint",
    bus: EventBus | None = None,
) -> ServerHint:
    """Read the delay a response's ``headers`` ask for (see the module documentation).

    ``headers`` may be any mapping; names are matched without regard to case.
    Values that cannot be parsed are reported as :class:`HintIgnored` on
    ``bus`` (and the global bus) under ``operation``, then ignored.
    """
    found = _find(headers)
    if not found:
        return _NOTHING
    pushback = found.get(GRPC_PUSHBACK)
    if pushback is not None:
        hint = parse_grpc_pushback(pushback)
        if hint is not None:
            return hint
        _ignored(operation, bus, GRPC_PUSHBACK, pushback)
    parsers: tuple[tuple[str, Callable[..., float | None]], ...] = (
        (RETRY_AFTER, parse_retry_after),
        (RATELIMIT_RESET, parse_rate_limit_reset),
    )
    for name, parse in parsers:
        raw = found.get(name)
        if raw is None:
            continue
        seconds = parse(raw, wall=wall)
        if seconds is not None:
            return ServerHint(seconds, source=name)
        _ignored(operation, bus, name, raw)
    return _NOTHING


_WANTED: Final = frozenset({RETRY_AFTER, RATELIMIT_RESET, GRPC_PUSHBACK})


def _find(headers: Mapping[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in headers.items():
        lower = key.lower()
        if lower in _WANTED and lower not in found:
            found[lower] = value
    return found


def _ignored(operation: str, bus: EventBus | None, header: str, raw: str) -> None:
    if listening(bus):
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        emit(
            HintIgnored(
                operation=operation,
                at=clock.now(),
                value=f"{header}: {shown}",
                reason="not a valid delay for this header",
            ),
            bus,
        )
