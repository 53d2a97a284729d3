"""Soak: mixed load through the recovery stack with chaos on, watching memory and bounds.

What runs, for ``--seconds`` (60 by default):

- ``--tasks`` asyncio tasks and ``--threads`` threads call a fake dependency
  through a bulkhead, a circuit breaker taken from a bounded registry by
  whatever name the caller sends (80% of calls to 16 busy services, the rest
  over ``--names`` distinct names), a retry with a
  shared retry budget, and chaos: random latency, a fault rate, and a script
  (a :class:`~datapunk_recovery.chaos.Timeline`) of an outage of 1.5 s every
  10 s and of failures of a type made on the fly (so that the classifier meets
  ever new exception types).
- tracemalloc measures the memory the Python heap holds, every
  ``--sample`` seconds after a full collection.

It fails (exit code 1) when, after the warm-up (``--warmup`` seconds, and
until the registry is full and more types were made than the classifier
keeps), the memory held grew by more than ``--max-growth`` bytes; when the registry holds more
breakers than its bound allows (``max_size`` plus those it may not forget:
open, half-open or forced open); when more of the exception types made on
the fly stay alive than the classifier may remember (its documented bound,
judged from outside: the types are held weakly here); when a bulkhead slot,
a task or a thread was leaked; or when a caller saw an exception nobody
injected or expected.  It prints its figures
either way.

    python scripts/soak.py                 # the CI soak: 60 s
    python scripts/soak.py --seconds 3600  # the long soak (opt-in)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import random
import statistics
import sys
import threading
import time
import tracemalloc
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from datapunk_recovery import BudgetExhausted, CircuitOpenError, RetryConfig, chaos, retry
from datapunk_recovery.breaker import BreakerConfig, BreakerState
from datapunk_recovery.breaker.registry import BreakerRegistry
from datapunk_recovery.budget import RatioBudget, RatioBudgetConfig
from datapunk_recovery.flow.bulkhead import Bulkhead, BulkheadConfig, BulkheadFull

MiB = 1024 * 1024
REGISTRY_SIZE = 200
KEEP = {BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.FORCED_OPEN}


class InjectedOnTheFly(ValueError):
    """Base of the exception types the soak makes while it runs."""


#: How many exception types the classifier remembers at most (docs/reliability.md).
CLASSIFIER_BOUND = 1024

_made = itertools.count(1)
#: The types made so far (approximately, under threads: only compared with the bound).
_made_so_far = 0
#: The types made on the fly, held weakly: those still alive after a collection are
#: held by someone else, the classifier's per-type verdicts above all, which is how
#: its bound is judged from outside.
_kinds: weakref.WeakSet[type[InjectedOnTheFly]] = weakref.WeakSet()


def _new_kind_of_failure(name: str) -> str:
    # A fresh exception type per call: a program that makes types dynamically
    # must not grow the classifier's memory without bound.
    global _made_so_far
    n = next(_made)
    _made_so_far = max(_made_so_far, n)
    kind = type(f"OnTheFly{n}", (InjectedOnTheFly,), {})
    _kinds.add(kind)
    raise kind(name)


def _kinds_alive() -> int:
    """On-the-fly exception types still alive after a full collection."""
    gc.collect()
    return len(_kinds)


# Exceptions a caller may legitimately see: injected faults and the stack's refusals.
EXPECTED: tuple[type[Exception], ...] = (
    ConnectionResetError,
    TimeoutError,
    InjectedOnTheFly,
    CircuitOpenError,
    BulkheadFull,
    BudgetExhausted,
)


@dataclass
class Figures:
    """What the run did; printed at the end."""

    calls: Counter[str] = field(default_factory=Counter)
    #: (seconds since start, heap bytes, whether the bounded caches were full).
    samples: list[tuple[float, int, bool]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def count(self, outcome: str) -> None:
        self.calls[outcome] += 1


def _outcome(exc: Exception) -> str:
    kind = type(exc)
    if issubclass(kind, InjectedOnTheFly):
        return "error:OnTheFly*"
    return f"error:{kind.__name__}" if isinstance(exc, EXPECTED) else f"UNEXPECTED:{kind.__name__}"


def _script(seconds: float, seed: int) -> chaos.Timeline:
    """The faults over time: an outage of 1.5 s every 10 s, and odd failures.

    Odd failures (a new exception type each) come thick in the first 2 s, so
    that the classifier's bounded cache is full early and the memory judged
    after the warm-up is the steady state's; then they stay at 2%.
    """
    odd = chaos.Behaviour(_new_kind_of_failure)
    windows = [
        chaos.Window(0.0, 2.0, odd, rate=0.5, target="backend"),
        chaos.Window(2.0, None, odd, rate=0.02, target="backend"),
    ]
    windows += [
        chaos.Window(t + 5.0, t + 6.5, chaos.Fault(ConnectionResetError), target="backend")
        for t in range(0, int(seconds) + 10, 10)
    ]
    return chaos.Timeline(windows, seed=seed, name="soak-script")


class Stack:
    """The recovery stack under soak, shared by every task and thread."""

    def __init__(self, seconds: float, seed: int, leak_bytes: int) -> None:
        self.rng = random.Random(seed)
        #: What --leak keeps forever, to prove that the memory check can fail.
        self.kept: list[bytes] = []
        self.registry = BreakerRegistry(
            BreakerConfig(consecutive_failures=5, open_duration=0.5, half_open_permits=2),
            max_size=REGISTRY_SIZE,
        )
        self.bulkhead = Bulkhead("soak", BulkheadConfig(max_concurrent=30))
        self.budget = RatioBudget("soak-budget", RatioBudgetConfig(ratio=0.2, min_per_second=50))
        self.script = _script(seconds, seed)
        self.injectors: list[chaos.Injector] = [
            chaos.Chaos(chaos.Latency(0.0, up_to=0.002), rate=0.5, seed=seed, name="latency"),
            chaos.Chaos(chaos.Fault(ConnectionResetError), rate=0.1, seed=seed + 1, name="reset"),
            self.script.injector("backend"),
        ]
        config = RetryConfig(max_attempts=3, base_delay=0.001, max_delay=0.01)

        leak, kept = b"x" * leak_bytes, self.kept

        async def backend(name: str) -> str:
            if leak:
                kept.append(leak + name.encode())
            return name

        def backend_sync(name: str) -> str:
            return name

        async_dep: Callable[[str], object] = backend
        sync_dep: Callable[[str], str] = backend_sync
        for injector in self.injectors:
            async_dep = injector(async_dep)  # type: ignore[arg-type]
            sync_dep = injector(sync_dep)
        registry, adep, sdep = self.registry, async_dep, sync_dep

        @retry(config, budget=self.budget, name="soak-async")
        async def through_breaker(name: str) -> str:
            return await registry.get(name).call_async(adep, name)  # type: ignore[arg-type]

        @retry(config, budget=self.budget, name="soak-sync")
        def through_breaker_sync(name: str) -> str:
            return registry.get(name).call(sdep, name)

        self.call_async = through_breaker
        self.call_sync = through_breaker_sync

    def injected(self) -> int:
        return sum(i.statistics().injected for i in self.injectors)


HOT = 16


def _pick_name(rng: random.Random, names: int) -> str:
    # Most calls go to a few busy services (their breakers open during the
    # outages); the rest spread over a long tail of names, as callers send them.
    if rng.random() < 0.8:
        return f"hot-{rng.randrange(HOT)}"
    return f"svc-{rng.randrange(names)}"


async def _worker(stack: Stack, figures: Figures, names: int, stop: asyncio.Event) -> None:
    rng = random.Random(stack.rng.random())
    while not stop.is_set():
        name = _pick_name(rng, names)
        try:
            await stack.bulkhead.call_async(stack.call_async, name)
            figures.count("ok")
        except Exception as exc:
            figures.count(_outcome(exc))
        await asyncio.sleep(0)  # let the sampler and the other tasks in


def _thread_worker(
    stack: Stack, figures: Figures, names: int, stop: threading.Event, seed: float
) -> None:
    rng = random.Random(seed)
    local: Counter[str] = Counter()
    while not stop.is_set():
        name = _pick_name(rng, names)
        try:
            stack.bulkhead.call(stack.call_sync, name)
            local["ok"] += 1
        except Exception as exc:
            local[_outcome(exc)] += 1
    figures.calls.update(local)


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _full(stack: Stack) -> bool:
    # Bounded structures fill up during the warm-up; growth is judged only after.
    # The classifier's verdicts are full once more types were made than it may keep.
    return _made_so_far > CLASSIFIER_BOUND and len(stack.registry) >= REGISTRY_SIZE


async def _sampler(
    stack: Stack, figures: Figures, start: float, every: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        figures.samples.append((time.monotonic() - start, _heap(), _full(stack)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def soak(args: argparse.Namespace) -> Figures:
    figures = Figures()
    stack = Stack(args.seconds, args.seed, args.leak)
    stop = asyncio.Event()
    thread_stop = threading.Event()
    threads_before = threading.active_count()
    start = time.monotonic()
    stack.script.start()
    threads = [
        threading.Thread(
            target=_thread_worker,
            args=(stack, figures, args.names, thread_stop, stack.rng.random()),
            name=f"soak-{i}",
        )
        for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    tasks = [
        asyncio.create_task(_worker(stack, figures, args.names, stop)) for _ in range(args.tasks)
    ]
    sampler = asyncio.create_task(_sampler(stack, figures, start, args.sample, stop))
    await asyncio.sleep(args.seconds)
    # On a busy machine the bounded caches fill later: go on, up to
    # --max-seconds, until the steady state has enough samples to be judged.
    deadline = start + max(args.max_seconds or 0.0, args.seconds)
    while len(_steady(args, figures)) < MIN_STEADY_SAMPLES and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded polling of the samples
        await asyncio.sleep(args.sample)
    stop.set()
    thread_stop.set()
    await asyncio.gather(*tasks, sampler)
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - start
    figures.samples.append((elapsed, _heap(), _full(stack)))
    _judge(args, stack, figures, elapsed, threads_before)
    return figures


#: Heap samples after the warm-up needed to judge growth.
MIN_STEADY_SAMPLES = 4


def _warm(args: argparse.Namespace, figures: Figures) -> float | None:
    """When the warm-up ended: --warmup seconds passed and the bounded caches are full."""
    return next((t for t, _, full in figures.samples if t >= args.warmup and full), None)


def _steady(args: argparse.Namespace, figures: Figures) -> list[int]:
    """The heap samples (bytes) taken after the warm-up."""
    warm = _warm(args, figures)
    return [b for t, b, _ in figures.samples if warm is not None and t >= warm]


def _judge(
    args: argparse.Namespace, stack: Stack, figures: Figures, elapsed: float, threads: int
) -> None:
    fail = figures.failures.append
    warm, after = _warm(args, figures), _steady(args, figures)
    if len(after) < MIN_STEADY_SAMPLES:
        fail(f"too few memory samples after the warm-up ({len(after)}): run longer")
        growth = 0
    else:
        # Medians of the first and last few samples: one collection's noise is not growth.
        k = max(2, len(after) // 5)
        growth = int(statistics.median(after[-k:]) - statistics.median(after[:k]))
        if growth > args.max_growth:
            fail(f"memory grew by {growth:,} bytes after the warm-up (limit {args.max_growth:,})")
    pinned = sum(1 for s in stack.registry.snapshots() if s.state in KEEP)
    if len(stack.registry) > REGISTRY_SIZE + pinned:
        fail(f"registry holds {len(stack.registry)} breakers, bound {REGISTRY_SIZE} + {pinned}")
    alive = _kinds_alive()
    if alive > CLASSIFIER_BOUND:
        fail(f"{alive} exception types made on the fly are still held, bound {CLASSIFIER_BOUND}")
    state = stack.bulkhead.state()
    if state.active or state.queued:
        fail(f"bulkhead slots leaked: {state.active} active, {state.queued} queued")
    if len(asyncio.all_tasks()) != 1:
        fail(f"tasks leaked: {len(asyncio.all_tasks()) - 1}")
    if threading.active_count() != threads:
        fail(f"threads leaked: {threading.active_count() - threads}")
    unexpected = {k: n for k, n in figures.calls.items() if k.startswith("UNEXPECTED")}
    if unexpected:
        fail(f"callers saw exceptions nobody injected: {unexpected}")
    if not figures.calls["ok"]:
        fail("no call succeeded")

    total = sum(figures.calls.values())
    retry_stats = [stack.call_async.statistics(), stack.call_sync.statistics()]
    heap = [b for _, b, _ in figures.samples]
    print(f"soak: {elapsed:.1f} s, {args.tasks} tasks + {args.threads} threads, seed {args.seed}")
    print(f"  calls:               {total:,} ({total / elapsed:,.0f}/s)")
    for outcome, n in sorted(figures.calls.items(), key=lambda kv: -kv[1]):
        print(f"    {outcome:<28} {n:>10,} ({n / max(total, 1):.1%})")
    print(f"  faults injected:     {stack.injected():,}")
    for injector in stack.injectors:
        s = injector.statistics()
        print(
            f"    {injector.name:<28} faults {s.faults:,}, latencies {s.latencies:,}, "
            f"behaviours {s.behaviours:,}"
        )
    print(
        f"  attempts / retries:  {sum(s.attempts for s in retry_stats):,} / "
        f"{sum(s.retries for s in retry_stats):,}"
    )
    print(f"  breakers held:       {len(stack.registry)} (bound {REGISTRY_SIZE} + {pinned} open)")
    print(
        f"  breakers opened:     {sum(s.opened for s in stack.registry.snapshots()):,} "
        "(among those still held)"
    )
    print(
        f"  on-the-fly types:    {alive:,} of {_made_so_far:,} made still held "
        f"(the classifier keeps at most {CLASSIFIER_BOUND:,})"
    )
    print(f"  warm-up ended at:    {'never' if warm is None else f'{warm:.1f} s'}")
    print(
        f"  heap after warm-up:  {after[0] / MiB if after else 0:.2f} MiB -> "
        f"{after[-1] / MiB if after else 0:.2f} MiB; growth {growth / 1024:,.0f} KiB "
        f"(limit {args.max_growth / 1024:,.0f} KiB)"
    )
    print(
        f"  heap min/max:        {min(heap) / MiB:.2f} / {max(heap) / MiB:.2f} MiB over "
        f"{len(heap)} samples; tracemalloc peak {tracemalloc.get_traced_memory()[1] / MiB:.2f} MiB"
    )
    print("  result:              " + ("FAILED" if figures.failures else "ok"))
    for problem in figures.failures:
        print(f"    - {problem}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (60)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before memory is judged (a quarter of the run, 5 to 60)",
    )
    parser.add_argument("--tasks", type=int, default=32, help="asyncio tasks (32)")
    parser.add_argument("--threads", type=int, default=2, help="threads (2)")
    parser.add_argument(
        "--names", type=int, default=100_000, help="distinct breaker names (100000)"
    )
    parser.add_argument("--sample", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="run on past --seconds, up to this long, until the steady state has enough samples"
        " (a busy machine warms up later); default: stop at --seconds",
    )
    parser.add_argument(
        "--max-growth", type=int, default=MiB, help="bytes allowed to grow after warm-up (1 MiB)"
    )
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument(
        "--leak",
        type=int,
        default=0,
        help="keep this many bytes per async call forever: a self-test of the memory check",
    )
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, max(args.seconds / 4, min(5.0, args.seconds / 2)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracemalloc.start()
    try:
        figures = asyncio.run(soak(args))
    finally:
        tracemalloc.stop()
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
