"""Server-given delays in every common dialect, parsed into the core's delay hint.

A server that is rate limiting or restarting usually says when to come back:

- ``Retry-After`` (RFC 9110): delta-seconds (``"120"``) or an HTTP date
  (``"Wed, 21 Oct 2015 07:28:00 GMT"``), relative to the wall clock;
- ``X-RateLimit-Reset`` (GitHub, Twitter, many APIs): when the quota resets,
  as a Unix timestamp (GitHub) or as seconds from now (others); a value large
  enough to be a timestamp (past 2001) is read as one;
- ``grpc-retry-pushback-ms`` (gRPC): milliseconds, and a *negative* value
  means "do not retry at all".

[`server_hint()`][datapunk_recovery.network.delays.server_hint] reads them (pushback first: it is
the most specific,
then ``Retry-After``, then ``X-RateLimit-Reset``) into a
[`ServerHint`][datapunk_recovery.network.delays.ServerHint]:
a delay in seconds for
[`datapunk_recovery._core.errors.classify()`][datapunk_recovery._core.errors.classify]'s
``delay_hint``, or ``never``.  A value that cannot be parsed or is negative
(a ``Retry-After: -5``, a date that is not a date) is ignored and reported
with [`HintIgnored`][datapunk_recovery._core.events.HintIgnored]; a value that parses but
is absurdly long is passed on (capped at `MAX_HINT_SECONDS`), so that
the core's rule
([`datapunk_recovery._core.backoff.server_delay()`][datapunk_recovery._core.backoff.server_delay])
gives up
instead of waiting hours.

The grammars are strict, as RFC 9110 writes them: seconds are ASCII digits
only (``1_000``, ``1e3``, ``+5``, ``1.5`` and non-ASCII digits are garbage),
dates are the three fixed-width HTTP-date forms in GMT, and only spaces and
tabs around a value are dropped.  Every parser returns a value or ``None``
for *any* input (huge numbers, absurd dates, bytes, ``None``): none raises.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from datapunk_recovery._core import clock
from datapunk_recovery._core.events import EventBus, HintIgnored, emit, listening
from datapunk_recovery._core.redact import redact_text

__all__ = [
    "GRPC_PUSHBACK",
    "MAX_HINT_SECONDS",
    "RATELIMIT_RESET",
    "RETRY_AFTER",
    "ServerHint",
    "parse_grpc_pushback",
    "parse_http_date",
    "parse_rate_limit_reset",
    "parse_retry_after",
    "server_hint",
]

RETRY_AFTER: Final = "retry-after"
RATELIMIT_RESET: Final = "x-ratelimit-reset"
GRPC_PUSHBACK: Final = "grpc-retry-pushback-ms"

# A reset value at or above this (2001-09-09 as a Unix time) is a timestamp.
_EPOCH_THRESHOLD: Final = 1e9
# Any delay longer than this (about 31.7 million years) is reported as this:
# still absurd, so the core gives up, but a finite float whatever the digits.
MAX_HINT_SECONDS: Final = 1e15

# The grammars, each a flat sequence of bounded pieces (no nested repeats), so
# that a match costs time linear in the text.  ``[0-9]``, not ``\d``: only
# ASCII digits are digits in HTTP (``\d`` would also take "١٢٣").
_OWS: Final = " \t"  # optional white space around a field value (RFC 9110 section 5.5)
_DELTA_SECONDS: Final = re.compile(r"[0-9]+")  # RFC 9110 section 10.2.3: 1*DIGIT
_RESET: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # seconds or a Unix time, maybe with a fraction
_PUSHBACK: Final = re.compile(r"-?[0-9]+")  # gRPC: integer milliseconds; negative means never
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)
_MONTH: Final = "(?P<month>" + "|".join(_MONTHS) + ")"
_TIME: Final = r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
# RFC 9110 section 5.6.7: IMF-fixdate, then the two obsolete forms a recipient must read.
_IMF_FIXDATE: Final = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (?P<day>[0-9]{2}) "
    + _MONTH
    + r" (?P<year>[0-9]{4}) "
    + _TIME
    + " GMT"
)
_RFC850: Final = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (?P<day>[0-9]{2})-"
    + _MONTH
    + r"-(?P<year>[0-9]{2}) "
    + _TIME
    + " GMT"
)
_ASCTIME: Final = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) "
    + _MONTH
    + r" (?P<day>[0-9]{2}| [0-9]) "
    + _TIME
    + r" (?P<year>[0-9]{4})"
)


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


def _field(value: object) -> str | None:
    """A header value as text without its optional white space; None if it is no text."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    return value.strip(_OWS)


def _seconds(digits: str) -> float:
    """ASCII digits (and maybe a fraction) as seconds, capped at `MAX_HINT_SECONDS`."""
    whole = digits.partition(".")[0]
    if len(whole) > 15:  # past 1e15 however many digits: no int() of a huge string
        return MAX_HINT_SECONDS
    return min(float(digits), MAX_HINT_SECONDS)


def _wall(wall: float | None) -> float | None:
    now = time.time() if wall is None else wall
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        return None
    return float(now)


def parse_http_date(value: object, *, wall: float | None = None) -> float | None:
    """The Unix time of an HTTP date (RFC 9110 section 5.6.7); None if ``value`` is not one.

    The three forms a recipient must read: ``Sun, 06 Nov 1994 08:49:37 GMT``,
    ``Sunday, 06-Nov-94 08:49:37 GMT`` and ``Sun Nov  6 08:49:37 1994``; fixed
    width, ASCII digits, GMT only (a numeric offset is not an HTTP date).  A
    two-digit year is the one within 50 years of ``wall``'s (RFC 9110).
    """
    text = _field(value)
    if text is None:
        return None
    m = _IMF_FIXDATE.fullmatch(text) or _RFC850.fullmatch(text) or _ASCTIME.fullmatch(text)
    if m is None:
        return None
    year = int(m["year"])
    if len(m["year"]) == 2:
        now = _wall(wall)
        this_year = time.gmtime(now if now is not None and 0 <= now < 2.5e11 else 0).tm_year
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    month = _MONTHS.index(m["month"]) + 1
    day, hour, minute = int(m["day"]), int(m["hour"]), int(m["minute"])
    second = min(int(m["second"]), 59)  # a leap second reads as the second before it
    if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    if hour > 23 or minute > 59 or int(m["second"]) > 60:
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def parse_retry_after(value: object, *, wall: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value; ``None`` if it is not valid.

    Delta-seconds are ASCII digits only (``"120"``; not ``"1.5"``, ``"1e3"``,
    ``"+5"``, ``"1_000"`` or non-ASCII digits), surrounded at most by spaces and
    tabs; otherwise an HTTP date (see
    [`parse_http_date()`][datapunk_recovery.network.delays.parse_http_date]), relative to
    ``wall``, the current Unix time (default: ``time.time()``).  A date in the
    past means "now" (0 seconds).  Never raises, whatever ``value`` is.
    """
    text = _field(value)
    if text is None:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        return _seconds(text)
    when = parse_http_date(text, wall=wall)
    now = _wall(wall)
    if when is None or now is None:
        return None
    return min(max(0.0, when - now), MAX_HINT_SECONDS)


def parse_rate_limit_reset(value: object, *, wall: float | None = None) -> float | None:
    """Seconds to wait from an ``X-RateLimit-Reset`` value (timestamp or seconds).

    ASCII digits with an optional fraction (``"30"``, ``"1700000000.5"``);
    anything else is ``None``.  Never raises, whatever ``value`` is.
    """
    text = _field(value)
    if text is None or not _RESET.fullmatch(text):
        return None
    number = _seconds(text)
    if number >= _EPOCH_THRESHOLD:
        now = _wall(wall)
        if now is None:
            return None
        return min(max(0.0, number - now), MAX_HINT_SECONDS)
    return number


def parse_grpc_pushback(value: object) -> ServerHint | None:
    """A ``grpc-retry-pushback-ms`` value: a delay, or ``never`` when negative.

    An optional ``-`` then ASCII digits; anything else is ``None``.  Never raises.
    """
    text = _field(value)
    if text is None or not _PUSHBACK.fullmatch(text):
        return None
    if text.startswith("-"):
        return ServerHint(never=True, source=GRPC_PUSHBACK)
    return ServerHint(_seconds(text) / 1000.0, source=GRPC_PUSHBACK)


def server_hint(
    headers: Mapping[str, str],
    *,
    wall: float | None = None,
    operation: str = "server-hint",
    bus: EventBus | None = None,
) -> ServerHint:
    """Read the delay a response's ``headers`` ask for (see the module documentation).

    ``headers`` may be any mapping (or anything with ``items()``); names are
    matched without regard to case, names that are not text are skipped.
    Values that cannot be parsed (including values that are not text: ints,
    lists, ``None``) are reported as [`HintIgnored`][datapunk_recovery._core.events.HintIgnored] on
    ``bus`` (and the
    global bus) under ``operation``, then ignored.  ``TypeError`` if
    ``headers`` has no ``items()``; nothing else is ever raised.
    """
    found = _find(headers)
    if not found:
        return _NOTHING
    pushback = found.get(GRPC_PUSHBACK, _ABSENT)
    if pushback is not _ABSENT:
        hint = parse_grpc_pushback(pushback)
        if hint is not None:
            return hint
        _ignored(operation, bus, GRPC_PUSHBACK, pushback)
    parsers: tuple[tuple[str, Callable[..., float | None]], ...] = (
        (RETRY_AFTER, parse_retry_after),
        (RATELIMIT_RESET, parse_rate_limit_reset),
    )
    for name, parse in parsers:
        raw = found.get(name, _ABSENT)
        if raw is _ABSENT:
            continue
        seconds = parse(raw, wall=wall)
        if seconds is not None:
            return ServerHint(seconds, source=name)
        _ignored(operation, bus, name, raw)
    return _NOTHING


_WANTED: Final = frozenset({RETRY_AFTER, RATELIMIT_RESET, GRPC_PUSHBACK})
_ABSENT: Final = object()


def _find(headers: Mapping[str, str]) -> dict[str, object]:
    items = getattr(headers, "items", None)
    if not callable(items):
        raise TypeError(f"server_hint: expected a mapping of headers, got {type(headers).__name__}")
    found: dict[str, object] = {}
    for key, value in items():
        if isinstance(key, bytes | bytearray):
            key = bytes(key).decode("latin-1")
        if not isinstance(key, str):
            continue
        lower = key.lower()
        if lower in _WANTED and lower not in found:
            found[lower] = value
    return found


def _ignored(operation: str, bus: EventBus | None, header: str, raw: object) -> None:
    if listening(bus):
        text = raw if isinstance(raw, str) else f"<{type(raw).__name__}>"
        shown = redact_text(text[:200])  # what is shown of it is redacted, and short
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        emit(
            HintIgnored(
                operation=operation,
                at=clock.now(),
                value=f"{header}: {shown}",
                reason="not a valid delay for this header",
            ),
            bus,
        )
