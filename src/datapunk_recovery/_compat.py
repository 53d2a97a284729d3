"""The import paths of 0.2.0, kept working after issue 15 moved the modules into layers.

``import datapunk_recovery.bulkhead`` gives the very module
``datapunk_recovery.flow.bulkhead`` (the same object, not a copy), and
``from datapunk_recovery.errors import CircuitOpenError`` keeps working.  The
finder below sits first on ``sys.meta_path`` and answers only for the old
public paths listed in ``MOVED``; it imports a module's new home only when
its old name is imported, so ``import datapunk_recovery`` costs nothing more.
Type checkers do not run it: they should use the top-level names or the new
paths.  The private modules of 0.2.0 (``_runtime``, ``_validate``, ...) are
not aliased.

The finder follows the ``importlib.abc.MetaPathFinder`` protocol (``find_spec``)
without subclassing it: importing ``importlib.abc`` would load
``importlib.resources`` at every start.
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader

_PACKAGE = "datapunk_recovery"

#: Old public module (below the package) -> its home since 0.3.0.
MOVED: dict[str, str] = {
    "errors": "_core.errors",
    "backoff": "_core.backoff",
    "policy": "_core.policy",
    "events": "_core.events",
    "stats": "_core.stats",
    "clock": "_core.clock",
    "durations": "_core.durations",
    "redact": "_core.redact",
    "deadline": "_execution.deadline",
    "timeout": "_execution.timeout",
    "engine": "_execution.engine",
    "bulkhead": "flow.bulkhead",
    "ratelimit": "flow.ratelimit",
    "adaptive": "flow.adaptive",
    "hedging": "flow.hedging",
    "fallback": "flow.fallback",
    "pipeline": "flow.pipeline",
    "registry": "breaker.registry",
    "schema": "config.schema",
    "commands": "cli.commands",
    "commands.check": "cli.commands.check",
    "commands.demo": "cli.commands.demo",
    "commands.simulate": "cli.commands.simulate",
}


class _Alias:
    """A loader whose module is the new home, already imported."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.spec: ModuleSpec | None = None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the old name's spec on the module: give it back
        # its own, so that reloading, pickling and importlib.resources see one module.
        module.__spec__ = self.spec


class OldPaths:
    """Maps each old module path of ``MOVED`` to its new home, on import."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if not fullname.startswith(f"{_PACKAGE}."):
            return None
        new = MOVED.get(fullname[len(_PACKAGE) + 1 :])
        if new is None:
            return None
        return ModuleSpec(fullname, cast("Loader", _Alias(f"{_PACKAGE}.{new}")))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), and enter the old names of
    the modules already imported in ``sys.modules`` (free: no import runs).

    The second part keeps ``datapunk_recovery.deadline`` the function: importing
    a module for the first time sets it as an attribute of its package, which
    would hide the function of the same name.
    """
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.insert(0, OldPaths())
    for old, new in MOVED.items():
        imported = sys.modules.get(f"{_PACKAGE}.{new}")
        if imported is not None:
            sys.modules.setdefault(f"{_PACKAGE}.{old}", imported)


def module(name: str) -> ModuleType | None:
    """The module an old top-level name (``"errors"``) stands for, imported; else None."""
    if name not in MOVED:
        return None
    return importlib.import_module(f"{_PACKAGE}.{name}")
