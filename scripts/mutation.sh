#!/usr/bin/env bash
# Mutation testing of the core with mutmut 3 (configured in pyproject.toml, [tool.mutmut]).
#
# Too slow for every CI run: run it on demand, before a release or after changing
# backoff.py, errors.py, engine.py or breaker.py.  Each module is run on its own so
# that a partial run still gives a score per module.
#
#   scripts/mutation.sh                 # every core module
#   scripts/mutation.sh backoff errors  # only these
#   JOBS=2 NICE=15 scripts/mutation.sh  # parallel children / niceness (defaults 1 / 15)
#
# Mutants are written under mutants/ (git-ignored); `mutmut results` and
# `mutmut show <name>` read them afterwards.  docs/reliability.md publishes the
# scores and the survivors judged equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
if [[ -x .venv/bin/mutmut ]]; then MUTMUT=.venv/bin/mutmut; else MUTMUT=${MUTMUT:-mutmut}; fi
JOBS=${JOBS:-1}
NICE=${NICE:-15}
export HYPOTHESIS_PROFILE=ci  # derandomized: a mutant's verdict never depends on luck

modules=("$@")
if [[ ${#modules[@]} -eq 0 ]]; then modules=(backoff errors engine breaker); fi

for m in "${modules[@]}"; do
    echo "== datapunk_recovery/${m}.py"
    nice -n "$NICE" "$MUTMUT" run --max-children "$JOBS" "datapunk_recovery.${m}.*" || true
done

# One line per module: mutants, killed (or timed out), survived, score.
"$MUTMUT" export-cicd-stats >/dev/null 2>&1 || true
"$PY" - "${modules[@]}" <<'PY'
import json
import pathlib
import sys

modules = sys.argv[1:]
totals = {m: [0, 0] for m in modules}
for meta in pathlib.Path("mutants").rglob("*.meta"):
    data = json.loads(meta.read_text())
    for name, code in data.get("exit_code_by_key", {}).items():
        module = name.split(".")[1] if name.startswith("datapunk_recovery.") else None
        if module not in totals or code is None:
            continue
        totals[module][0] += 1
        # 0: the tests passed with the mutant in (survived); 33/34: no test / skipped.
        if code not in (0, 33, 34, 5):
            totals[module][1] += 1
all_n = sum(n for n, _ in totals.values())
all_k = sum(k for _, k in totals.values())
for m, (n, k) in totals.items():
    print(f"{m:10s} {n:5d} mutants {k:5d} killed {n - k:4d} survived  {100 * k / max(n, 1):5.1f}%")
print(f"{'all':10s} {all_n:5d} mutants {all_k:5d} killed {all_n - all_k:4d} survived  "
      f"{100 * all_k / max(all_n, 1):5.1f}%")
PY
