"""What a type checker sees through stacked decorators: ``mypy --strict`` on tests/typing/."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "tests" / "typing").glob("*.py"))


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="needs mypy (test extra)")
def test_stacked_decorators_keep_their_types_under_mypy_strict() -> None:
    from mypy import api

    out, err, status = api.run(
        [
            "--strict",
            "--no-error-summary",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            *map(str, CASES),
        ]
    )
    assert status == 0, out + err


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_the_typing_cases_also_run(path: Path) -> None:
    runpy.run_path(str(path))
