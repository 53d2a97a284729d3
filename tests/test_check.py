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


def test_worst_case_mixes_categories_the_worst_way() -> None:
    # The default allows 5 attempts with 1 s waits, rate_limited 3 attempts with
    # 10 s then 20 s waits: a call rate limited twice and then failing twice
    # more waits 10 + 20 + 1 + 1 s, longer than either alone (4 s, 30 s).
    config = build_config(
        {
            "defaults": {
                "retry": {"max_attempts": 5, "base_delay": "1s", "max_delay": "1s"},
                "attempt_timeout": "1s",
                "categories": {
                    "rate_limited": {"max_attempts": 3, "base_delay": "10s", "max_delay": "1m"}
                },
            }
        }
    )
    assert worst_case(config.defaults) == (5, pytest.approx(32.0 + 5 * 1.0))


def test_worst_case_counts_hedges_and_their_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text(
        '[defaults]\nretry = { max_attempts = 3, base_delay = "1s", jitter = "none" }\n'
        'attempt_timeout = "1s"\n'
        '[services.search]\nendpoints = ["a", "b"]\nhedge = { delay = "250ms", max_hedges = 2 }\n'
        '[services.plain]\nhedge = { delay = "250ms" }\n'  # nothing to hedge over
    )
    config = build_config(
        {
            "defaults": {
                "retry": {"max_attempts": 3, "base_delay": "1s", "jitter": "none"},
                "attempt_timeout": "1s",
            },
            "services": {
                "search": {"endpoints": ["a", "b"], "hedge": {"delay": "250ms", "max_hedges": 2}},
                "plain": {"hedge": {"delay": "250ms"}},
            },
        }
    )
    # 3 attempts, each with 2 hedges started 250 ms apart and failing after 1 s:
    # waits 1 + 2 s, attempts 3 x (0.5 + 1) s.
    assert worst_case(config.policy("search")) == (9, pytest.approx(3.0 + 3 * 1.5))
    assert worst_case(config.policy("plain")) == (3, pytest.approx(3.0 + 3 * 1.0))
    assert cli.main(["check", str(path), "--no-env", "--plain"]) == 0
    assert "9 (3 + 6 hedges)" in capsys.readouterr().out


def test_a_long_retry_series_is_bounded_without_an_exact_search() -> None:
    config = build_config(
        {
            "defaults": {
                "retry": {"max_attempts": 2000, "base_delay": "1s", "max_delay": "1s"},
                "attempt_timeout": "1s",
                "categories": {
                    "overloaded": {
                        "max_attempts": 3,
                        "base_delay": "1m",
                        "max_delay": "2m",
                        "jitter": "none",
                    }
                },
            }
        }
    )
    # Exact: 60 + 120 s for the overloaded retries, 1 s for each of the 1997 others.
    assert worst_case(config.defaults) == (2000, pytest.approx(180.0 + 1997.0 + 2000.0))


def test_problems_never_show_a_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "recovery.toml"
    path.write_text('[databases.orders]\npostgress = "postgresql://app:hunter2@db/app"\n')
    monkeypatch.setenv("DATAPUNK_RECOVERY__CACHE__REDIS_URL", "redis://:hunter3@cache:6379/0")
    assert cli.main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "databases.orders.postgress" in out and "cache.redis_url" in out
    assert "hunter2" not in out and "hunter3" not in out
    assert "postgresql://app:***@db/app" in out


def test_reports_keys_naming_unknown_endpoints_beside_every_other_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[services.payments]\n"
        'endpoints = ["primary"]\n'
        'addresses = { primary = "http://a", typo = "http://b" }\n'
        "priorities = { other = 1 }\n"
        "retry = { max_attempts = 0 }\n"
    )
    assert cli.main(["check", str(path), "--no-env"]) == 1
    out = capsys.readouterr().out
    assert "services.payments.retry.max_attempts" in out
    assert "addresses names endpoints that are not listed: ['typo']" in out
    assert "priorities names endpoints that are not listed: ['other']" in out

