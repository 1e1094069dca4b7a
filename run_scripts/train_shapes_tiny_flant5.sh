#!/usr/bin/env bash
# Rebuild the shipped `shapes_tiny_flant5` type (instructblip_free: InstructBLIP FlanT5 in
# miniature, one model for captions, VQA and dialogue) from scratch, offline, on CPU:
#   1. stage 1: tiny_flant5 from random weights on the three shapes tasks through instructions
#      (projects/free/shapes_stage1_flant5.yaml), the last epoch exported into the package;
#   2. FREE exits on its decoder layers 2, 5, 8 on the same three tasks
#      (projects/free/shapes_instruct_flant5.yaml, run_scripts/train_exits_shapes.sh, layout free);
#   3. calibration on the captions (val), reported on test: put the threshold in
#      lavis_free/models/configs/instructblip_free_shapes_tiny_flant5.yaml;
#   4. each task on test at full depth and at that threshold (sweep), into $REPORT.
#
#   bash run_scripts/train_shapes_tiny_flant5.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
export PYTHON HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TRAIN_THREADS="${TRAIN_THREADS:-$(nproc)}"
DATA="${DATA:-data/shapes}"
ASSETS=lavis_free/models/assets/shapes_tiny_flant5
STAMP="$(date +%Y%m%d%H%M%S)"
REPORT="${REPORT:-output/shapes_flant5_report/$STAMP}"
JOB="stage1_flant5_$STAMP"
mkdir -p "$ASSETS" output/shapes_stage1_flant5 "$REPORT"

echo "== 1/4 data: $DATA"
[[ -f "$DATA/meta.json" ]] || "$PYTHON" -m lavis_free.datasets.shapes --out "$DATA" --seed 0

echo "== 2/4 stage 1 on three tasks: output/shapes_stage1_flant5/$JOB"
t0=$(date +%s)
OMP_NUM_THREADS="$TRAIN_THREADS" "$PYTHON" train.py --cfg-path projects/free/shapes_stage1_flant5.yaml --job-id "$JOB" \
    --options "run.output_dir=output/shapes_stage1_flant5" > "output/shapes_stage1_flant5/$JOB.log" 2>&1 \
    || { tail -n 30 "output/shapes_stage1_flant5/$JOB.log" >&2; exit 1; }
echo "   $(( $(date +%s) - t0 )) s"
LAST="$(ls output/shapes_stage1_flant5/$JOB/checkpoint_*.pth | sort -t_ -k2 -n | tail -n 1)"
"$PYTHON" -m lavis_free.models.export --checkpoint "$LAST" --out "$ASSETS/instructblip_free_shapes_tiny_flant5.pth" \
    --model instructblip_free --model-type tiny_flant5

echo "== 3/4 FREE exits on the frozen T5 decoder (three tasks)"
CFG=projects/free/shapes_instruct_flant5.yaml LAYOUTS=free TRAIN_THREADS="$TRAIN_THREADS" \
    bash run_scripts/train_exits_shapes.sh "$ASSETS" "model.exits.inference.exit_threshold=null"

echo "== 4/4 calibration (captions, val -> test) and each task at full depth vs the threshold"
"$PYTHON" -m lavis_free.evaluation.calibrate --cfg-path projects/free/shapes_caption_flant5.yaml \
    --calib-split val --test-split test --tolerance 0.01 --no-progress \
    --thresholds 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.95 0.99 \
    --out "$REPORT/calibrate_caption" --options "model.exits.inference.exit_threshold=null"
THRESHOLD="$("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['selected']['recompute'])" "$REPORT/calibrate_caption/calibration.json" 2>/dev/null || true)"
echo "   calibrated threshold (recompute): ${THRESHOLD:-see $REPORT/calibrate_caption}"
for TASK in vqa dialogue; do
    "$PYTHON" -m lavis_free.evaluation.sweep --cfg-path "projects/free/shapes_${TASK}_flant5.yaml" --split test \
        --thresholds "${THRESHOLD:-0.5}" --policies recompute --no-progress --out "$REPORT/$TASK" \
        --options "model.exits.inference.exit_threshold=null"
done
echo "report: $REPORT"
