"""Instructions per call of the hot paths, at two or more git revisions, counted by callgrind.

Wall-clock benchmarks (pyperf) need a quiet machine; this one does not: it
counts the CPU instructions a call executes under ``valgrind
--tool=callgrind``, which come out the same however loaded the machine is.
Use it to compare revisions back to back ("did this change slow the hot
path?"); instructions are not nanoseconds (a cache miss or a mispredicted
branch costs many instructions' time), so peers are still compared with
pyperf.

For each revision the tool checks the commit out into a temporary detached
worktree (``git worktree add --detach``; removed afterwards) and, for each
case, runs one worker process under callgrind with that worktree's ``src``
first on ``PYTHONPATH`` and ``PYTHONHASHSEED=0``.  The worker builds the case,
warms it up (so the interpreter's specialised instructions are in place),
collects and freezes the heap (``gc.freeze``: a collection in the loop then
costs the same at every revision), then makes ``--loops`` calls inside
``sys.call_tracing``, the only region callgrind counts
(``--collect-atstart=no --toggle-collect=sys_call_tracing``: no start-up,
import or set-up is counted).  Async cases await their calls in
one loop inside one coroutine, started on a running asyncio event loop and
driven inside the counted region; a call that suspends is an error (every
case answers at once).  The same loop around a bare call is counted too;
the figure printed is ``(case - bare) / loops``: the instructions the
library adds to one call.  The last column is the ratio of the last
revision's figure to the first's.  Counts repeat exactly run after run; the
``control`` case uses no library code, so its ratio shows the method's
floor between revisions (1.000 expected).

Cases use only names that exist at every revision of issue 15's round:
top-level ``datapunk_recovery`` names, ``datapunk_recovery.network``,
``datapunk_recovery.cache`` and ``datapunk_recovery.telemetry.prometheus``
(module paths inside moved).  The cache hits are counted above what they
replace: a dict lookup (``MemoryCache``) or a dict lookup plus ``json.loads``
(a JSON cache answering at once, and ``RedisCache`` on a client answering at
once: the recovery and the cache's own decoding, without a server).

Run (from the repository, with the project's venv; valgrind installed)::

    python benchmarks/instructions.py b144b72 main
    python benchmarks/instructions.py --cases retry,breaker --loops 500 A B C
    python benchmarks/instructions.py --json out.json b144b72 main

Each case takes a few seconds under callgrind (``--jobs`` workers at once).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP = 200
LOOPS = 1000
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")

# ---------------------------------------------------------------------------
# the called functions


def ok() -> int:
    return 1


async def aok() -> int:
    return 1


def answer(x: int) -> int:
    return x


async def aanswer(x: Any) -> Any:
    return x


_STORED: dict[str, Any] = {}
_ENCODED: dict[str, bytes] = {}


async def adict_get(key: str) -> Any:
    return _STORED.get(key)


async def adict_json(key: str) -> Any:
    raw = _ENCODED.get(key)
    return None if raw is None else json.loads(raw)


def flaky() -> Callable[[], int]:
    """Fails twice, then succeeds, over and over (a call that needs three attempts)."""
    state = [0]

    def call() -> int:
        state[0] += 1
        if state[0] % 3:
            raise ConnectionError
        return 1

    return call


def one_in(n: int) -> Callable[[], int]:
    """Fails once every ``n`` calls: a count window of ``n`` calls always holds one failure."""
    state = [0]

    def call() -> int:
        state[0] += 1
        if state[0] % n == 0:
            raise ConnectionError
        return 1

    return call


def boom() -> int:
    raise ConnectionError


async def aboom() -> int:
    raise ConnectionError


def _catching(fn: Callable[[], Any], error: type[BaseException]) -> Sync:
    def call() -> None:
        try:  # noqa: SIM105 - contextlib.suppress would add its own cost to what is counted
            fn()
        except error:
            pass

    return call


def _acatching(fn: Callable[[], Awaitable[Any]], error: type[BaseException]) -> Async:
    async def call() -> None:
        try:  # noqa: SIM105 - as above
            await fn()
        except error:
            pass

    return call


# ---------------------------------------------------------------------------
# cases: name -> (bare case subtracted, builder).  Sync builders return the
# callable to call; async builders (run on the event loop) return a
# zero-argument callable returning an awaitable.

Sync = Callable[[], Any]
Async = Callable[[], Awaitable[Any]]


def _bare_sync() -> Sync:
    return ok


def _bare_sync_arg() -> Sync:
    return lambda: answer(1)


def _bare_async() -> Async:
    return aok


def _bare_async_arg() -> Async:
    return lambda: aanswer(1)


def _bare_sync_one_in_100() -> Sync:
    return _catching(one_in(100), ConnectionError)


def _bare_sync_raising() -> Sync:
    return _catching(boom, ConnectionError)


def _bare_async_raising() -> Async:
    return _acatching(aboom, ConnectionError)


def _control() -> Sync:
    fn = flaky()

    def call() -> int:
        for attempt in range(3):
            try:
                return fn()
            except ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError

    return call


def _retry_happy_sync() -> Sync:
    import datapunk_recovery as dr

    return dr.retry(ok)


def _retry_happy_async() -> Async:
    import datapunk_recovery as dr

    return dr.retry(aok)


def _retry_fail2_sync() -> Sync:
    import datapunk_recovery as dr

    return dr.retry(dr.RetryConfig(base_delay=0.0, max_delay=0.0))(flaky())


def _breaker_closed_sync() -> Sync:
    import datapunk_recovery as dr

    return dr.CircuitBreaker("bench")(ok)


def _breaker_closed_async() -> Async:
    import datapunk_recovery as dr

    return dr.CircuitBreaker("bench")(aok)


def _breaker_rate_sync() -> Sync:
    import datapunk_recovery as dr

    config = dr.BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=100
    )
    return dr.CircuitBreaker("bench", config)(ok)


def _breaker_rate_one_failure_sync() -> Sync:
    import datapunk_recovery as dr

    config = dr.BreakerConfig(
        consecutive_failures=None, failure_rate_threshold=0.5, window_size=100
    )
    return _catching(dr.CircuitBreaker("bench", config)(one_in(100)), ConnectionError)


def _open_breaker() -> Any:
    import datapunk_recovery as dr

    # Open for 30 s (the peers' setting in bench_breaker.py): the default's 1 s
    # would end within the counted loop and measure half-open and closed calls.
    breaker = dr.CircuitBreaker("bench", dr.BreakerConfig(open_duration=30.0))
    for _ in range(5):  # the default opens after 5 consecutive failures
        try:  # noqa: SIM105 - as above
            breaker.call(boom)
        except ConnectionError:
            pass
    return breaker


def _breaker_open_sync() -> Sync:
    import datapunk_recovery as dr

    return _catching(_open_breaker()(ok), dr.CircuitOpenError)


def _breaker_open_async() -> Async:
    import datapunk_recovery as dr

    return _acatching(_open_breaker()(aok), dr.CircuitOpenError)


def _pipeline_sync() -> Sync:
    import datapunk_recovery as dr

    pipeline = dr.Pipeline("default")
    return lambda: pipeline.call(answer, 1)


def _pipeline_async() -> Async:
    import datapunk_recovery as dr

    pipeline = dr.Pipeline("default")
    return lambda: pipeline.call_async(aanswer, 1)


def _router_async() -> Async:
    from datapunk_recovery.network import Endpoint, Router

    router = Router("one", [Endpoint("a")])
    return lambda: router.call(aanswer)


def _retry_prometheus_sync() -> Sync:
    from prometheus_client import CollectorRegistry

    import datapunk_recovery as dr
    from datapunk_recovery.telemetry.prometheus import PrometheusExporter

    PrometheusExporter(CollectorRegistry()).install()
    return dr.retry(name="bench")(ok)


async def _no_source(key: str) -> Any:
    return {"key": key, "n": 1}


def _bare_dict_get() -> Async:
    _STORED["k1"] = {"key": "k1", "n": 1}
    return lambda: adict_get("k1")


def _bare_dict_json() -> Async:
    _ENCODED["k1"] = json.dumps({"key": "k1", "n": 1}).encode()
    return lambda: adict_json("k1")


class _JsonDict:
    """A cache answering at once from a dict of JSON bytes (no network, no breaker of its own)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> Any:
        raw = self.data.get(key)
        return None if raw is None else json.loads(raw)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        self.data[key] = json.dumps(value).encode()

    async def counter(self, key: str) -> int:
        return 0


class _InstantRedisClient:
    """The part of a ``redis.asyncio`` client a cache read uses, answering at once."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: str, value: bytes, px: int) -> None:
        self.data[key] = value


# The wall-clock time the cached entry is written at: fixed, so that the
# entry's text (how many digits its freshness time has, which is what parsing
# it costs) is the same run after run; the reads then run on the real clocks.
_FILLED_AT = 4_000_000_000.1234567


def _read_through(cache: Any) -> Async:
    from datapunk_recovery.cache import CacheConfig, FunctionSource, ReadThroughCache
    from datapunk_recovery.testing import fake_clock

    rtc: Any = ReadThroughCache(
        FunctionSource(_no_source), cache, CacheConfig(ttl=3600.0, generation_refresh=3600.0)
    )
    with fake_clock(start=_FILLED_AT):
        _drive(_complete(rtc.get("k1")))  # the miss that fills the cache
    return lambda: rtc.get("k1")


async def _complete(call: Awaitable[Any]) -> None:
    await call


def _cache_hit_memory() -> Async:
    from datapunk_recovery.cache import MemoryCache

    return _read_through(MemoryCache())


def _cache_hit_json() -> Async:
    return _read_through(_JsonDict())


def _cache_hit_redis() -> Async:
    from datapunk_recovery.cache import RedisCache

    return _read_through(RedisCache(_InstantRedisClient()))


BARES: dict[str, tuple[bool, Callable[[], Any]]] = {
    "bare sync": (False, _bare_sync),
    "bare sync f(x)": (False, _bare_sync_arg),
    "bare async": (True, _bare_async),
    "bare async f(x)": (True, _bare_async_arg),
    "bare sync, 1 call in 100 failing": (False, _bare_sync_one_in_100),
    "bare sync raising": (False, _bare_sync_raising),
    "bare async raising": (True, _bare_async_raising),
    "bare async dict get": (True, _bare_dict_get),
    "bare async dict get + json.loads": (True, _bare_dict_json),
}

# name -> (bare subtracted, async?, builder)
CASES: dict[str, tuple[str, bool, Callable[[], Any]]] = {
    "control: fail twice by hand (no library)": ("bare sync", False, _control),
    "retry happy sync": ("bare sync", False, _retry_happy_sync),
    "retry happy async": ("bare async", True, _retry_happy_async),
    "retry fail twice, zero waits, sync": ("bare sync", False, _retry_fail2_sync),
    "breaker closed sync (@breaker default)": ("bare sync", False, _breaker_closed_sync),
    "breaker closed async (@breaker default)": ("bare async", True, _breaker_closed_async),
    "breaker failure rate, 100-call window, sync": ("bare sync", False, _breaker_rate_sync),
    "breaker failure rate, window holds 1 failure (1 call in 100 fails), sync": (
        "bare sync, 1 call in 100 failing",
        False,
        _breaker_rate_one_failure_sync,
    ),
    "breaker open, refusing, sync (@breaker default)": (
        "bare sync raising",
        False,
        _breaker_open_sync,
    ),
    "breaker open, refusing, async (@breaker default)": (
        "bare async raising",
        True,
        _breaker_open_async,
    ),
    "pipeline default sync": ("bare sync f(x)", False, _pipeline_sync),
    "pipeline default async": ("bare async f(x)", True, _pipeline_async),
    "router one endpoint async": ("bare async f(x)", True, _router_async),
    "retry happy sync, prometheus installed": ("bare sync", False, _retry_prometheus_sync),
    "cache hit, MemoryCache": ("bare async dict get", True, _cache_hit_memory),
    "cache hit, JSON cache answering at once": (
        "bare async dict get + json.loads",
        True,
        _cache_hit_json,
    ),
    "cache hit, RedisCache on an instant client": (
        "bare async dict get + json.loads",
        True,
        _cache_hit_redis,
    ),
}


# ---------------------------------------------------------------------------
# worker: runs inside callgrind; only sys.call_tracing's call is counted


# itertools.repeat, not range: the loop allocates no int per call, whose cost
# would depend on where the revision's heap left free memory.


def _loop(fn: Sync, loops: int) -> None:
    for _ in itertools.repeat(None, loops):
        fn()


async def _aloop(fn: Async, loops: int) -> None:
    for _ in itertools.repeat(None, loops):
        await fn()


def _drive(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends to its end, synchronously."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("an async case suspended; cases must answer at once")


def _settle() -> None:
    """Collect, then freeze what is alive: a collection inside the counted loop
    then walks only what the calls made, not the heap each revision's imports
    left (its size differs between revisions and is not a per-call cost)."""
    gc.collect()
    gc.freeze()


def worker(name: str, loops: int) -> None:
    import datapunk_recovery

    print(datapunk_recovery.__file__, flush=True)  # the driver checks which tree ran
    is_async, build = BARES[name] if name in BARES else CASES[name][1:]
    if not is_async:
        fn = build()
        _loop(fn, WARMUP)
        _settle()
        sys.call_tracing(_loop, (fn, loops))
        return

    async def body() -> None:
        afn = build()
        await _aloop(afn, WARMUP)
        _settle()
        sys.call_tracing(_drive, (_aloop(afn, loops),))

    asyncio.run(body())


# ---------------------------------------------------------------------------
# driver


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def count(tree: Path, name: str, loops: int) -> int:
    """Instructions callgrind counts in one worker's loop region for ``name``."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONHASHSEED="0")
    env.pop("COVERAGE_PROCESS_START", None)
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        "--collect-atstart=no",
        "--toggle-collect=sys_call_tracing",
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--loops",
        str(loops),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"{name}: worker failed:\n{done.stderr[-2000:]}")
    if not done.stdout.startswith(str(tree / "src")):
        raise RuntimeError(f"{name}: imported {done.stdout.strip()}, not {tree}/src")
    found = COLLECTED.findall(done.stderr)
    if not found:
        raise RuntimeError(f"{name}: no callgrind total in:\n{done.stderr[-2000:]}")
    return int(found[-1])


def measure(
    rev: str, names: list[str], loops: int, jobs: int
) -> tuple[str, dict[str, float | None]]:
    """The commit measured; per-call instructions of each bare call, and of each case above
    its bare call."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    # The same path for a commit every run: file names reach the measured code
    # (tracebacks, module names), and a random one moved the failure paths' counts.
    tree = Path(tempfile.gettempdir()) / f"instructions-{sha[:12]}"
    if tree.exists():
        raise SystemExit(f"{tree} exists: another run of this tool, or a stale worktree")
    _git("worktree", "add", "--detach", str(tree), sha)
    try:
        wanted = sorted({CASES[n][0] for n in names}) + names
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = {n: pool.submit(count, tree, n, loops) for n in wanted}
        raw: dict[str, int | None] = {}
        for n, future in futures.items():
            try:
                raw[n] = future.result()
            except RuntimeError as exc:
                print(f"{rev}: {exc}", file=sys.stderr)
                raw[n] = None
    finally:
        _git("worktree", "remove", "--force", str(tree))
    out: dict[str, float | None] = {}
    for n in wanted:
        value, base = raw[n], raw.get(CASES[n][0]) if n in CASES else 0
        out[n] = None if value is None or base is None else (value - base) / loops
    return sha[:9], out


def table(revs: list[str], results: list[dict[str, float | None]], names: list[str]) -> str:
    width = max(len(n) for n in [*names, *BARES]) + 2
    head = f"{'instructions per call':{width}}" + "".join(f"{r:>12}" for r in revs)
    if len(revs) > 1:
        head += f"{'ratio':>8}"
    lines = [head, "-" * len(head)]
    rows = [n for n in BARES if n in results[0]] + names
    for n in rows:
        cells = [r.get(n) for r in results]
        sign = "+" if n in CASES else ""
        line = f"{n:{width}}" + "".join(
            f"{'n/a':>12}" if c is None else f"{sign}{c:.0f}".rjust(12) for c in cells
        )
        first, last = cells[0], cells[-1]
        if len(revs) > 1 and n in CASES and first and last is not None:
            line += f"{last / first:8.3f}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", help="git revisions, the baseline first")
    parser.add_argument("--loops", type=int, default=LOOPS, help="calls counted per case")
    parser.add_argument("--jobs", type=int, default=2, help="callgrind workers at once")
    parser.add_argument("--cases", default="", help="comma-separated words; cases containing one")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.loops)
        return
    if not args.revs:
        parser.error("name at least one revision")
    words = [w for w in args.cases.split(",") if w]
    names = [n for n in CASES if not words or any(w in n for w in words)]
    # A branch may move while the tool runs: each revision is resolved once, when measured.
    measured = [measure(rev, names, args.loops, args.jobs) for rev in args.revs]
    shas = [sha for sha, _ in measured]
    results = [figures for _, figures in measured]
    print(f"callgrind, {args.loops} calls per case, python {sys.version.split()[0]}")
    print("'+N': instructions a call adds above its bare call; ratio: last / first revision")
    print(table(shas, results, names))
    if args.json:
        payload: dict[str, Any] = {"loops": args.loops}
        payload["revisions"] = dict(zip(args.revs, shas, strict=True))
        payload["instructions"] = dict(zip(shas, results, strict=True))
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
