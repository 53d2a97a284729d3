"""A missing extra says which one to install, at every integration.

Each case runs in a fresh interpreter where the driver is blocked (as if its
extra were not installed) and must raise an ``ImportError`` whose message says
exactly ``pip install 'datapunk-recovery[<extra>]'``.  No server is needed:
the driver is missing before any connection is tried.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datapunk_recovery._core.extras import MissingExtra, install_hint, raise_missing

ROOT = Path(__file__).resolve().parent.parent

_PRELUDE = """
import asyncio, importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
try:
{body}
except ImportError as exc:
    print(type(exc).__name__, "|", exc)
else:
    print("no error")
"""

CASES = {
    "stores.RedisStore": (
        "redis",
        "from datapunk_recovery.stores.redis import RedisStore\n"
        "RedisStore('redis://127.0.0.1:1/0')",
    ),
    "cache.RedisCache": (
        "redis",
        "from datapunk_recovery.cache import RedisCache\n"
        "RedisCache.from_url('redis://127.0.0.1:1/0')",
    ),
    "database.ManagedPool.create_asyncpg": (
        "asyncpg",
        "from datapunk_recovery.database import ManagedPool\n"
        "asyncio.run(ManagedPool.create_asyncpg('postgresql://u@127.0.0.1:1/db'))",
    ),
    "database.ManagedPool.create_psycopg": (
        "psycopg",
        "from datapunk_recovery.database import ManagedPool\n"
        "asyncio.run(ManagedPool.create_psycopg('postgresql://u@127.0.0.1:1/db'))",
    ),
    "network.httpx": ("httpx", "import datapunk_recovery.network.httpx"),
    "network.aiohttp": ("aiohttp", "import datapunk_recovery.network.aiohttp"),
    "config [cache] redis": (
        "redis",
        "from datapunk_recovery.strategies import RecoveryStrategies\n"
        "recovery = RecoveryStrategies.from_config({'cache': {'redis': 'redis://127.0.0.1:1/0'}})\n"
        "asyncio.run(recovery.open())",
    ),
    "config [databases.x] postgres": (
        "asyncpg",
        "from datapunk_recovery.strategies import RecoveryStrategies\n"
        "recovery = RecoveryStrategies.from_config(\n"
        "    {'databases': {'x': {'postgres': 'postgresql://u@127.0.0.1:1/db'}}}\n"
        ")\n"
        "asyncio.run(recovery.open())",
    ),
    "telemetry.PrometheusExporter": (
        "prometheus",
        "from datapunk_recovery.telemetry.prometheus import PrometheusExporter\n"
        "PrometheusExporter()",
    ),
    "telemetry.OpenTelemetryExporter": (
        "otel",
        "from datapunk_recovery.telemetry.otel import OpenTelemetryExporter\n"
        "OpenTelemetryExporter()",
    ),
    "telemetry.StructlogExporter": (
        "structlog",
        "from datapunk_recovery.telemetry.structlog import StructlogExporter\n"
        "StructlogExporter()",
    ),
}

BLOCKS = {
    "redis": "redis",
    "asyncpg": "asyncpg",
    "psycopg": "psycopg,psycopg_pool",
    "httpx": "httpx",
    "aiohttp": "aiohttp",
    "prometheus": "prometheus_client",
    "otel": "opentelemetry",
    "structlog": "structlog",
}
"""The modules each extra installs (what is blocked to simulate its absence)."""


def run_without(extra: str, body: str) -> str:
    code = _PRELUDE.format(body=textwrap.indent(body, "    "))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAPUNK_RECOVERY")}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "-c", code, BLOCKS[extra]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_missing_extra_names_the_command_that_installs_it(case: str) -> None:
    extra, body = CASES[case]
    out = run_without(extra, body)
    assert out.startswith("MissingExtra | "), out
    assert out.endswith(f"pip install 'datapunk-recovery[{extra}]'"), out
    if case.startswith("config"):  # the key of the configuration that needs it
        assert out.startswith("MissingExtra | [cache] redis needs redis") or out.startswith(
            "MissingExtra | [databases.x] postgres needs asyncpg"
        ), out


def test_the_missing_extra_is_an_import_error_carrying_the_extra() -> None:
    not_found = ModuleNotFoundError("No module named 'nodriver'", name="nodriver")
    with pytest.raises(ImportError) as caught:
        raise_missing(not_found, "Thing", "nodriver", extra="thing")
    assert isinstance(caught.value, MissingExtra)
    assert caught.value.extra == "thing"
    assert caught.value.__cause__ is not_found
    assert str(caught.value) == "Thing needs nodriver: " + install_hint("thing")


def test_a_driver_that_fails_for_another_reason_keeps_its_own_error() -> None:
    broken = ImportError("cannot import name 'x' from partially initialized module 'redis'")
    with pytest.raises(ImportError) as caught:
        raise_missing(broken, "RedisCache", "redis", extra="redis")
    assert caught.value is broken
