"""`datapunk-recovery check FILE`: every problem, or each service's effective policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from datapunk_recovery import cli
from datapunk_recovery.commands.check import worst_case
from datapunk_recovery.config import build_config


def test_prints_each_service_with_its_worst_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text(
        '[defaults]\nretry = { max_attempts = 3, base_delay = "1s", jitter = "none" }\n'
        'attempt_timeout = "2s"\n[services.payments]\nretry = { max_attempts = 4 }\n'
    )
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "(defaults)" in out and "payments" in out
    # payments: 4 attempts of 2 s, waits 1 + 2 + 4 s = 15 s
    assert "15s" in out


def test_reports_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[services.payments]\nretry = { max_attempts = 0, base_delay = "x" }\n')
    assert cli.main(["check", str(path), "--no-env"]) == 1
    out = capsys.readouterr().out
    assert "2 problems" in out
    assert "services.payments.retry.max_attempts" in out
    assert "services.payments.retry.base_delay" in out


def test_worst_case_is_bounded_by_the_deadline_and_unbounded_without_timeout() -> None:
    config = build_config(
        {
            "defaults": {"retry": {"max_attempts": 3, "deadline": "1s"}, "attempt_timeout": "5s"},
            "services": {"open": {"attempt_timeout": "none", "retry": {"deadline": "none"}}},
        }
    )
    assert worst_case(config.defaults) == (3, 1.0)
    assert worst_case(config.policy("open")) == (3, None)
