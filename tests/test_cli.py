"""The command line as a user runs it: the console script's entry and ``python -m``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from datapunk_recovery import __version__

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "datapunk_recovery", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_python_dash_m_runs_the_command_line() -> None:
    done = run_module("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"python -m datapunk_recovery {__version__}"


def test_python_dash_m_runs_a_subcommand_and_returns_its_status(tmp_path: Path) -> None:
    bad = tmp_path / "recovery.toml"
    bad.write_text("[services.x]\nretry = { max_attempts = -1 }\n", encoding="utf-8")
    done = run_module("check", str(bad))
    assert done.returncode != 0
    assert "max_attempts" in done.stdout + done.stderr


def test_python_dash_m_without_a_command_prints_the_help() -> None:
    done = run_module()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m datapunk_recovery")
    assert "check" in done.stdout
