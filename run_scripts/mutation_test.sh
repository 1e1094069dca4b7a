#!/usr/bin/env bash
# Mutation testing of the method (lavis_free/exits/ and lavis_free/tasks/exit_training.py) with
# mutmut 3 (pinned below; installed into the venv when absent). Slow: not part of CI. See
# docs/mutation.md for what it measures, the scores and the surviving mutants.
#
#   bash run_scripts/mutation_test.sh                      # every mutant, the current test suite
#   bash run_scripts/mutation_test.sh --sample 150         # a seeded random sample (seed 0)
#   bash run_scripts/mutation_test.sh --sample 150 --before  # same sample, the suite before issue 13
#   bash run_scripts/mutation_test.sh --mutants FILE       # exactly the mutant names listed in FILE
#
# Options:
#   --sample N          test N mutants drawn with random.Random(SEED) from the sorted list of all
#                       mutant names (same source + same N + same seed = same mutants)
#   --seed S            seed of the sample (default 0)
#   --mutants FILE      test the mutant names in FILE (one a line, e.g. a previous run's
#                       sample.txt); overrides --sample
#   --before            leave out the five test files added by issue 13 (the "before" score)
#   --exclude-tests P   leave out the test files matching the glob P (repeatable)
#   --max-children N    mutmut workers (default 1: the project's machines have 2 shared cores)
#   --out DIR           results folder (default output/mutation/<UTC stamp>)
#
# It works on a snapshot: the tracked and untracked-not-ignored files of the working tree are
# copied into OUT/tree and mutmut runs there (mutants/ under it), so edits made meanwhile do not
# leak into a run and nothing is written in the checkout outside OUT.
# Results in OUT: results.json (status of every tested mutant, counts and score, overall and per
# file), survivors.md (the diff of each surviving / timed-out / suspicious mutant), sample.txt (the
# mutant names tested), mutmut.log (the run's output), tests.txt (the test files the suite had).
# Score = (killed + timeout) / (tested - skipped - not checked), as mutmut's own badge counts it: a
# "no tests" mutant (no selected test reaches its function) counts as not caught. results.json also
# gives score_of_reached, the same over the mutants that some test reaches.
set -euo pipefail

MUTMUT_VERSION=3.8.1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

SAMPLE="" SEED=0 MUTANTS_FILE="" MAX_CHILDREN=1 OUT=""
EXCLUDES=()
ISSUE13_TESTS=(tests/test_engine_oracles.py tests/test_exit_rule.py tests/test_free_losses.py
               tests/test_distributed_shards.py tests/test_calibration_selection.py)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sample) SAMPLE="$2"; shift 2 ;;
        --seed) SEED="$2"; shift 2 ;;
        --mutants) MUTANTS_FILE="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
        --before) EXCLUDES+=("${ISSUE13_TESTS[@]}"); shift ;;
        --exclude-tests) EXCLUDES+=("$2"); shift 2 ;;
        --max-children) MAX_CHILDREN="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "mutation_test: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

[[ -x "$PY" ]] || { echo "mutation_test: no venv at $VENV; run bash run_scripts/setup_env.sh first" >&2; exit 1; }
if [[ "$("$PY" -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null || true)" != "$MUTMUT_VERSION" ]]; then
    echo "== mutation: installing mutmut==$MUTMUT_VERSION into $VENV"
    "$PY" -m pip install -q "mutmut==$MUTMUT_VERSION"
fi

OUT="${OUT:-$REPO/output/mutation/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
TREE="$OUT/tree"
[[ ! -e "$TREE" ]] || { echo "mutation_test: $TREE exists; choose a new --out" >&2; exit 1; }

echo "== mutation: snapshot of the working tree -> $TREE"
mkdir -p "$TREE"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | (cd "$TREE" && tar -xf -)
for pattern in "${EXCLUDES[@]}"; do
    # shellcheck disable=SC2086
    (cd "$TREE" && for f in $pattern; do [[ -e "$f" ]] && { echo "   leaving out $f"; rm -f "$f"; }; done) || true
done
(cd "$TREE" && ls tests/test_*.py) > "$OUT/tests.txt"
(cd "$REPO" && { git rev-parse HEAD; git status --short; }) > "$OUT/git.txt" 2>/dev/null || true

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
export PATH="$VENV/bin:$PATH"
cd "$TREE"
# The editable install maps lavis_free to the checkout; mutmut puts tree/mutants first on sys.path
# in its own processes, so the tests it runs import the mutated copy (checked: the run stops if no
# test reaches a mutated function).

echo "== mutation: generating mutants"
"$PY" - "$OUT" "$SAMPLE" "$SEED" "$MUTANTS_FILE" <<'PYEOF'
import random, sys
from pathlib import Path
from mutmut.__main__ import create_mutants
from mutmut.mutation.data import SourceFileMutationData
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, walk_mutatable_files

out, sample, seed, mutants_file = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
Path("mutants").mkdir(exist_ok=True)
copy_src_dir()
copy_also_copy_files()
create_mutants(1)
names = []
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    names += list(data.exit_code_by_key)
names = sorted(names)
(out / "all_mutants.txt").write_text("\n".join(names) + "\n")
if mutants_file:
    wanted = [line.strip() for line in open(mutants_file) if line.strip()]
    missing = sorted(set(wanted) - set(names))
    if missing:
        sys.exit(f"mutation_test: {len(missing)} listed mutants do not exist in this source "
                 f"(it changed since the list was made), e.g. {missing[:3]}")
    chosen = wanted
elif sample:
    chosen = sorted(random.Random(seed).sample(names, min(int(sample), len(names))))
else:
    chosen = names
(out / "sample.txt").write_text("\n".join(chosen) + "\n")
print(f"   {len(names)} mutants in all; testing {len(chosen)}")
PYEOF

echo "== mutation: mutmut run (max children $MAX_CHILDREN): stats (whole selected suite once), clean run, then each mutant"
t0=$(date +%s)
set +e
if [[ -z "$SAMPLE" && -z "$MUTANTS_FILE" ]]; then
    mutmut run --max-children "$MAX_CHILDREN" 2>&1 | tee "$OUT/mutmut.log"
else
    xargs -a "$OUT/sample.txt" mutmut run --max-children "$MAX_CHILDREN" 2>&1 | tee "$OUT/mutmut.log"
fi
rc=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - t0 ))
echo "== mutation: mutmut finished in $elapsed s with exit code $rc"

"$PY" - "$OUT" "$elapsed" "$SAMPLE" "$SEED" "$MUTMUT_VERSION" <<'PYEOF'
import json, subprocess, sys
from collections import Counter, defaultdict
from pathlib import Path
from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

out, elapsed, sample, seed, version = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
chosen = [line for line in (out / "sample.txt").read_text().split("\n") if line]
status, file_of = {}, {}
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    for name, code in data.exit_code_by_key.items():
        status[name] = status_by_exit_code[code]
        file_of[name] = str(path)
tested = {name: status.get(name, "not checked") for name in chosen}

def summary(names):
    counts = Counter(tested[n] for n in names)
    caught = counts["killed"] + counts["timeout"]
    graded = len(names) - counts["skipped"] - counts["not checked"]
    reached = graded - counts["no tests"]
    return {"counts": dict(sorted(counts.items())), "total": len(names), "graded": graded,
            "score": round(caught / graded, 4) if graded else None,
            "score_of_reached": round(caught / reached, 4) if reached else None}

per_file = defaultdict(list)
for name in chosen:
    per_file[file_of.get(name, "?")].append(name)
result = {
    "tool": f"mutmut {version}", "elapsed_s": elapsed, "sample": int(sample) if sample else None,
    "seed": seed if sample else None, "mutants_in_source": len(status),
    "tests": (out / "tests.txt").read_text().split(),
    **summary(chosen),
    "per_file": {f: summary(names) for f, names in sorted(per_file.items())},
    "mutants": {name: {"file": file_of.get(name), "status": tested[name]} for name in chosen},
}
(out / "results.json").write_text(json.dumps(result, indent=1) + "\n")

lines = [f"# Surviving mutants ({result['tool']}, {len(chosen)} tested)", ""]
for f, names in sorted(per_file.items()):
    bad = [n for n in names if tested[n] not in ("killed", "no tests")]
    if not bad:
        continue
    lines += [f"## {f}", ""]
    for n in bad:
        diff = subprocess.run(["mutmut", "show", n], capture_output=True, text=True).stdout
        lines += [f"### {n}: {tested[n]}", "", "```diff", diff.strip(), "```", ""]
(out / "survivors.md").write_text("\n".join(lines) + "\n")

print(f"   score {result['score']} (killed + timeout over {result['graded']} graded; over those some test "
      f"reaches: {result['score_of_reached']}); {json.dumps(result['counts'])}")
for f, s in result["per_file"].items():
    print(f"   {f}: {s['score']}  {json.dumps(s['counts'])}")
PYEOF
echo "== mutation: results in $OUT (results.json, survivors.md)"
exit $rc
