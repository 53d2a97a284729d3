"""What to say when an optional dependency is missing: the extra that installs it.

Every integration imports its driver lazily, in the one module that adapts it,
and turns a failed import into `MissingExtra` through `raise_missing()`::

    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        raise_missing(exc, "RedisCache", "redis", extra="redis")

The message ends with the exact command, ``pip install
'datapunk-recovery[redis]'``, so that a user can paste it.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["MissingExtra", "install_hint", "raise_missing"]


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'datapunk-recovery[extra]'``."""
    return f"pip install 'datapunk-recovery[{extra}]'"


class MissingExtra(ImportError):
    """An optional dependency is not installed; ``extra`` names what installs it.

    An ``ImportError`` (so ``except ImportError`` still catches it) whose
    message names the feature, the missing module and the install command.
    """

    def __init__(self, feature: str, module: str, extra: str) -> None:
        super().__init__(f"{feature} needs {module}: {install_hint(extra)}", name=module)
        self.feature = feature
        self.module = module
        self.extra = extra


def raise_missing(error: ImportError, feature: str, module: str, *, extra: str) -> NoReturn:
    """Raise the error for ``error``, a failed import of ``module`` needed by ``feature``.

    `MissingExtra` (chained to ``error``) when a module is not found;
    ``error`` itself otherwise: a driver that is installed but fails to import
    is not a missing extra, and its own message says more.
    """
    if isinstance(error, ModuleNotFoundError):
        raise MissingExtra(feature, module, extra) from error
    raise error
