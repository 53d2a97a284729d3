"""Retry policies: a default `RetryConfig` plus one per error category, and the retry gate.

A rate-limited or too-many-connections failure deserves a slower backoff than
a dropped connection; a policy maps categories to their own configuration and
falls back to the default for the rest.

[`RetryGate`][datapunk_recovery._core.policy.RetryGate] is what the retry engine
asks before every retry: the protocol lives here, in the core, so that the
engine, the hedger and the pipeline need no budget to know it; the budgets of
``datapunk_recovery.budget`` implement it (and ``budget.RetryGate`` is the
same class).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from datapunk_recovery._core.validate import check_mapping, shown

from .backoff import RetryConfig
from .errors import ErrorCategory

__all__ = ["RetryGate", "RetryPolicy"]


@runtime_checkable
class RetryGate(Protocol):
    """What the retry engine needs from a budget."""

    def on_attempt(self, succeeded: bool) -> None:
        """Record the outcome of one attempt (first attempts included)."""

    def allow_retry(self) -> bool:
        """Spend what a retry costs and say whether it may happen."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``default`` for every error; ``per_category`` overrides it by category.

    Each category's configuration keeps its own delay sequence within a call,
    counts attempts over the whole call (the first included) and has its own
    ``max_attempts``.  The call's deadline is the default configuration's.
    """

    default: RetryConfig = field(default_factory=RetryConfig)
    per_category: Mapping[ErrorCategory, RetryConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.default, RetryConfig):
            raise TypeError(
                f"RetryPolicy.default: expected a RetryConfig, got {shown(self.default)}"
            )
        checked: dict[ErrorCategory, RetryConfig] = {}
        for key, config in check_mapping("RetryPolicy", "per_category", self.per_category).items():
            try:
                category = ErrorCategory(key)
            except ValueError:
                raise ValueError(
                    f"RetryPolicy.per_category: unknown error category {shown(key)}"
                ) from None
            if not isinstance(config, RetryConfig):
                raise TypeError(
                    f"RetryPolicy.per_category[{category.value}]: expected a RetryConfig, "
                    f"got {shown(config)}"
                )
            checked[category] = config
        object.__setattr__(self, "per_category", MappingProxyType(checked))

    def for_category(self, category: ErrorCategory) -> RetryConfig:
        """The configuration that governs a failure of ``category``."""
        return self.per_category.get(category, self.default)

    @classmethod
    def of(
        cls, spec: RetryConfig | RetryPolicy | None, *, where: str = "retry policy"
    ) -> RetryPolicy:
        """Accept a config, a policy or ``None`` (the defaults) wherever a policy is wanted.

        ``where`` names the setting in the error for anything else (``"SqliteConfig.retry"``).
        """
        if spec is None:
            return _DEFAULT
        if isinstance(spec, RetryPolicy):
            return spec
        if isinstance(spec, RetryConfig):
            return cls(spec)
        raise TypeError(f"{where}: expected RetryConfig or RetryPolicy, got {_kind(spec)}")


def _kind(value: Any) -> str:
    return f"{shown(value)} ({type(value).__name__})"


_DEFAULT = RetryPolicy()
