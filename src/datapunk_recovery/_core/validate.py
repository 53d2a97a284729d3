"""Validation of configuration values, shared by every configuration dataclass.

Each check names the field and the value it refused, so that a bad setting is
found from the message alone.  Booleans are refused where numbers are wanted:
``True`` is an ``int`` to Python, never a sensible delay or count.

Every duration of the library's configuration is at most `MAX_SECONDS`
(one day): a longer wait is a typo (``1e10`` for ``1e1``), and past what the
platform's sleeps and timestamps can hold it would crash far from the mistake
(``OverflowError: timestamp out of range``).  "Forever" is spelled as an absent
limit (``None``), never as a huge number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Any, Final, TypeVar

from .redact import safe_repr

__all__ = [
    "MAX_SECONDS",
    "check_choice",
    "check_count",
    "check_fraction",
    "check_mapping",
    "check_number",
    "check_seconds",
    "shown",
]

E = TypeVar("E", bound=Enum)

#: The longest duration any setting of the library accepts, in seconds (one day).
MAX_SECONDS: Final = 86_400.0


#: How long a quoted value may be in a message: enough to recognise it, not a whole document.
_SHOWN_LIMIT: Final = 200


def shown(value: object) -> str:
    """``repr(value)`` as a configuration error quotes it: without secrets, bounded.

    A URL, DSN or token given to the wrong field is the usual way a password
    reaches a message; `safe_repr` redacts it before cutting at 200 characters
    (enough to recognise it).
    """
    return safe_repr(value, _SHOWN_LIMIT)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _type_error(owner: str, name: str, want: str, value: Any) -> TypeError:
    # A DSN given for a number keeps its password.
    return TypeError(
        f"{owner}.{name}: expected {want}, got {shown(value)} ({type(value).__name__})"
    )


def check_number(owner: str, name: str, value: Any, *, minimum: float = 0.0) -> float:
    """A finite real number >= ``minimum``, returned as ``float``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(owner, name, "a number", value)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{owner}.{name}: must be finite, got {_short(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{owner}.{name}: must be finite, got {shown(value)}")
    if number < minimum:
        raise ValueError(f"{owner}.{name}: must be >= {minimum:g}, got {shown(value)}")
    return number


def check_seconds(owner: str, name: str, value: Any, *, positive: bool = False) -> float:
    """A duration in seconds: finite, not negative (strictly positive if asked), at most
    `MAX_SECONDS` (one day)."""
    seconds = check_number(owner, name, value)
    if positive and seconds <= 0:
        raise ValueError(f"{owner}.{name}: must be > 0 seconds, got {shown(value)}")
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"{owner}.{name}: must be <= {MAX_SECONDS:g} seconds (one day), got {_short(value)}"
        )
    return seconds


def check_count(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """A whole number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(owner, name, "an integer", value)
    if value < minimum:
        raise ValueError(f"{owner}.{name}: must be >= {minimum}, got {shown(value)}")
    return value


def check_fraction(owner: str, name: str, value: Any, *, allow_zero: bool = True) -> float:
    """A number in [0, 1] (or (0, 1] when ``allow_zero`` is false)."""
    fraction = check_number(owner, name, value)
    if fraction > 1.0 or (not allow_zero and fraction == 0.0):
        low = "0" if allow_zero else "0 (exclusive)"
        raise ValueError(f"{owner}.{name}: must be between {low} and 1, got {shown(value)}")
    return fraction


def check_choice(owner: str, name: str, value: Any, choices: type[E]) -> E:
    """One of the enum ``choices``, given as a member or its value."""
    try:
        return choices(value)
    except ValueError:
        kinds = ", ".join(str(c.value) for c in choices)
        raise ValueError(f"{owner}.{name}: expected one of {kinds}, got {shown(value)}") from None


def check_mapping(owner: str, name: str, value: Any) -> dict[Any, Any]:
    """A mapping, returned as a new ``dict`` (a list of pairs is not one: ``dict()`` would
    take it and fail far from the field with a message that names nothing)."""
    if not isinstance(value, Mapping):
        raise _type_error(owner, name, "a mapping", value)
    return dict(value)
