"""The outage sweep behind the breaker's defaults (issue 17, item 1).

Goal: with the library's default policy, recovery (the first 1-s window with
at least 99% success after the dependency returns) within 2 s, and load
amplification at most 1.1x, for outages from 2 s to 5 min, 10 to 1,000
requests per second, 1 to 100 client processes (``simulate outage``).

The sweep varies the breaker (open duration, its growth and cap, the jitter
on the open period, half-open permits) and the budget, keeping the library's
default retries (3 attempts, full jitter, 100 ms base).  Every scenario runs
with a fixed seed (``--seeds`` to add more); each outage starts at 5 s and the
run lasts 15 s after it.  Writes ``docs/benchmarks/outage-defaults.json`` and
``docs/img/simulate-outage-sweep.png`` (``--grid``: the goal's full grid for the
default and the budgets tried for sparse clients, into
``docs/benchmarks/outage-grid.json``).  Run under ``nice -n 15``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from datapunk_recovery._core.backoff import RetryConfig  # noqa: E402
from datapunk_recovery.breaker import BreakerConfig  # noqa: E402
from datapunk_recovery.budget import RatioBudgetConfig, TokenBudgetConfig  # noqa: E402
from datapunk_recovery.simulate.outage import OutageSetup, simulate_outage  # noqa: E402
from datapunk_recovery.simulate.policies import SimPolicy  # noqa: E402

#: (requests per second, client processes): the corners and the middle of the goal's range.
LOADS = ((10.0, 1), (10.0, 100), (100.0, 10), (300.0, 30), (1000.0, 1), (1000.0, 100))
OUTAGES = (2.0, 5.0, 20.0, 60.0)
LONG = 300.0  # checked for the chosen defaults only (a run of 320 simulated s at 1,000 rps)
#: The goal's full grid (``--grid``): outages x requests per second x client processes.
GRID = ((2.0, 20.0, 300.0), (10.0, 100.0, 1000.0), (1, 10, 100))


def scenario(outage: float, rate: float, clients: int, seed: int) -> OutageSetup:
    return OutageSetup(
        rate=rate,
        clients=clients,
        duration=5.0 + outage + 15.0,
        outage_start=5.0,
        outage_duration=outage,
        seed=seed,
    )


def breaker(**kw: Any) -> BreakerConfig:
    kw.setdefault("max_open_duration", max(kw.get("open_duration", 30.0), 300.0))
    return BreakerConfig(**kw)


def policies() -> dict[str, SimPolicy]:
    retry = RetryConfig()
    token = TokenBudgetConfig()
    out: dict[str, SimPolicy] = {}
    # open duration, no growth, no jitter
    for d in (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0):
        out[f"open {d:g}s"] = SimPolicy(
            retry, token_budget=token, breaker=breaker(open_duration=d, max_open_duration=d)
        )
    # growth and cap
    for d, g, cap in ((0.5, 2.0, 2.0), (1.0, 1.5, 2.0), (1.0, 2.0, 2.0), (1.0, 2.0, 5.0)):
        out[f"open {d:g}s x{g:g} cap {cap:g}s"] = SimPolicy(
            retry,
            token_budget=token,
            breaker=breaker(open_duration=d, open_backoff=g, max_open_duration=cap),
        )
    # jitter on the open period
    for d, j in ((1.0, 0.2), (1.0, 0.5), (1.5, 0.2)):
        out[f"open {d:g}s jitter {j:g}"] = SimPolicy(
            retry,
            token_budget=token,
            breaker=breaker(open_duration=d, max_open_duration=d, open_jitter=j),
        )
    # half-open permits
    for p in (3, 10):
        out[f"open 1s permits {p}"] = SimPolicy(
            retry,
            token_budget=token,
            breaker=breaker(open_duration=1.0, max_open_duration=1.0, half_open_permits=p),
        )
    # budgets, with the breaker open 1 s, jitter 0.2
    b1 = breaker(open_duration=1.0, max_open_duration=1.0, open_jitter=0.2)
    for label, tb in (("token 10/0.5 (gRPC)", token), ("token 4/0.5", TokenBudgetConfig(4.0))):
        out[f"open 1s j0.2 + {label}"] = SimPolicy(retry, token_budget=tb, breaker=b1)
    for ratio, window, floor in ((0.1, 10.0, 0.0), (0.1, 2.0, 0.0), (0.1, 1.0, 0.0)):
        label = f"ratio {ratio:g}/{window:g}s floor {floor:g}"
        out[f"open 1s j0.2 + {label}"] = SimPolicy(
            retry,
            ratio_budget=RatioBudgetConfig(
                ratio=ratio, min_per_second=floor, window=window, buckets=10
            ),
            breaker=b1,
        )
    out["no budget, open 1s j0.2"] = SimPolicy(retry, breaker=b1)
    return out


def grid_policies() -> dict[str, SimPolicy]:
    """The default and the budgets that try to meet the goal for sparse clients too."""
    from datapunk_recovery._core.backoff import Jitter
    from datapunk_recovery.simulate.policies import DEFAULT_POLICY

    def with_(**kw: Any) -> SimPolicy:
        return dataclasses.replace(DEFAULT_POLICY, **kw)

    def late(delay: float) -> RetryConfig:
        return RetryConfig(max_attempts=2, base_delay=delay, jitter=Jitter.NONE)

    three = TokenBudgetConfig(max_tokens=3.0)
    return {
        "default (token budget 10)": DEFAULT_POLICY,
        "token budget 3 (one retry per process)": with_(token_budget=three),
        "ratio 10% / 10 s, floor 0.1/s": with_(
            token_budget=None, ratio_budget=RatioBudgetConfig(ratio=0.1, min_per_second=0.1)
        ),
        "ratio 10% / 10 s, no floor": with_(
            token_budget=None, ratio_budget=RatioBudgetConfig(ratio=0.1, min_per_second=0.0)
        ),
        "token budget 3, one retry after 2 s": with_(token_budget=three, retry=late(2.0)),
        "token budget 3, one retry after 10 s": with_(token_budget=three, retry=late(10.0)),
        "token budget 10 shared by every process": with_(shared_budget=True),
    }


def grid(seeds: list[int]) -> list[Any]:
    rows = []
    outages, rates, clients = GRID
    for name, pol in grid_policies().items():
        for outage in outages:
            for rate in rates:
                for count in clients:
                    for seed in seeds:
                        r = simulate_outage(name, pol, scenario(outage, rate, count, seed))
                        rows.append(
                            {
                                "policy": name,
                                "outage": outage,
                                "rate": rate,
                                "clients": count,
                                "seed": seed,
                                "recovery": r.recovery_time,
                                "amplification": r.amplification,
                                "offered_during": r.offered_during,
                            }
                        )
        print(name, flush=True)
    return rows


def blip(seeds: int = 20) -> dict[str, tuple[int, int]]:
    """Requests a 0.3-s blip fails, and how many of them retries save, per budget.

    10 requests/s over 100 processes (a rare caller each), the blip at 30 s,
    seeds 0 to ``seeds - 1``: what a budget costs a rare caller's isolated failure.
    """
    pols = grid_policies()
    chosen = {
        "default": pols["default (token budget 10)"],
        "ratio, no floor": pols["ratio 10% / 10 s, no floor"],
        "shared token": pols["token budget 10 shared by every process"],
    }
    out = {}
    for name, pol in chosen.items():
        offered = saved = 0
        for seed in range(seeds):
            setup = OutageSetup(
                rate=10.0,
                clients=100,
                duration=40.0,
                outage_start=30.0,
                outage_duration=0.3,
                seed=seed,
            )
            r = simulate_outage(name, pol, setup)
            offered += r.offered_during
            saved += round(r.success_during * r.offered_during)
        out[name] = (offered, saved)
    return out


def sweep(pols: dict[str, SimPolicy], outages: tuple[float, ...], seeds: list[int]) -> list[Any]:
    rows = []
    started = time.monotonic()
    for name, pol in pols.items():
        for outage in outages:
            for rate, clients in LOADS:
                for seed in seeds:
                    r = simulate_outage(name, pol, scenario(outage, rate, clients, seed))
                    rows.append(
                        {
                            "policy": name,
                            "outage": outage,
                            "rate": rate,
                            "clients": clients,
                            "seed": seed,
                            "recovery": r.recovery_time,
                            "amplification": r.amplification,
                            "success_after": r.success_after,
                        }
                    )
        print(f"{name:45s} {time.monotonic() - started:6.0f} s", flush=True)
    return rows


def summary(rows: list[Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        s = out.setdefault(row["policy"], {"worst_recovery": 0.0, "worst_amplification": 0.0})
        rec = math.inf if row["recovery"] is None else row["recovery"]
        s["worst_recovery"] = max(s["worst_recovery"], rec)
        s["worst_amplification"] = max(s["worst_amplification"], row["amplification"])
    return out


def plot(rows: list[Any], path: Path) -> None:
    """Worst recovery and amplification against the open duration, per outage length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def duration(policy: str) -> float | None:
        words = policy.split()
        if len(words) == 2 and words[0] == "open":
            return float(words[1][:-1])
        return None

    plain = [r for r in rows if duration(r["policy"]) is not None]
    durations = sorted({duration(r["policy"]) for r in plain})  # type: ignore[type-var]
    sparse = (10.0, 100)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for outage in OUTAGES:
        here = [r for r in plain if r["outage"] == outage]
        rec, dense, thin = [], [], []
        for d in durations:
            at = [r for r in here if duration(r["policy"]) == d]
            rec.append(max(40.0 if r["recovery"] is None else r["recovery"] for r in at))
            dense.append(max(r["amplification"] for r in at if (r["rate"], r["clients"]) != sparse))
            thin.append(max(r["amplification"] for r in at if (r["rate"], r["clients"]) == sparse))
        (line,) = a1.plot(durations, rec, "-o", ms=3, label=f"outage {outage:g} s")
        a2.plot(durations, dense, "-o", ms=3, color=line.get_color(), label=f"outage {outage:g} s")
        a2.plot(
            durations,
            thin,
            "--x",
            ms=4,
            color=line.get_color(),
            label=f"outage {outage:g} s, 10 rps over 100 processes",
        )
    a1.axhline(2.0, color="red", lw=0.8, ls="--", label="goal: 2 s")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("breaker open duration (s), no growth, no jitter")
    a1.set_ylabel("worst recovery over the loads (s; 40 = never)")
    a1.set_title("recovery against open duration")
    a1.legend(fontsize=7)
    a2.axhline(1.1, color="red", lw=0.8, ls="--", label="goal: 1.1x")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("breaker open duration (s)")
    a2.set_ylabel("worst load amplification during the outage")
    a2.set_title("amplification (token budget): dense loads and the sparse one")
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default=None, help="a policy name to run alone")
    parser.add_argument("--replot", action="store_true", help="redraw the plot from the JSON")
    parser.add_argument(
        "--final",
        action="store_true",
        help="check the library's default policy over every outage, 5 min included",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="the goal's grid (outages 2 s / 20 s / 5 min x 10 / 100 / 1,000 rps x 1 / 10 / "
        "100 processes) for the default and the budgets that try the sparse loads",
    )
    parser.add_argument(
        "--blip", action="store_true", help="a 0.3-s blip for rare callers, per budget"
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.blip:
        for name, (offered, saved) in blip().items():
            print(f"{name:20s} {saved} of {offered} failed requests saved")
        return
    if args.grid:
        rows = grid(seeds)
        path = ROOT / "docs" / "benchmarks" / "outage-grid.json"
        path.write_text(json.dumps({"seeds": seeds, "grid": GRID, "rows": rows}, indent=1))
        return
    if args.replot:
        saved = json.loads((ROOT / "docs" / "benchmarks" / "outage-defaults.json").read_text())
        plot(saved["rows"], ROOT / "docs" / "img" / "simulate-outage-sweep.png")
        return
    if args.final:
        from datapunk_recovery.simulate.policies import DEFAULT_POLICY

        rows = sweep({"default": DEFAULT_POLICY}, (*OUTAGES, LONG), seeds)
        final = {"seeds": seeds, "loads": LOADS, "outages": (*OUTAGES, LONG), "rows": rows}
        final["summary"] = summary(rows)
        path = ROOT / "docs" / "benchmarks" / "outage-defaults-final.json"
        path.write_text(json.dumps(final, indent=1))
        for row in rows:
            print(row)
        print(final["summary"])
        return
    pols = policies()
    if args.only:
        pols = {args.only: pols[args.only]}
    rows = sweep(pols, OUTAGES, seeds)
    out = {"seeds": seeds, "loads": LOADS, "outages": OUTAGES, "rows": rows}
    out["summary"] = summary(rows)
    (ROOT / "docs" / "benchmarks" / "outage-defaults.json").write_text(json.dumps(out, indent=1))
    plot(rows, ROOT / "docs" / "img" / "simulate-outage-sweep.png")
    for name, s in out["summary"].items():
        rec, amp = s["worst_recovery"], s["worst_amplification"]
        print(f"{name:45s} recovery <= {rec:6.2f} s  amp <= {amp:.2f}")


if __name__ == "__main__":
    main()
