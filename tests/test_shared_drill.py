"""The shared-state drill: OS processes sharing a breaker and a budget through Redis.

Four processes, each with eight tasks calling a loopback HTTP dependency
through ``retry(budget=SharedBudget(RatioBudget))`` around a breaker shared
through one real Redis (store defaults).  The dependency flaps: healthy, then
flaky (every third request fails), then down for everyone, then it heals.
Phases switch on what the server and the processes report (bounded
polling), never on sleeping.

It checks what the code and the server accounted:

- the real load amplification (requests the server received per operation
  that sent one) stays at most 1.1: retries are bounded fleet-wide by the
  shared budget, and the open breaker sends nothing;
- the server received exactly the requests the processes say they sent;
- every process sees the trip within the promised lag (``cache_ttl`` plus one
  store ``timeout`` after the first process saw it);
- every process sees the breaker close again once the dependency heals;
- no store fallback while Redis is up, no unexpected error, and no process
  hangs: each has a bounded join, and a test failure shows its output.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RedisServer
from tests.network_servers import Reply, ScriptedServer

pytestmark = pytest.mark.drill

PROCESSES = 4
CACHE_TTL = 0.5  # the store's default
TIMEOUT = 0.25  # the store's default
#: The shared retry budget: retries at most 5% of attempts fleet-wide (1.05x at
#: most when always spent), leaving room for what processes grant between syncs.
RATIO = 0.05
FLAKY = 1500  # requests of the flaky phase: every third one fails

_CHILD = r"""
import asyncio, json, sys, threading, time
import aiohttp
from datapunk_recovery import events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery.breaker import (
    BreakerConfig, BreakerState, CircuitBreaker, StoreFallback,
)
from datapunk_recovery.budget import BudgetStoreFallback, RatioBudget, RatioBudgetConfig
from datapunk_recovery._execution.engine import retry
from datapunk_recovery.stores.budget_redis import SharedBudget
from datapunk_recovery.stores.redis import RedisStore

class Unavailable(Exception):
    pass

def say(**fields):
    print(json.dumps(fields), flush=True)

async def main(redis_url, http_url, name):
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    fallbacks = []
    events.subscribe(
        lambda e: fallbacks.append(type(e).__name__)
        if isinstance(e, StoreFallback | BudgetStoreFallback) else None
    )
    store = RedisStore(redis_url)  # default settings
    breaker = CircuitBreaker(
        name, BreakerConfig(consecutive_failures=5, open_duration=0.3, open_jitter=0.0),
        store=store,
    )
    budget = SharedBudget(
        RatioBudget(name, RatioBudgetConfig(ratio=RATIO, min_per_second=0.0, window=10.0)), store
    )
    budget.start()
    counts = {"operations": 0, "sent": 0, "firsts": 0}
    errors = set()
    seen = {}

    async with aiohttp.ClientSession() as session:
        async def request(box):
            box[0] += 1
            counts["sent"] += 1
            async with session.get(http_url) as response:
                await response.read()
                if response.status == 503:
                    raise Unavailable()
                return response.status

        async def attempt(box):
            return await breaker.call_async(request, box)

        run = retry(
            RetryConfig(max_attempts=3, base_delay=0.001, max_delay=0.002),
            on=(Unavailable,),
            budget=budget,
            name=name,
        )(attempt)

        def look():
            state = breaker.state
            if "open" not in seen and state is BreakerState.OPEN:
                seen["open"] = time.time()
                say(open_at=seen["open"])
            elif "open" in seen and "closed" not in seen and state is BreakerState.CLOSED:
                seen["closed"] = time.time()
                say(closed_at=seen["closed"])

        async def task():
            while not stop.is_set():
                box = [0]
                try:
                    await run(box)
                except Exception as exc:
                    errors.add(type(exc).__name__)
                counts["operations"] += 1
                counts["firsts"] += box[0] > 0
                look()
                await asyncio.sleep(0.002)

        await breaker.call_async(request, [0])  # warm-up: connections made, state read
        counts["sent"] = 0  # (the server counts the warm-up; see the test)
        say(ready=True)
        await asyncio.gather(*(task() for _ in range(8)))
    await budget.aclose()
    await store.aclose()
    say(done=True, errors=sorted(errors), fallbacks=fallbacks, **counts)

RATIO = float(sys.argv[4])
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


class Child:
    """One process, its stdout lines read by a thread into a queue."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            with contextlib.suppress(ValueError):  # (a line that is no report)
                self.lines.put(json.loads(line))

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """The next report holding ``key`` (bounded: fails with the child's output)."""
        end = time.monotonic() + timeout
        while True:
            try:
                report = self.lines.get(timeout=max(end - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"child {self.proc.pid} never reported {key!r}:\n{self.output()}"
                ) from None
            if key in report:
                return report

    def output(self) -> str:
        err = ""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()
        return "".join(self.log) + err

    def finish(self, timeout: float) -> None:
        """Ask it to stop, and join it within ``timeout`` seconds (killed and failed if not)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"child {self.proc.pid} hung (no exit within {timeout} s):\n{self.output()}"
            ) from None
        self.reader.join(timeout)
        assert self.proc.returncode == 0, self.output()


def _until(what: str, check: Any, timeout: float = 10.0) -> None:
    """Bounded polling of what the server accounted."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"never: {what}")
        time.sleep(0.01)


def test_processes_sharing_a_breaker_and_a_budget_in_front_of_a_flapping_dependency(
    redis_server: RedisServer,
) -> None:
    name = f"drill-{uuid.uuid4().hex[:8]}"
    server = ScriptedServer("dependency").start()
    children: list[Child] = []
    try:
        children = [
            Child([redis_server.url, server.url, name, str(RATIO)]) for _ in range(PROCESSES)
        ]
        for child in children:
            child.expect("ready", 15)
        healthy = len(server.seen)
        _until("healthy traffic", lambda: len(server.seen) >= healthy + 400)
        # flaky: every third request fails, so retries are asked for all along
        server.answer(*[Reply(503 if i % 3 == 0 else 200) for i in range(FLAKY)])
        _until("the flaky phase served", lambda: not server.script, 20)
        server.answer(default=Reply(503))  # down: it fails for everyone
        opened = [child.expect("open_at", 10)["open_at"] for child in children]
        server.answer(default=Reply(200))  # and heals
        for child in children:
            child.expect("closed_at", 10)
        reports = []
        for child in children:
            child.finish(10)
            reports.append(child.expect("done", 5))
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
        server.stop()
    for report in reports:
        assert report["fallbacks"] == [], report  # Redis was up all along
        assert set(report["errors"]) <= {"Unavailable", "RetryExhausted", "CircuitOpenError"}
    sent = sum(r["sent"] for r in reports)
    firsts = sum(r["firsts"] for r in reports)
    assert len(server.seen) == sent + PROCESSES  # (+ each process's warm-up call)
    amplification = sent / firsts
    spread = max(opened) - min(opened)
    print(
        f"\nrequests {sent}, operations that sent one {firsts}, "
        f"amplification {amplification:.3f}, trip seen by all within {spread:.3f} s"
    )
    assert amplification <= 1.1
    assert spread <= CACHE_TTL + TIMEOUT
