"""Durations as people write them (``"250ms"``, ``"1m30s"``) and as the library keeps them.

The library keeps every duration as a float of seconds; configuration files and
environment variables are written by people, who think in ``250ms`` and ``1m``.
[`parse_duration()`][datapunk_recovery._core.durations.parse_duration] is the one bridge, used by
the
configuration schema and
the command line alike, so that every place accepts the same spellings:

- a number (``0.25``, ``2``) or numeric text (``"0.25"``) is seconds;
- a number with a unit: ``us`` (or ``µs``), ``ms``, ``s``, ``m``, ``h``, ``d``;
- several such parts add up, largest unit first: ``"1m30s"``, ``"1h 15m"``.

Negative, infinite and not-a-number durations are refused, and so is anything
longer than one day (`MAX_DURATION`, the library's one maximum for every
duration setting): a wait cannot be negative, and "forever" is spelled as an
absent limit, never as a huge number.
[`format_duration()`][datapunk_recovery._core.durations.format_duration] writes seconds back in the
shortest readable form.
"""

from __future__ import annotations

import math
import re
from typing import Final

from .validate import MAX_SECONDS, shown

__all__ = ["MAX_DURATION", "DurationError", "format_duration", "parse_duration"]

#: The longest duration read, in seconds (one day); the same bound as every setting's.
MAX_DURATION: Final = MAX_SECONDS

#: Seconds per unit, in the order units must appear in a compound duration.
_UNITS: Final[dict[str, float]] = {
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
}
_RANK: Final[dict[str, int]] = {"d": 0, "h": 1, "m": 2, "s": 3, "ms": 4, "us": 5, "µs": 5}
_PART: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|us|µs|[dhms])", re.IGNORECASE)
_EXAMPLES: Final = "a duration such as '250ms', '2s', '1m30s' or a number of seconds"


def _shown(value: object) -> str:
    """``value`` as a message quotes it: redacted (a DSN or token given for a duration)."""
    return shown(value)


class DurationError(ValueError):
    """A duration that cannot be read; the message quotes it and shows valid spellings."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration text; raises `DurationError`.

    Booleans are refused (``True`` is an int to Python, never a duration).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DurationError(f"expected {_EXAMPLES}, got {_shown(value)} ({type(value).__name__})")
    try:
        seconds = _parse_text(value) if isinstance(value, str) else float(value)
    except OverflowError:  # an int too large for a float
        raise DurationError(
            f"expected a finite duration, got {str(value)[:40]}..."
        ) from None  # digits only
    if math.isnan(seconds) or math.isinf(seconds):
        raise DurationError(f"expected a finite duration, got {_shown(value)}")
    if seconds < 0:
        raise DurationError(f"expected a duration >= 0, got {_shown(value)}")
    if seconds > MAX_DURATION:
        raise DurationError(f"expected a duration of at most one day (1d), got {_shown(value)}")
    return seconds


def _parse_text(text: str) -> float:
    stripped = text.strip()
    if not stripped:
        raise DurationError(f"expected {_EXAMPLES}, got an empty text")
    try:
        return float(stripped)  # plain seconds, as environment variables carry them
    except ValueError:
        pass
    if stripped.startswith("-"):
        raise DurationError(f"expected a duration >= 0, got {_shown(text)}")
    total = 0.0
    position = 0
    last_rank = -1
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None:
            raise DurationError(f"expected {_EXAMPLES}, got {_shown(text)}")
        unit = match.group(2).lower()
        rank = _RANK[unit]
        if rank <= last_rank:
            raise DurationError(
                "expected units from largest to smallest, each once (as in '1m30s'), "
                f"got {_shown(text)}"
            )
        last_rank = rank
        total += float(match.group(1)) * _UNITS[unit]
        position = match.end()
    return total


def format_duration(seconds: float) -> str:
    """The shortest readable spelling of ``seconds``; `parse_duration()` reads it back.

    Whole minutes and hours use ``m`` and ``h``; under a second, ``ms`` (or
    ``us``); everything else is seconds.  At most three decimals are kept, so
    the text reads back to within half a thousandth of its unit.
    """
    if seconds == 0:
        return "0s"
    if seconds < 1e-3:
        return _fixed(seconds * 1e6) + "us"
    if seconds < 1.0:
        return _fixed(seconds * 1e3) + "ms"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return _fixed(seconds) + "s"


def _fixed(number: float) -> str:
    # Fixed-point, never an exponent: "1e-05s" would not parse back.
    return f"{number:.3f}".rstrip("0").rstrip(".")
