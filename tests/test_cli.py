"""The command line as a user runs it: the console script's entry and ``python -m``."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from datapunk_recovery import __version__, cli

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


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser under it, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found.extend(subparsers(child))
    return found


def test_no_help_text_shows_restructuredtext_markup() -> None:
    for parser in subparsers(cli.build_parser()):
        text = parser.format_help()
        assert "``" not in text, parser.prog
        assert not re.search(r":(class|meth|func|mod|attr):", text), parser.prog


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "outage", "--rate", "-5"],
        ["simulate", "outage", "--rate", "0"],
        ["simulate", "outage", "--rate", "nan"],
        ["demo", "--rate", "-5"],
    ],
)
def test_a_bad_rate_is_a_usage_error_naming_the_flag(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: datapunk-recovery")
    assert "argument --rate: expected a number > 0" in err
    assert "OutageSetup" not in err and "DrillSetup" not in err


def test_a_scenario_setting_the_setup_rejects_is_a_usage_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["simulate", "outage", "--duration", "10s", "--outage-start", "20s"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage: datapunk-recovery simulate outage" in err
    assert "OutageSetup" not in err
    assert "argument --outage-start" in err or "argument --duration" in err
