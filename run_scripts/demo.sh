#!/usr/bin/env bash
# The main job: the whole FREE pipeline on the embedded default (shapes_frozen_lm + shapes data), on CPU.
#
#   bash run_scripts/demo.sh
#
#   1. environment: run_scripts/setup_env.sh (creates/reuses .venv);
#   2. data: the shapes dataset, seed 0 (python -m lavis_free.datasets.shapes);
#   3. exit training on the frozen shapes_frozen_lm: FREE and the paper's two baselines
#      (no_adversarial, vanilla), one train.py run each (projects/free/shapes_caption_frozen_lm.yaml);
#   4. calibration: threshold x KV-policy sweep on val, the most aggressive threshold within
#      1% relative CIDEr of full depth, then early exit vs full depth on test, and the oracle exit;
#   5. the same calibration for VQA (accuracy) and visual dialogue (VisDial MRR), with the FREE exits
#      of step 3 (projects/free/shapes_vqa_frozen_lm.yaml, shapes_visdial_frozen_lm.yaml; on the
#      first TASK_SAMPLES val samples, the dialogue on a shorter grid: it ranks 100 options per round);
#   6. the paper's table: captioning, VQA, dialogue ranking and dialogue answers on test, full depth
#      vs each task's calibrated threshold, speedups and time split (lavis_free.evaluation.task_table);
#   7. frontier: every method (FREE, no_adversarial, vanilla, static exits) against LAVIS's own
#      greedy generate, wall-clock and layer-count speedups (bench/frontier.py);
#   8. where tokens leave at the calibrated threshold, by kind of word (lavis_free.evaluation.exits_by_kind);
#   9. exit quality: per-layer accuracy / agreement of the three layouts (teacher-forced, val);
#  10. report: report.md + report.json + PNGs in $OUT; prints its path and a summary.
#
# Settings (environment): OUT (default output/demo/<timestamp>), DATA (default data/shapes),
# CFG (default projects/free/shapes_caption_frozen_lm.yaml; projects/free/shapes_caption.yaml runs
# the end-to-end `shapes_tiny` instead), TOLERANCE (default 0.01), VENV (default .venv),
# SKIP_SETUP=1 with PYTHON=/path/to/python to use an existing environment, TRAIN_THREADS (torch
# threads of exit training, default: every core) and OMP_NUM_THREADS (of decoding, default 1);
# measured by bench/threads.py: on a quiet 2-core machine 2 threads train 1.55x faster than 1,
# while batch-1 decoding of this tiny model is 0.88x as fast (see README, "Threads").
# For quick runs: SHAPES_ARGS (e.g. "--train 64 --val 16 --test 16"), TRAIN_OPTIONS (extra
# train.py --options, e.g. "run.max_epoch=1"), EVAL_ARGS (extra calibrate arguments, e.g.
# "--max-samples 8 --thresholds 0.5 0.9"), FRONTIER_ARGS (e.g. "--num-samples 8 --thresholds 0.5"),
# QUALITY_LIMIT (caption pairs scored in step 9), TASK_SAMPLES (val samples of step 5, default 300
# questions / 100 dialogue rounds), TASK_ARGS (extra task_table arguments, e.g. "--max-samples 8").
# Exit training caches the frozen backbone's features (about 420 MB on the default data) in a
# temporary directory under $TMPDIR (default /tmp), removed when the script exits, however it exits.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TRAIN_THREADS="${TRAIN_THREADS:-$(nproc)}"
export VENV="${VENV:-$REPO/.venv}"
OUT="${OUT:-output/demo/$(date +%Y%m%d%H%M%S)}"
DATA="${DATA:-data/shapes}"
CFG="${CFG:-projects/free/shapes_caption_frozen_lm.yaml}"
TOLERANCE="${TOLERANCE:-0.01}"
QUALITY_LIMIT="${QUALITY_LIMIT:-400}"
read -r -a SHAPES_EXTRA <<< "${SHAPES_ARGS:-}"
read -r -a TRAIN_EXTRA <<< "${TRAIN_OPTIONS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
read -r -a FRONTIER_EXTRA <<< "${FRONTIER_ARGS:-}"
read -r -a TASK_EXTRA <<< "${TASK_ARGS:-}"
TASK_SAMPLES="${TASK_SAMPLES:-}"

start=$(date +%s)
stage() { echo; echo "== demo [$(( $(date +%s) - start )) s] $*"; }

stage "1/10 environment"
if [[ "${SKIP_SETUP:-0}" == "1" ]]; then
    PY="${PYTHON:?SKIP_SETUP=1 needs PYTHON=/path/to/python}"
    echo "using $PY (setup skipped)"
else
    bash run_scripts/setup_env.sh
    PY="$VENV/bin/python"
fi
mkdir -p "$OUT"
LOGS="$OUT/logs"
mkdir -p "$LOGS"

stage "2/10 data: $DATA"
"$PY" -m lavis_free.datasets.shapes --out "$DATA" --seed 0 "${SHAPES_EXTRA[@]}"

FEATURE_CACHE="$(mktemp -d -t lavis_free_demo_features.XXXXXX)"
trap 'rm -rf "$FEATURE_CACHE"' EXIT
DATA_OPTION="datasets.shapes_caption.build_info.storage=$DATA"
declare -A CKPT
for LAYOUT in free no_adversarial vanilla; do
    stage "3/10 exit training, $LAYOUT: $CFG (log: $LOGS/train_$LAYOUT.log; feature cache, removed at exit: $FEATURE_CACHE)"
    # model.exits_checkpoint= : train from the exits' init, not from the exits shipped with the package;
    # run.test_splits=[] : step 4 evaluates on test (full depth and exits), so training need not
    OMP_NUM_THREADS="$TRAIN_THREADS" "$PY" train.py --cfg-path "$CFG" --job-id "exits_$LAYOUT" \
        --options "run.output_dir=$OUT/train" "$DATA_OPTION" "model.exits_checkpoint=" "run.test_splits=[]" \
        "model.exits.layout=$LAYOUT" "run.exit_feature_cache=$FEATURE_CACHE" "${TRAIN_EXTRA[@]}" \
        > "$LOGS/train_$LAYOUT.log" 2>&1 || { tail -n 30 "$LOGS/train_$LAYOUT.log" >&2; exit 1; }
    grep -E "Train exits.*Total time|Training time" "$LOGS/train_$LAYOUT.log" || true
    RUN_DIR="$OUT/train/exits_$LAYOUT"
    FOUND="$(ls "$RUN_DIR"/checkpoint_[0-9]*.pth 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -z "$FOUND" ]]; then
        echo "demo: training wrote no checkpoint under $RUN_DIR (see $LOGS/train_$LAYOUT.log)" >&2
        exit 1
    fi
    CKPT[$LAYOUT]="$(cd "$(dirname "$FOUND")" && pwd)/$(basename "$FOUND")"
    echo "trained $LAYOUT exits: ${CKPT[$LAYOUT]}"
done
EXIT_OPTIONS=("model.exits_checkpoint=${CKPT[free]}" "$DATA_OPTION")

stage "4/10 calibration on val (tolerance $TOLERANCE), early exit vs full depth on test"
"$PY" -m lavis_free.evaluation.calibrate --cfg-path "$CFG" \
    --options "${EXIT_OPTIONS[@]}" "run.caption_scorers=[bleu,cider]" "model.exits.inference.exit_threshold=null" \
    --calib-split val --test-split test --tolerance "$TOLERANCE" --no-progress \
    --out "$OUT/calibration" "${EVAL_EXTRA[@]}" 2>&1 | tee "$LOGS/calibrate.log"
THRESHOLD="$("$PY" -c "import json,sys; t=json.load(open(sys.argv[1]))['selected']['recompute']; print('' if t is None else t)" "$OUT/calibration/calibration.json")"
echo "calibrated threshold (recompute): ${THRESHOLD:-none, exits off}"
selected() { "$PY" -c "import json,sys; t=json.load(open(sys.argv[1]))['selected']['recompute']; print('off' if t is None else t)" "$1"; }

declare -A TASK_CFG=([vqa]=projects/free/shapes_vqa_frozen_lm.yaml [dialogue]=projects/free/shapes_visdial_frozen_lm.yaml)
declare -A TASK_DATASET=([vqa]=shapes_vqa [dialogue]=shapes_visdial)
declare -A TASK_GRID=([vqa]="" [dialogue]="--thresholds 0.0 0.2 0.4 0.6 0.8 0.9")
declare -A TASK_LIMIT=([vqa]="${TASK_SAMPLES:-300}" [dialogue]="${TASK_SAMPLES:-100}")
TASK_OPTIONS=("model.exits_checkpoint=${CKPT[free]}" "datasets.shapes_caption.build_info.storage=$DATA"
              "datasets.shapes_vqa.build_info.storage=$DATA" "datasets.shapes_visdial.build_info.storage=$DATA")
TASK_THRESHOLDS=(--threshold "captioning=$(selected "$OUT/calibration/calibration.json")")
TASK_REPORT=()
for TASK in vqa dialogue; do
    stage "5/10 calibration of $TASK on val (first ${TASK_LIMIT[$TASK]} samples), exits vs full depth on test: ${TASK_CFG[$TASK]}"
    read -r -a GRID <<< "${TASK_GRID[$TASK]}"
    "$PY" -m lavis_free.evaluation.calibrate --cfg-path "${TASK_CFG[$TASK]}" \
        --options "model.exits_checkpoint=${CKPT[free]}" "datasets.${TASK_DATASET[$TASK]}.build_info.storage=$DATA" \
        "model.exits.inference.exit_threshold=null" --calib-split val --test-split test --tolerance "$TOLERANCE" \
        --policies recompute --max-samples "${TASK_LIMIT[$TASK]}" "${GRID[@]}" --no-progress --out "$OUT/calibration_$TASK" \
        > "$LOGS/calibrate_$TASK.log" 2>&1 || { tail -n 20 "$LOGS/calibrate_$TASK.log" >&2; exit 1; }
    TASK_THRESHOLDS+=(--threshold "$TASK=$(selected "$OUT/calibration_$TASK/calibration.json")")
    TASK_REPORT+=(--task-calibration "$TASK=$OUT/calibration_$TASK/calibration.json")
    echo "calibrated threshold of $TASK: ${TASK_THRESHOLDS[-1]#*=}"
done

stage "6/10 every task on test: full depth vs calibrated exits (${TASK_THRESHOLDS[*]})"
"$PY" -m lavis_free.evaluation.task_table --split test --no-progress --out "$OUT/tasks" \
    --project "captioning=$CFG" --project "vqa=${TASK_CFG[vqa]}" --project "dialogue=${TASK_CFG[dialogue]}" \
    "${TASK_THRESHOLDS[@]}" --options "${TASK_OPTIONS[@]}" "run.caption_scorers=[bleu,cider]" "${TASK_EXTRA[@]}" \
    > "$LOGS/tasks.log" 2>&1 || { tail -n 20 "$LOGS/tasks.log" >&2; exit 1; }
grep "^|" "$LOGS/tasks.log"

stage "7/10 frontier: FREE, no_adversarial, vanilla and static exits against LAVIS greedy (test)"
"$PY" bench/frontier.py --cfg-path "$CFG" --data "$DATA" --free "${CKPT[free]}" \
    --no-adversarial "${CKPT[no_adversarial]}" --vanilla "${CKPT[vanilla]}" --out "$OUT/frontier" \
    "${FRONTIER_EXTRA[@]}" > "$LOGS/frontier.log" 2>&1 || { tail -n 20 "$LOGS/frontier.log" >&2; exit 1; }
grep "^|" "$LOGS/frontier.log"

stage "8/10 where tokens leave at ${THRESHOLD:-full depth}, by kind of word (test)"
if [[ -n "$THRESHOLD" ]]; then DEPTH=(--threshold "$THRESHOLD"); else DEPTH=(); EXIT_OPTIONS+=("model.exits.inference.early_exit=False"); fi
"$PY" -m lavis_free.evaluation.exits_by_kind --cfg-path "$CFG" --split test --out "$OUT/exits_by_kind" \
    "${DEPTH[@]}" --options "${EXIT_OPTIONS[@]}" 2>&1 | tee "$LOGS/exits_by_kind.log"

stage "9/10 exit quality of the trained exits (val)"
"$PY" -m lavis_free.reports.exit_quality --cfg-path "$CFG" --options "$DATA_OPTION" \
    --free "${CKPT[free]}" --no-adversarial "${CKPT[no_adversarial]}" --vanilla "${CKPT[vanilla]}" \
    --split val --limit "$QUALITY_LIMIT" --out "$OUT/exit_quality" > "$LOGS/exit_quality.log" 2>&1 \
    || { tail -n 20 "$LOGS/exit_quality.log" >&2; exit 1; }
grep -v "exit quality" "$LOGS/exit_quality.log" | tail -n 16

stage "10/10 report"
"$PY" -m lavis_free.evaluation.report --calibration "$OUT/calibration/calibration.json" \
    --exit-quality "$OUT/exit_quality/exit_quality.json" --frontier "$OUT/frontier/frontier.json" \
    --exits-by-kind "$OUT/exits_by_kind/exits_by_kind.json" --tasks "$OUT/tasks/tasks.json" "${TASK_REPORT[@]}" \
    --out "$OUT" --no-progress

echo
echo "demo: done in $(( $(date +%s) - start )) s; report: $(cd "$OUT" && pwd)/report.md"
