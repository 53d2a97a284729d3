#!/usr/bin/env bash
# Mutation testing of the core with mutmut 3 (configured in pyproject.toml, [tool.mutmut]).
#
# Too slow for every CI run: run it on demand, before a release or after changing
# _core/backoff.py, _core/errors.py, the retry engine (_execution/engine.py,
# decision.py, attempts.py, pause.py), breaker/machine.py or breaker/breaker.py.
# Each module is run on its own so
# that a partial run still gives a score per module.
#
#   scripts/mutation.sh                 # every core module
#   scripts/mutation.sh _core.backoff _core.errors  # only these (dotted, below the package)
#   JOBS=2 NICE=15 scripts/mutation.sh  # parallel children / niceness (defaults 1 / 15)
#
# Mutants are written under mutants/ (git-ignored); `mutmut results` and
# `mutmut show <name>` read them afterwards.  docs/reliability.md publishes the
# scores and the survivors judged equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}  # the interpreter mutmut is installed in
if [[ -x .venv/bin/mutmut ]]; then MUTMUT=.venv/bin/mutmut; else MUTMUT=${MUTMUT:-mutmut}; fi
JOBS=${JOBS:-1}
NICE=${NICE:-15}
export HYPOTHESIS_PROFILE=ci  # derandomized: a mutant's verdict never depends on luck

modules=("$@")
engine=(_execution.engine _execution.decision _execution.attempts _execution.pause)
if [[ ${#modules[@]} -eq 0 ]]; then modules=(_core.backoff _core.errors "${engine[@]}" breaker.machine breaker.breaker); fi

for m in "${modules[@]}"; do
    echo "== datapunk_recovery.${m}"
    nice -n "$NICE" "$MUTMUT" run --max-children "$JOBS" "datapunk_recovery.${m}.*" || true
done

# One line per module: mutants, killed (timeouts and type-check catches count as
# killed, as mutmut counts them), survived (survivors, mutants no test reaches,
# suspicious ones), score.
"$PY" - "${modules[@]}" <<'PY'
import json
import pathlib
import sys

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
modules = sys.argv[1:]
totals = {m: [0, 0] for m in modules}
for meta in sorted(pathlib.Path("mutants").rglob("*.py.meta")):
    parts = meta.parts[meta.parts.index("datapunk_recovery") + 1 :]
    module = ".".join([*parts[:-1], parts[-1].removesuffix(".py.meta")])
    module = module.removesuffix(".__init__")  # a package's __init__.py is the package
    if module not in totals:
        continue
    for code in json.loads(meta.read_text())["exit_code_by_key"].values():
        status = status_by_exit_code[code]
        if status == "not checked":
            continue
        totals[module][0] += 1
        totals[module][1] += status in KILLED
all_n = sum(n for n, _ in totals.values())
all_k = sum(k for _, k in totals.values())
for m, (n, k) in [*totals.items(), ("all", (all_n, all_k))]:
    print(f"{m:18s} {n:5d} mutants {k:5d} killed {n - k:4d} left  {100 * k / max(n, 1):5.1f}%")
PY
