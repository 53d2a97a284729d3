"""The soak, short: mixed load with chaos on for a few seconds, memory and bounds judged.

``scripts/soak.py`` is the real thing (60 s in CI after the suite, longer on
demand); this runs the same script for 12 s so that a change that breaks it
(or leaks quickly) is caught by the ordinary test run.  It runs in its own
interpreter: tracemalloc then measures the soak alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


@pytest.mark.soak
def test_a_short_soak_keeps_memory_flat_and_every_bound() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--seconds",
            "12",
            "--max-seconds",
            "36",  # a busy machine fills the bounded caches later
            "--warmup",
            "2",
            "--tasks",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    report = done.stdout + done.stderr
    print(report)  # the figures, for `pytest -s` and for the record
    assert done.returncode == 0, report
    assert "result:              ok" in done.stdout
    assert "faults injected:" in done.stdout


@pytest.mark.soak
def test_the_soak_fails_loudly_when_memory_grows() -> None:
    # --leak keeps 2000 bytes per call forever: a leak the check must see, and fail on.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "12", "--warmup", "2", "--leak", "2000"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "memory grew by" in done.stdout


@pytest.mark.soak
def test_the_soak_refuses_to_judge_a_run_too_short_to_warm_up() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "1", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "run longer" in done.stdout
