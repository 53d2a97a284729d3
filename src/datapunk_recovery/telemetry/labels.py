"""Bounded label cardinality: what keeps an exporter from growing without end.

A metric series exists for every distinct combination of label values, and a
metrics system falls over long before a process runs out of names to send it.
Label values therefore come only from *configured names* that events carry
(an operation, a breaker, a cache, an error category or type), never from
keys, URLs with ids or user input; and even configured names are capped:
each label admits at most ``max_values`` distinct values, first come first
served, and every later one is reported as ``other``.

A [`LabelPolicy`][datapunk_recovery.telemetry.labels.LabelPolicy] is the frozen configuration; a
[`Labeler`][datapunk_recovery.telemetry.labels.Labeler] is the
runtime object an exporter holds, which remembers the values it admitted.
Every value is redacted (see
[`datapunk_recovery.telemetry.fields`][datapunk_recovery.telemetry.fields]) and
cut to ``max_length`` characters before it can become a label.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from datapunk_recovery._core.validate import check_count, check_mapping, shown

from .fields import label_text

__all__ = ["LABEL_NAMES", "LabelPolicy", "Labeler"]

LABEL_NAMES: Final = frozenset(
    {
        "breaker",
        "budget",
        "bulkhead",
        "cache",
        "category",
        "endpoint",
        "error_type",
        "kind",
        "operation",
        "outcome",
        "reason",
        "service",
        "state",
    }
)
"""The label names the library's metrics use: each names something configured."""

_OWNER: Final = "LabelPolicy"
_LABEL_NAME: Final = re.compile(r"[a-z_][a-z0-9_]*\Z")
# Raw values that clean to an admitted value (two spellings of one enum, URLs
# differing only in a redacted password) are remembered up to this many times
# the cap; past it they are cleaned again on each use instead of remembered.
_RAW_FACTOR: Final = 4


@dataclass(frozen=True, slots=True)
class LabelPolicy:
    """How many distinct values each label may take, and which.

    ``max_values`` caps the distinct values of every label (``limits``
    overrides it per label name); ``allowed`` pins a label to a fixed set of
    names, everything else becoming ``other``; ``max_length`` cuts long
    values (characters).  ``other`` is the bucket for refused values.
    """

    max_values: int = 100
    limits: Mapping[str, int] = field(default_factory=dict)
    allowed: Mapping[str, Collection[str]] = field(default_factory=dict)
    max_length: int = 120
    other: str = "other"

    def __post_init__(self) -> None:
        check_count(_OWNER, "max_values", self.max_values)
        check_count(_OWNER, "max_length", self.max_length, minimum=8)
        limits: dict[str, int] = {}
        for label, limit in check_mapping(_OWNER, "limits", self.limits).items():
            _check_label(label, "limits")
            limits[label] = check_count(_OWNER, f"limits[{label}]", limit)
        allowed: dict[str, frozenset[str]] = {}
        for label, names in check_mapping(_OWNER, "allowed", self.allowed).items():
            _check_label(label, "allowed")
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise TypeError(
                    f"{_OWNER}.allowed[{label}]: expected a collection of names, got {shown(names)}"
                )
            allowed[label] = frozenset(names)
        if not isinstance(self.other, str) or not self.other:
            raise ValueError(
                f"{_OWNER}.other: expected a non-empty string, got {shown(self.other)}"
            )
        object.__setattr__(self, "limits", MappingProxyType(limits))
        object.__setattr__(self, "allowed", MappingProxyType(allowed))

    def limit(self, label: str) -> int:
        """The most distinct values ``label`` may take (``other`` not counted)."""
        return self.limits.get(label, self.max_values)


def _check_label(label: object, where: str) -> None:
    if not isinstance(label, str) or not _LABEL_NAME.match(label):
        raise ValueError(f"{_OWNER}.{where}: {shown(label)} is not a label name")


class Labeler:
    """Turns raw event values into bounded, redacted label values.

    Thread-safe: a known value is a dictionary read; admitting a new one takes
    a lock so that the cap holds exactly under concurrent events.  Memory is
    bounded by the caps, whatever the number of distinct values offered.
    """

    __slots__ = ("_clean", "_lock", "_other", "_policy", "_raw")

    def __init__(self, policy: LabelPolicy | None = None) -> None:
        self._policy = policy if policy is not None else LabelPolicy()
        self._other = self._policy.other
        # label -> raw value -> label value, for the values already seen
        self._raw: dict[str, dict[object, str]] = {}
        # label -> the admitted label values
        self._clean: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, raw: object) -> str:
        """The label value to report for ``raw`` under ``label``."""
        known = self._raw.get(label)
        if known is not None:
            value = known.get(raw)
            if value is not None:
                return value
        return self._admit(label, raw)

    @property
    def other(self) -> str:
        """The value reported for refused values."""
        return self._other

    def admitted(self, label: str) -> frozenset[str]:
        """The values of ``label`` admitted so far (``other`` excluded)."""
        return frozenset(self._clean.get(label, ()))

    def _admit(self, label: str, raw: object) -> str:
        policy = self._policy
        limit = policy.limit(label)
        clean = self._clean.get(label)
        # Full, and it never shrinks: refuse before paying for the redaction.
        if clean is not None and len(clean) >= limit and label not in policy.allowed:
            return self._other
        value = label_text(raw, policy.max_length)
        allowed = policy.allowed.get(label)
        with self._lock:
            clean = self._clean.setdefault(label, set())
            if value not in clean:
                if (allowed is not None and value not in allowed) or len(clean) >= limit:
                    return self._other
                clean.add(value)
            known = self._raw.setdefault(label, {})
            if len(known) < _RAW_FACTOR * limit:
                known[raw] = value
        return value
