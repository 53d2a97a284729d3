"""The shared path under load: many processes sharing one breaker and one budget in Redis.

Not a pyperf benchmark (pyperf times one call in one process): this one runs
the load of issue 18 and reports what Redis and the callers accounted.
``--processes`` OS processes (default 8), each with ``--tasks`` asyncio tasks
(default 200) making ``--calls`` calls each (default 25) after one warm-up
call per process (the connection made and the shared state read once), every
call through one closed breaker and counted by one token budget, both shared through one
[`RedisStore`][datapunk_recovery.stores.redis.RedisStore] with default settings
(``timeout`` 0.25 s).  The called function yields to the event loop once, so
the store's background flushes run as they do in a service.

The same load runs twice: with local (unshared) breakers and budgets, then
shared.  Reported:

- ``commands_per_1000_calls``: Redis's ``total_commands_processed`` (INFO
  stats: commands run inside Lua scripts and connection setup count) over the
  shared run, per 1,000 calls; this script's own INFO commands are taken off;
- ``connections_per_process``: ``total_connections_received`` over the
  shared run, per process (a store's pool opens one per command in flight at
  once);
- ``fallbacks``: ``StoreFallback`` and ``BudgetStoreFallback`` events seen by
  every process of the shared run (Redis is up all along: the target is 0);
- ``p99_local_ms`` / ``p99_shared_ms``: the 99th percentile of one call's
  latency (``call_async`` awaited, in ms) over every call of every process;
- ``hung``: processes that did not finish within ``--deadline`` seconds.

``--no-warmup`` times every call from the process's start instead: the
first connection and the first read, made while 200 tasks start at once on
2 shared cores, are then in the figures (the start-up of a fleet).

Run: ``python benchmarks/bench_shared.py`` (starts a private redis-server on a
free loopback port) or ``python benchmarks/bench_shared.py --redis-url
redis://127.0.0.1:6379/0``; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import asyncio, json, sys, time
from datapunk_recovery import events
from datapunk_recovery.breaker import CircuitBreaker, StoreFallback
from datapunk_recovery.budget import BudgetStoreFallback, TokenBudget
from datapunk_recovery.stores.budget_redis import SharedBudget
from datapunk_recovery.stores.redis import RedisStore

clock = time.perf_counter
T0 = clock()
async def main(url, name, tasks, calls, shared, warm):
    fallbacks = []
    events.subscribe(
        lambda e: fallbacks.append(f"{type(e).__name__}:{e.error_type}@{clock() - T0:.3f}")
        if isinstance(e, StoreFallback | BudgetStoreFallback) else None
    )
    store = RedisStore(url) if shared else None  # default settings, as users run it
    breaker = CircuitBreaker(name, store=store)
    budget = TokenBudget(name)
    if shared:
        budget = SharedBudget(budget, store)
        budget.start()
    latencies = []

    async def ok():
        await asyncio.sleep(0)
        return 1

    async def task():
        for _ in range(calls):
            t0 = clock()
            await breaker.call_async(ok)
            latencies.append(clock() - t0)
            budget.on_attempt(True)

    if warm:
        await breaker.call_async(ok)  # warm-up: the connection made, the state read once
    t0 = clock()
    await asyncio.gather(*(task() for _ in range(tasks)))
    elapsed = clock() - t0
    if shared:
        await budget.aclose()
        await store.aclose()
    latencies.sort()
    print(json.dumps({
        "calls": len(latencies) + warm, "timed": len(latencies),
        "fallbacks": fallbacks, "elapsed": elapsed,
        "latencies": latencies[len(latencies) // 2:],  # the upper half is enough for p99
    }), flush=True)

asyncio.run(main(
    sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1",
    sys.argv[6] == "1",
))
"""


def _info(url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = client.info("stats")
    finally:
        client.close()
    return stats


def _p99(tails: list[list[float]], totals: list[int]) -> float:
    """The 99th percentile over all calls, from each process's upper half (in ms)."""
    merged = sorted(x for tail in tails for x in tail)
    total = sum(totals)
    rank = int(0.99 * total)  # calls below it; the upper halves hold every call above the median
    index = rank - (total - len(merged))
    return 1000 * merged[min(max(index, 0), len(merged) - 1)]


def run(
    url: str, processes: int, tasks: int, calls: int, shared: bool, deadline: float, warm: bool
) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    name = f"bench-shared-{uuid.uuid4().hex[:8]}"
    before = _info(url) if shared else None
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                url,
                name,
                str(tasks),
                str(calls),
                "1" if shared else "0",
                "1" if warm else "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    reports: list[dict[str, Any]] = []
    hung: list[int] = []
    end = time.monotonic() + deadline
    for child in children:
        try:
            out, err = child.communicate(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            hung.append(child.pid)
            child.kill()
            child.communicate()
            continue
        if child.returncode != 0:
            raise SystemExit(f"a child failed:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(r["calls"] for r in reports)
    result: dict[str, Any] = {
        "calls": total,
        "hung": len(hung),
        "p99_ms": _p99([r["latencies"] for r in reports], [r["timed"] for r in reports]),
        "fallbacks": sum(len(r["fallbacks"]) for r in reports),
        "fallback_kinds": sorted({f for r in reports for f in r["fallbacks"]}),
        "seconds": max((r["elapsed"] for r in reports), default=0.0),
    }
    if before is not None:
        after = _info(url)
        # less this script's own INFO command (the one before is counted in "after")
        used = int(after["total_commands_processed"]) - int(before["total_commands_processed"]) - 1
        opened = (
            int(after["total_connections_received"]) - int(before["total_connections_received"]) - 1
        )  # (this script's own connection for the INFO after)
        result["commands"] = used
        result["commands_per_1000_calls"] = round(1000 * used / max(total, 1), 2)
        result["connections_per_process"] = round(opened / processes, 2)
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose p99 is the median (latencies); counts are taken over every run."""
    ordered = sorted(runs, key=lambda r: r["p99_ms"])
    return dict(ordered[len(ordered) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("DATAPUNK_BENCH_REDIS_URL"))
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds for a run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median p99)")
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="time every call from the process's start (connection setup and first read included)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    url = args.redis_url
    if url is None:
        sys.path.insert(0, str(ROOT))
        from tests.harness import RedisServer

        server = RedisServer()
        server.start()
        url = server.url
    locals_: list[dict[str, Any]] = []
    shareds: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeat):  # interleaved, so that a busy moment hits both
            for shared_run, out in ((False, locals_), (True, shareds)):
                out.append(
                    run(
                        url,
                        args.processes,
                        args.tasks,
                        args.calls,
                        shared_run,
                        args.deadline,
                        not args.no_warmup,
                    )
                )
    finally:
        if server is not None:
            server.close()
    local = _median_run(locals_)
    shared = _median_run(shareds)
    shared["hung"] = sum(r["hung"] for r in shareds)
    local["hung"] = sum(r["hung"] for r in locals_)
    shared["fallbacks"] = sum(r["fallbacks"] for r in shareds)
    shared["fallback_kinds"] = sorted({k for r in shareds for k in r["fallback_kinds"]})
    shared["commands_per_1000_calls"] = max(r["commands_per_1000_calls"] for r in shareds)
    shared["connections_per_process"] = max(r["connections_per_process"] for r in shareds)
    budget = 1.5 * local["p99_ms"] + 2.0
    summary = {
        "processes": args.processes,
        "repeat": args.repeat,
        "warmup": not args.no_warmup,
        "tasks": args.tasks,
        "calls_per_task": args.calls,
        "hung": local["hung"] + shared["hung"],
        "fallbacks": shared["fallbacks"],
        "fallback_kinds": shared["fallback_kinds"],
        "commands_per_1000_calls": shared["commands_per_1000_calls"],
        "connections_per_process": shared["connections_per_process"],
        "p99_local_ms": round(local["p99_ms"], 2),
        "p99_shared_ms": round(shared["p99_ms"], 2),
        "p99_target_ms": round(budget, 2),
        "seconds_local": round(local["seconds"], 2),
        "seconds_shared": round(shared["seconds"], 2),
    }
    if args.json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key:26} {value}")


if __name__ == "__main__":
    main()
