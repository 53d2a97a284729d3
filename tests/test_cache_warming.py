"""The hot-key sketch: independent rows, the same answer in every process, the stated bound."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datapunk_recovery.cache import HotKeySketch

ROOT = Path(__file__).resolve().parent.parent


def zipf_stream(rng: random.Random, keys: int, reads: int) -> list[str]:
    """``reads`` reads over ``keys`` keys, a few hot and a long cold tail (Zipf, s = 1)."""
    weights = [1.0 / (rank + 1) for rank in range(keys)]
    return [f"user:{k}" for k in rng.choices(range(keys), weights=weights, k=reads)]


@pytest.mark.parametrize("seed", range(8))
def test_estimates_stay_within_the_documented_bound(seed: int) -> None:
    width, depth = 256, 4
    sketch = HotKeySketch(width=width, depth=depth, top=10, decay_every=10**9, seed=seed)
    stream = zipf_stream(random.Random(seed), keys=1000, reads=10_000)
    for key in stream:
        sketch.record(key)
    truth = Counter(stream)
    allowed = math.e / width * len(stream)  # epsilon * N, epsilon = e / width
    over = [sketch.estimate(k) - n for k, n in truth.items()]
    assert min(over) >= 0  # never undercounts
    beyond = sum(1 for error in over if error > allowed)
    assert beyond <= math.exp(-depth) * len(truth)  # at most delta = e^-depth of the keys


@pytest.mark.parametrize("seed", range(8))
def test_the_heavy_keys_are_found_and_no_cold_key_passes_for_hot(seed: int) -> None:
    sketch = HotKeySketch(width=256, depth=4, top=5, decay_every=10_000, seed=seed)
    for i in range(4000):
        sketch.record(f"cold{i % 400}")
        if i % 4 == 0:
            sketch.record("hot-a")
        if i % 8 == 0:
            sketch.record("hot-b")
    assert sketch.hottest(2) == ["hot-a", "hot-b"]


def test_rows_use_independent_hashes() -> None:
    # Keys that share their slots in rows 0 and 1 must share the slot of row 2
    # no more often than chance (1 / width).  Rows derived from one hash
    # (h + i * h2) share it always: a cold key colliding with a hot one in
    # two rows would collide in every row and pass for hot.
    width = 16
    sketch = HotKeySketch(width=width, depth=3)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(3000):
        first, second, third = sketch._slots(f"k{i}")
        groups.setdefault((first, second), []).append(third)
    pairs = same = 0
    for thirds in groups.values():
        counts = Counter(thirds)
        n = len(thirds)
        pairs += n * (n - 1) // 2
        same += sum(c * (c - 1) // 2 for c in counts.values())
    assert pairs > 10_000
    assert same / pairs < 2 / width


SCRIPT = """
from datapunk_recovery.cache import HotKeySketch
sketch = HotKeySketch(width=256, depth=4, top=5)
for i in range(3000):
    sketch.record(f"cold{i % 400}")
    if i % 5 == 0:
        sketch.record("hot")
print(sketch.hottest(), [sketch.estimate(f"cold{i}") for i in range(50)])
"""


def test_every_process_agrees_whatever_its_hash_seed() -> None:
    outputs = set()
    for hash_seed in ("205", "1001"):  # seeds under which hash() made cold keys hot
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT / "src")}
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_the_seed_is_validated() -> None:
    with pytest.raises(TypeError, match=r"HotKeySketch\.seed"):
        HotKeySketch(seed="x")  # type: ignore[arg-type]


def test_the_hash_functions_are_pinned() -> None:
    # Processes of different versions sharing a warm list must agree too:
    # changing these values is a breaking change, to be written in CHANGELOG.md.
    assert HotKeySketch()._slots("user:42") == [1857, 2022, 1809, 1659]
    deep = HotKeySketch(width=256, depth=10, seed=7)  # two digests: rows 0-7 and 8-9
    assert deep._slots("é") == [177, 114, 243, 115, 71, 31, 39, 68, 152, 227]
