"""The public API: every name in ``__all__`` exists, and the facade loads lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import datapunk_recovery


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
