"""Turn pyperf JSON results into a markdown table with ratios to our library.

``python benchmarks/report.py results.json [...]`` prints, per group
(the benchmark name up to its last dash), each contender's median in ns, its
overhead above the ``bare`` (or ``handwritten``) baseline when there is one,
and its time as a multiple of ``datapunk``'s.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import pyperf


def main(paths: list[str]) -> None:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for path in paths:
        suite = pyperf.BenchmarkSuite.load(path)
        for bench in suite.get_benchmarks():
            group, _, who = bench.get_name().rpartition("-")
            groups[group][who] = bench.median() * 1e9
    for group, results in groups.items():
        base_name = next((b for b in ("bare", "handwritten") if b in results), None)
        ours = results.get("datapunk")
        print(f"\n### {group}\n")
        print("| library | median ns/call | above baseline | x datapunk |")
        print("|---|---:|---:|---:|")
        for who, ns in sorted(results.items(), key=lambda kv: kv[1]):
            above = f"{ns - results[base_name]:,.0f}" if base_name and who != base_name else "-"
            ratio = f"{ns / ours:.1f}x" if ours and who != base_name else "-"
            print(f"| {who} | {ns:,.0f} | {above} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
