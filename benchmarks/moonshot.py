"""The contention moonshot (issue 17, item 2): search for a backoff that beats both winners.

Goal: a delay sequence that does no more work (writes) than full jitter AND
finishes no later than decorrelated jitter, at every N of 10, 25, 50, 100 and
200 clients, in the AWS post's published model (``simulate contention``).

The references are the published ones: full jitter ``uniform(0, min(cap,
base * 2**k))`` for the k-th retry and decorrelated ``min(cap, uniform(base,
3 * previous))`` from base, base 5 ms, cap 2 s.  Full jitter in the published
numbering is exactly what a user gets from the library's default,
``RetryConfig(base_delay=0.010, max_delay=2.0).delays(rng)``, so a candidate is
a delay sequence whose first window is about 10 ms.

Every candidate is a plain delay iterator; the families tried:

- ``full``: full jitter with another growth factor;
- ``decor``: decorrelated with another multiplier or base;
- ``sawtooth``: Greenberg-Leiserson sawtooth windows with full jitter, phases
  falling back all the way (``keep=0``) or part of the way;
- ``peak``: windows grow for a while, then decay slowly, then grow higher;
- ``piece``: two growth rates (slow first, fast later), optionally a floor;
- ``dhyb``: decorrelated first, then full jitter under fast-growing windows;
- ``dreset``: decorrelated with a phase reset when it reaches a top that grows.

Each point is the mean of ``runs`` seeded runs; seeds are
``moonshot:{seed}:{N}:{run}`` for every candidate, so all are judged on the
same seeds.  Run with ``nice -n 15 python benchmarks/moonshot.py [--seeds 0,1]``;
it writes ``docs/benchmarks/moonshot.json`` and ``docs/img/simulate-moonshot.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from datapunk_recovery.simulate.contention import simulate_contention  # noqa: E402

BASE, CAP = 0.005, 2.0  # the post's base and cap
NS = (10, 25, 50, 100, 200)
RUNS = {10: 200, 25: 120, 50: 80, 100: 40, 200: 24}

Delays = Callable[[random.Random], Iterator[float]]


class Candidate:
    """A named delay sequence, shaped as the contention model wants a policy."""

    def __init__(self, name: str, family: str, fn: Delays) -> None:
        self.name, self.family, self.fn = name, family, fn

    def delays(self, rng: random.Random, *, endless: bool = True) -> Iterator[float]:
        return self.fn(rng)


def full(g: float = 2.0, w1: float = 2 * BASE) -> Candidate:
    def f(rng: random.Random) -> Iterator[float]:
        w = w1
        while True:
            yield rng.uniform(0.0, min(CAP, w))
            w *= g

    return Candidate(f"full g={g:g}", "full", f)


def decor(m: float = 3.0, b: float = BASE) -> Candidate:
    def f(rng: random.Random) -> Iterator[float]:
        p = b
        while True:
            p = min(CAP, rng.uniform(b, m * p))
            yield p

    return Candidate(f"decor m={m:g} b={b * 1000:g}ms", "decor", f)


def sawtooth(factor: float, keep: float = 0.0, w1: float = 2 * BASE) -> Candidate:
    # phase k: windows w1 * factor**j for j = k-1 down to ceil((k-1) * keep)
    def f(rng: random.Random) -> Iterator[float]:
        k = 1
        while True:
            top = k - 1
            for j in range(top, math.ceil(top * keep) - 1, -1):
                yield rng.uniform(0.0, min(CAP, w1 * factor**j))
            k += 1

    return Candidate(f"sawtooth x{factor:g} keep={keep:g}", "sawtooth", f)


def peak(grow: int, decay: float, g: float = 2.0, w1: float = 2 * BASE) -> Candidate:
    def f(rng: random.Random) -> Iterator[float]:
        top = grow
        while True:
            w = w1
            for _ in range(top):
                yield rng.uniform(0.0, min(CAP, w))
                w *= g
            w = min(CAP, w)
            while w > w1:
                w *= decay
                yield rng.uniform(0.0, w)
            top += 1

    return Candidate(f"peak grow={grow} decay={decay:g}", "peak", f)


def piece(g1: float, m: int, g2: float, floor: float = 0.0, w1: float = 2 * BASE) -> Candidate:
    def f(rng: random.Random) -> Iterator[float]:
        w = w1
        k = 0
        while True:
            c = min(CAP, w)
            yield rng.uniform(floor * c, c)
            w *= g1 if k < m else g2
            k += 1

    return Candidate(f"piece {g1:g}x{m} then {g2:g} floor={floor:g}", "piece", f)


def dhyb(switch: int, g: float, m: float = 3.0, b: float = BASE) -> Candidate:
    def f(rng: random.Random) -> Iterator[float]:
        p = b
        for _ in range(switch):
            p = min(CAP, rng.uniform(b, m * p))
            yield p
        w = min(CAP, 3 * p)
        while True:
            yield rng.uniform(0.0, w)
            w = min(CAP, w * g)

    return Candidate(f"dhyb switch={switch} g={g:g}", "dhyb", f)


def dreset(m: float, b: float, top: float, grow: float, back: float = 0.0) -> Candidate:
    def f(rng: random.Random) -> Iterator[float]:
        p, t = b, top
        while True:
            p = rng.uniform(b, m * p)
            if p >= t:
                p, t = max(b, back * t), t * grow
            yield min(CAP, p)

    name = f"dreset m={m:g} b={b * 1000:g}ms top={top:g} grow={grow:g} back={back:g}"
    return Candidate(name, "dreset", f)


def candidates() -> list[Candidate]:
    out = [full(g) for g in (1.5, 1.75, 2.5, 3.0)]
    out += [decor(m, b) for m, b in ((4.0, BASE), (5.0, BASE), (3.0, 0.0075), (4.0, 0.0075))]
    out += [sawtooth(f) for f in (2.0, 3.0, 4.0, 5.0)]
    out += [sawtooth(f, k) for f in (3.0, 4.0, 6.0) for k in (0.5, 0.67)]
    out += [peak(gr, d) for gr in (5, 7) for d in (0.5, 0.7)]
    out += [piece(g1, m, g2) for g1 in (1.5, 1.75) for m in (4, 6) for g2 in (2.5, 3.0)]
    out += [dhyb(s, g) for s in (3, 5) for g in (2.0, 3.0)]
    out += [
        dreset(*args)
        for args in (
            (3.0, 0.0075, 1.0, 1.5),
            (3.5, 0.0075, 0.7, 1.5),
            (4.0, 0.0075, 0.5, 2.0),
            (4.0, 0.005, 0.4, 2.0),
            (3.5, 0.005, 0.4, 2.0, 0.1),
            (3.0, 0.0065, 0.4, 2.5, 0.1),
            (3.5, 0.006, 0.3, 3.0, 0.1),
        )
    ]
    return out


def measure(c: Candidate, seed: int) -> dict[int, tuple[float, float]]:
    out = {}
    for n in NS:
        calls, times = [], []
        for run in range(RUNS[n]):
            w, t = simulate_contention(c, n, f"moonshot:{seed}:{n}:{run}")  # type: ignore[arg-type]
            calls.append(w)
            times.append(t)
        out[n] = (statistics.fmean(calls), statistics.fmean(times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.monotonic()
    refs = {"full": full(2.0), "decorrelated": decor(3.0)}
    results: dict[str, dict[str, object]] = {}
    for c in [*refs.values(), *candidates()]:
        per_seed = [measure(c, s) for s in seeds]
        points = {
            n: (
                statistics.fmean(p[n][0] for p in per_seed),
                statistics.fmean(p[n][1] for p in per_seed),
            )
            for n in NS
        }
        results[c.name] = {"family": c.family, "points": points}
        print(f"{c.name:45s} {time.monotonic() - started:6.0f} s", flush=True)
    f_pts = results[refs["full"].name]["points"]
    d_pts = results[refs["decorrelated"].name]["points"]
    table = []
    for name, r in results.items():
        pts = r["points"]
        assert isinstance(pts, dict)
        work = {n: pts[n][0] / f_pts[n][0] for n in NS}  # type: ignore[index]
        late = {n: pts[n][1] / d_pts[n][1] for n in NS}  # type: ignore[index]
        wins = [n for n in NS if work[n] <= 1.0 and late[n] <= 1.0]
        table.append(
            {
                "name": name,
                "family": r["family"],
                "work": work,
                "late": late,
                "worst_work": max(work.values()),
                "worst_late": max(late.values()),
                "wins_at": wins,
                "points": pts,
            }
        )
    front = [
        t["name"]
        for t in table
        if not any(
            o["worst_work"] <= t["worst_work"]
            and o["worst_late"] <= t["worst_late"]
            and (o["worst_work"], o["worst_late"]) != (t["worst_work"], t["worst_late"])
            for o in table
        )
    ]
    out = {"seeds": seeds, "runs": RUNS, "candidates": table, "pareto_front": front}
    (ROOT / "docs" / "benchmarks" / "moonshot.json").write_text(json.dumps(out, indent=1))
    plot(table, front, ROOT / "docs" / "img" / "simulate-moonshot.png")
    for t in sorted(table, key=lambda t: (t["worst_work"], t["worst_late"])):
        mark = "*" if t["name"] in front else " "
        per_n = " ".join(f"{n}:{t['work'][n]:.2f}/{t['late'][n]:.2f}" for n in NS)
        print(f"{mark} {t['name']:45s} {t['worst_work']:.3f} {t['worst_late']:.3f}  {per_n}")


def plot(table: list[dict[str, object]], front: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    families = sorted({str(t["family"]) for t in table})
    colours = dict(zip(families, plt.cm.tab10.colors, strict=False))  # type: ignore[attr-defined]
    for fam in families:
        rows = [t for t in table if t["family"] == fam]
        ax.scatter(
            [t["worst_work"] for t in rows],
            [t["worst_late"] for t in rows],
            label=fam,
            color=colours[fam],
            s=22,
        )
    pts = sorted((t["worst_work"], t["worst_late"]) for t in table if t["name"] in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1, label="Pareto front")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.fill_between([0.6, 1.0], 0.4, 1.0, color="green", alpha=0.08, label="the goal")
    ax.set_xlabel("worst over N of writes / full jitter's writes")
    ax.set_ylabel("worst over N of time / decorrelated's time")
    ax.set_title("every candidate, judged at its worst N")
    ax.legend(fontsize=8)
    for t in table:
        if t["name"] not in front:
            continue
        work, late = t["work"], t["late"]
        assert isinstance(work, dict) and isinstance(late, dict)
        ax2.plot([work[n] for n in NS], [late[n] for n in NS], "-o", ms=3, lw=0.8)
        ax2.annotate(str(t["name"]), (work[200], late[200]), fontsize=6)
    ax2.axvline(1.0, color="grey", lw=0.8)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.fill_between([0.6, 1.0], 0.4, 1.0, color="green", alpha=0.08)
    ax2.set_xlabel("writes / full jitter's (per N: 10 ... 200, last point labelled)")
    ax2.set_ylabel("time / decorrelated's")
    ax2.set_title("the Pareto front's candidates, N by N")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
