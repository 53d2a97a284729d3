"""The public API: every name in ``__all__`` exists, and the facade loads lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import datapunk_recovery
import datapunk_recovery._compat


def test_every_public_name_resolves() -> None:
    for name in datapunk_recovery.__all__:
        assert getattr(datapunk_recovery, name) is not None, name


def test_importing_the_package_does_not_load_the_recoveries() -> None:
    code = (
        "import sys, datapunk_recovery as dr; "
        "assert 'datapunk_recovery.strategies' not in sys.modules; "
        "assert 'datapunk_recovery.database' not in sys.modules; "
        "dr.RecoveryStrategies; "
        "assert 'datapunk_recovery.strategies' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        datapunk_recovery.no_such_thing  # noqa: B018


# The module paths of 0.2.0 (issue 15 moved the modules into layer packages).


@pytest.mark.parametrize("old", sorted(datapunk_recovery._compat.MOVED))
def test_every_old_module_path_imports_the_very_module_at_its_new_home(old: str) -> None:
    new = datapunk_recovery._compat.MOVED[old]
    module = importlib.import_module(f"datapunk_recovery.{old}")
    assert module is importlib.import_module(f"datapunk_recovery.{new}")
    assert module.__spec__ is not None
    assert module.__spec__.name == f"datapunk_recovery.{new}"  # its own spec, kept


def test_a_name_imported_from_an_old_path_is_the_same_object() -> None:
    from datapunk_recovery.errors import CircuitOpenError  # an old path, kept on purpose

    assert CircuitOpenError is datapunk_recovery.CircuitOpenError


def test_importing_an_old_path_keeps_the_top_level_deadline_the_function() -> None:
    code = (
        "import datapunk_recovery.deadline, datapunk_recovery as dr, types; "  # old path
        "assert not isinstance(dr.deadline, types.ModuleType), dr.deadline"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_old_paths_import_nothing_until_they_are_imported() -> None:
    code = (
        "import sys, datapunk_recovery; "
        "assert 'datapunk_recovery.config.schema' not in sys.modules; "
        "assert 'datapunk_recovery.cli.commands' not in sys.modules; "
        "import datapunk_recovery.commands.check as old; "  # an old path
        "assert old is sys.modules['datapunk_recovery.cli.commands.check']"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "name",
    [
        "datapunk_recovery.no_such_module",
        "datapunk_recovery._runtime",  # a private old path: not aliased (relayout: keep)
        "datapunk_recovery.flowx",
    ],
)
def test_a_made_up_or_private_old_path_is_still_not_found(name: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)
