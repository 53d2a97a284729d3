"""What of an event may leave the process: redacted, flat, plain values.

Events already carry names, numbers and exception type names rather than
messages; this module is the second line of defence.  Every string an
exporter writes (a log field, a label value, a span-event attribute) goes
through [`safe_text()`][datapunk_recovery.telemetry.fields.safe_text]
([`datapunk_recovery._core.redact.redact_text()`][datapunk_recovery._core.redact.redact_text]),
which removes passwords from URLs and DSNs, ``key=value`` secrets, bearer
tokens and the value of credential headers written as text.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from datapunk_recovery._core.events import Event
from datapunk_recovery._core.redact import redact_headers, redact_text

__all__ = ["FieldValue", "event_fields", "label_text", "safe_text"]

FieldValue = str | int | float | bool
"""A value every exporter can carry: log extras, span attributes, callbacks."""


def safe_text(text: str) -> str:
    """``text`` without the secrets it may hold (see the module documentation)."""
    return redact_text(text)


def label_text(raw: object, max_length: int) -> str:
    """A raw event value as a short, redacted label value."""
    if isinstance(raw, Enum):
        raw = raw.value
    if isinstance(raw, bool):
        text = "true" if raw else "false"
    elif raw is None:
        text = "none"
    else:
        text = safe_text(str(raw))
    return text if len(text) <= max_length else text[: max_length - 3] + "..."


def _plain(value: object) -> FieldValue | None:
    if value is None:
        return None
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):  # headers, most likely: credentials go by name
        value = redact_headers({str(k): str(v) for k, v in value.items()})
    return safe_text(value if isinstance(value, str) else str(value))


# Per event class: its fields and its public properties (such as
# CallFinished.outcome), found once.
_shapes: dict[type[Event], tuple[str, ...]] = {}


def _shape(kind: type[Event]) -> tuple[str, ...]:
    shape = _shapes.get(kind)
    if shape is None:
        names = list(kind.__match_args__)  # the fields, base fields first
        for klass in kind.__mro__:
            names += (
                n
                for n, v in vars(klass).items()
                if isinstance(v, property) and not n.startswith("_") and n not in names
            )
        shape = _shapes[kind] = tuple(names)
    return shape


def event_fields(event: Event) -> dict[str, FieldValue]:
    """``event`` as a flat, redacted mapping: ``event`` (its name), ``area``, then its fields.

    Enumerations become their values, other non-numbers redacted strings;
    ``None`` fields are left out.
    """
    out: dict[str, FieldValue] = {"event": event.name, "area": event.area}
    for name in _shape(type(event)):
        value = _plain(getattr(event, name))
        if value is not None:
            out[name] = value
    return out
