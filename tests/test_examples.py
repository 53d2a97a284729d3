"""Every example in examples/ runs to completion (they are documentation that must not rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_the_numpy_example_says_what_to_install_without_numpy() -> None:
    blocker = (
        "import sys, runpy; sys.modules['numpy'] = None; "
        f"runpy.run_path({str(EXAMPLES[0].parent / 'inference_numpy.py')!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "pip install 'datapunk-recovery[examples]'" in done.stderr
