"""The demo: the same traffic and faults twice; recovery must do better, and say so."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from datapunk_recovery import cli
from datapunk_recovery._core.redact import redact_url
from datapunk_recovery.cli.commands import demo as demo_command
from datapunk_recovery.demo import DrillSetup, RunResult, run_drill
from datapunk_recovery.demo.drill import fault_windows
from tests.harness import APP_PASSWORD, PostgresServer, RedisServer

# Seed 5 puts the primary outage early enough in a 3-s run for failover to show
# clearly (without ~0.73, with 0.83-0.95 over repeated runs on a loaded machine).
SHORT = DrillSetup(duration=3.0, rate=40.0, seed=5)


def test_recovery_beats_no_recovery_on_the_same_script() -> None:
    without = asyncio.run(run_drill(SHORT, recovery=False))
    with_ = asyncio.run(run_drill(SHORT, recovery=True))

    # The same planned traffic in both runs.
    assert without.requests == with_.requests == int(SHORT.duration * SHORT.rate)
    assert [at for at, _ in without.outcomes] == [at for at, _ in with_.outcomes]
    # The faults bite without recovery ...
    assert without.success_rate < 0.9
    assert without.faults > 0
    # ... and recovery answers more, by failing over and serving from elsewhere.
    assert with_.success_rate > without.success_rate
    assert with_.calls["secondary"] > 0 == without.calls["secondary"]
    assert with_.fallbacks.get("failover", 0) > 0
    assert with_.transitions, "the primary's breaker opened at least once"


def test_fault_script_scales_with_the_duration() -> None:
    windows = fault_windows(10.0)
    assert {w.target for w in windows} == {"cache", "primary", "database", "pool"}
    assert all(0 <= w.start < (w.end or 10.0) <= 10.0 for w in windows)


def test_setup_is_validated() -> None:
    with pytest.raises(ValueError, match=r"DrillSetup\.duration"):
        DrillSetup(duration=0)
    with pytest.raises(ValueError, match=r"DrillSetup\.rate"):
        DrillSetup(rate=-1)


def test_result_percentiles_use_nearest_rank() -> None:
    result = RunResult(
        label="x",
        recovery=False,
        latencies=(0.1, 0.2, 0.3, 0.4),
        outcomes=((0.0, True),) * 4,
        by_kind={},
        calls={},
        transitions=(),
        fallbacks={},
        faults=0,
    )
    assert result.percentile(0.5) == 0.2
    assert result.percentile(0.99) == 0.4
    assert result.success_rate == 1.0


def test_command_prints_the_comparison(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["demo", "--duration", "2s", "--rate", "30", "--plain"]
    plot = tmp_path / "demo.png"
    if importlib.util.find_spec("matplotlib") is not None:
        args += ["--plot", str(plot)]

    code = cli.main(args)

    out = capsys.readouterr().out
    assert code in (0, 1), out  # which one is the comparison's business (tested below)
    assert "fault script:" in out
    assert "the primary answers 503 to everything" in out
    for figure in ("success rate", "latency p99", "calls to primary", "breaker transitions"):
        assert figure in out
    assert "without recovery" in out and "with recovery" in out
    if "--plot" in args:
        assert plot.stat().st_size > 0


def _result(label: str, successes: int) -> RunResult:
    return RunResult(
        label=label,
        recovery=label == "with recovery",
        latencies=(0.001,) * 10,
        outcomes=tuple((i / 10, i < successes) for i in range(10)),
        by_kind={"api": (successes, 10)},
        calls={"primary": 10},
        transitions=(),
        fallbacks={},
        faults=3,
        duration=1.0,
    )


@pytest.mark.parametrize(("without", "with_", "code"), [(7, 9, 0), (8, 8, 0), (9, 7, 1)])
def test_the_command_exits_0_when_recovery_did_at_least_as_well(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    without: int,
    with_: int,
    code: int,
) -> None:
    results = {False: _result("without recovery", without), True: _result("with recovery", with_)}

    def run_live(setup: DrillSetup, servers: object, recovery: bool, *rest: object) -> RunResult:
        return results[recovery]

    monkeypatch.setattr(demo_command, "_run_live", run_live)
    assert cli.main(["demo", "--plain"]) == code
    out = capsys.readouterr().out
    assert f"{without / 10:.1%}" in out and f"{with_ / 10:.1%}" in out


def test_command_refuses_a_bad_duration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--duration", "soon"])
    assert "duration" in capsys.readouterr().err


def test_the_drill_runs_against_real_redis_and_postgres(
    redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    servers = {"redis_url": redis_server.url, "postgres_dsn": postgres_server.app_dsn}
    without = asyncio.run(run_drill(SHORT, recovery=False, **servers))
    with_ = asyncio.run(run_drill(SHORT, recovery=True, **servers))

    assert without.faults > 0 and without.success_rate < 0.9
    assert with_.success_rate > without.success_rate
    assert with_.calls["cache"] > 0 and with_.calls["database"] > 0
    assert with_.calls["secondary"] > 0 and with_.fallbacks.get("failover", 0) > 0
    assert with_.fallbacks.get("source", 0) > 0  # the Redis cache went down and reads went on
    # Each run removes what it made: its tables and its keys.
    assert asyncio.run(_demo_leftovers(redis_server.url, postgres_server.app_dsn)) == (0, 0)


def test_the_command_never_prints_the_dsn_password(
    capsys: pytest.CaptureFixture[str], redis_server: RedisServer, postgres_server: PostgresServer
) -> None:
    dsn = postgres_server.app_dsn
    args = ["demo", "--duration", "1s", "--rate", "30", "--plain"]
    code = cli.main([*args, "--redis-url", redis_server.url, "--postgres-dsn", dsn])
    out = capsys.readouterr().out
    assert code in (0, 1), out  # a 1-s run is too short to judge recovery by
    assert f"PostgreSQL {redact_url(dsn)}" in out and "Redis redis://127.0.0.1" in out
    assert APP_PASSWORD not in out


async def _demo_leftovers(redis_url: str, dsn: str) -> tuple[int, int]:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match="datapunk-demo-*")]
    finally:
        await client.aclose()
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'datapunk_demo_%'"
        )
    finally:
        await conn.close()
    return len(keys), int(tables)
