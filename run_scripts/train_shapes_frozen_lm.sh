#!/usr/bin/env bash
# Rebuild the embedded default `shapes_frozen_lm` (blip2_opt_free) from scratch, offline, on CPU,
# with BLIP-2's recipe in miniature:
#   1. the shapes data (seed 0) into $DATA unless it is there;
#   2. stage 0, two jobs side by side (one torch thread each, so both cores work):
#      a. the 12-layer OPT pretrained as a text LM on the shapes language (lavis_free.pretraining.text_lm),
#      b. the ViT pretrained to recognise scenes (lavis_free.pretraining.vision);
#      then the Q-Former taught to write the scene where the frozen LM reads it
#      (lavis_free.pretraining.qformer, BLIP-2's representation stage);
#      merged into the stage-1 `model.pretrained` file (lavis_free.pretraining.components);
#   3. stage 1: only the Q-Former (+ query tokens, ln_vision, projection) trains against the frozen
#      ViT and LM, on captions, VQA and dialogue (projects/free/shapes_stage1_frozen_lm.yaml);
#   4. export of the best checkpoint (val CIDEr) over the frozen components into the package;
#   5. FREE exits and the two baselines on the frozen backbone, and the exit quality report
#      (run_scripts/train_exits_shapes.sh with projects/free/shapes_caption_frozen_lm.yaml), then
#      the learned exit check fitted to the FREE exits (lavis_free.evaluation.fit_confidence);
#   6. calibration of the threshold on val captions (1% relative CIDEr), reported on test;
#   7. VQA (VQAv2 accuracy) and dialogue (answer accuracy) on test at full depth and at that
#      threshold (captions, CIDEr and per-attribute accuracy, are in step 6's report).
# Put the calibrated threshold printed at step 6 into
# lavis_free/models/configs/blip2_opt_free_shapes_frozen_lm.yaml (model.exits.inference).
#
#   bash run_scripts/train_shapes_frozen_lm.sh
#
# Settings (environment): DATA (default data/shapes), WORK (stage-0 files, default
# output/frozen_lm/<time>), TRAIN_THREADS (stage 1 and exits, default: every core), LM_ARGS,
# VISION_ARGS, QFORMER_ARGS and STAGE1_OPTIONS (extra arguments of each stage, e.g. "--epochs 1",
# "--steps 300", "run.max_epoch=1"), PRETRAINED (a merged stage-0 file from an earlier run: stage 0 is skipped).
# Progress: stage 0 logs in $WORK, stage 1 under output/shapes_stage1_frozen_lm.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    echo "train_shapes_frozen_lm: no python at $PYTHON; run run_scripts/setup_env.sh or set PYTHON" >&2
    exit 1
fi
export PYTHON HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TRAIN_THREADS="${TRAIN_THREADS:-$(nproc)}"
DATA="${DATA:-data/shapes}"
STAMP="$(date +%Y%m%d%H%M%S)"
WORK="${WORK:-output/frozen_lm/$STAMP}"
REPORT="$WORK/report"
STAGE1_CFG=projects/free/shapes_stage1_frozen_lm.yaml
CFG=projects/free/shapes_caption_frozen_lm.yaml
ASSETS=lavis_free/models/assets/shapes_frozen_lm
JOB="stage1_$STAMP"
read -r -a LM_EXTRA <<< "${LM_ARGS:-}"
read -r -a VISION_EXTRA <<< "${VISION_ARGS:-}"
read -r -a QFORMER_EXTRA <<< "${QFORMER_ARGS:-}"
read -r -a STAGE1_EXTRA <<< "${STAGE1_OPTIONS:-}"
DATA_OPTIONS=("datasets.shapes_caption.build_info.storage=$DATA" "datasets.shapes_vqa.build_info.storage=$DATA"
              "datasets.shapes_dialogue.build_info.storage=$DATA")
mkdir -p "$WORK" "$REPORT" "$ASSETS" output/shapes_stage1_frozen_lm
start=$(date +%s)
stage() { echo; echo "== frozen_lm [$(( $(date +%s) - start )) s] $*"; }

stage "1/7 data: $DATA"
"$PYTHON" -m lavis_free.datasets.shapes --out "$DATA" --seed 0   # always: the scenes and VisDial files need generator 1.3

if [[ -n "${PRETRAINED:-}" ]]; then
    stage "2/7 stage 0: skipped, PRETRAINED=$PRETRAINED"
else
stage "2/7 stage 0: text LM | ViT side by side, then the Q-Former (logs: $WORK/{lm,vision,qformer}.log)"
OMP_NUM_THREADS=1 "$PYTHON" -m lavis_free.pretraining.text_lm --cfg-path "$STAGE1_CFG" --out "$WORK/lm.pth" \
    --no-progress "${LM_EXTRA[@]}" > "$WORK/lm.log" 2>&1 &
LM_PID=$!
trap 'kill "$LM_PID" 2>/dev/null || true' EXIT
OMP_NUM_THREADS=1 "$PYTHON" -m lavis_free.pretraining.vision --cfg-path "$STAGE1_CFG" --out "$WORK/vision.pth" \
    "${VISION_EXTRA[@]}" > "$WORK/vision.log" 2>&1 || { tail -n 20 "$WORK/vision.log" >&2; exit 1; }
tail -n 1 "$WORK/vision.log"
wait "$LM_PID" || { tail -n 20 "$WORK/lm.log" >&2; exit 1; }
trap - EXIT
tail -n 1 "$WORK/lm.log"
"$PYTHON" -m lavis_free.pretraining.components --out "$WORK/vision_lm.pth" "$WORK/lm.pth" "$WORK/vision.pth"
OMP_NUM_THREADS="$TRAIN_THREADS" "$PYTHON" -m lavis_free.pretraining.qformer --cfg-path "$STAGE1_CFG" \
    --pretrained "$WORK/vision_lm.pth" --out "$WORK/qformer.pth" "${QFORMER_EXTRA[@]}" > "$WORK/qformer.log" 2>&1 \
    || { tail -n 20 "$WORK/qformer.log" >&2; exit 1; }
tail -n 1 "$WORK/qformer.log"
PRETRAINED="$WORK/pretrained.pth"
"$PYTHON" -m lavis_free.pretraining.components --out "$PRETRAINED" "$WORK/vision_lm.pth" "$WORK/qformer.pth"
fi

stage "3/7 stage 1: Q-Former against the frozen ViT and LM (log: output/shapes_stage1_frozen_lm/$JOB.log)"
OMP_NUM_THREADS="$TRAIN_THREADS" "$PYTHON" train.py --cfg-path "$STAGE1_CFG" --job-id "$JOB" \
    --options "model.pretrained=$PRETRAINED" "run.output_dir=output/shapes_stage1_frozen_lm" \
    "${DATA_OPTIONS[@]}" "${STAGE1_EXTRA[@]}" > "output/shapes_stage1_frozen_lm/$JOB.log" 2>&1 \
    || { tail -n 30 "output/shapes_stage1_frozen_lm/$JOB.log" >&2; exit 1; }
grep -h "val metrics" "output/shapes_stage1_frozen_lm/$JOB.log" | sed 's/.*val metrics: //' | cut -c1-200

stage "4/7 export: $ASSETS/blip2_opt_free_shapes_frozen_lm.pth"
"$PYTHON" -m lavis_free.models.export --checkpoint "output/shapes_stage1_frozen_lm/$JOB/checkpoint_best.pth" \
    --base "$PRETRAINED" --model-type shapes_frozen_lm --out "$ASSETS/blip2_opt_free_shapes_frozen_lm.pth"

stage "5/7 FREE exits and baselines on the frozen backbone, exit quality report"
CFG="$CFG" TRAIN_THREADS="$TRAIN_THREADS" REPORT="$REPORT/exit_quality" DATA="$DATA" \
    bash run_scripts/train_exits_shapes.sh "$ASSETS" "model.exits.inference.exit_threshold=null"
# the learned exit check (confidence: learned) fitted to the FREE exits, shipped in their file
"$PYTHON" -m lavis_free.evaluation.fit_confidence --cfg-path "$CFG" --max-samples 4000 --val-samples 500 --no-progress \
    --out "$REPORT/confidence" --options "model.exits_checkpoint=$ASSETS/exits_free.pth" "datasets.shapes_caption.build_info.storage=$DATA"
cp "$REPORT/confidence/exits_confidence.pth" "$ASSETS/exits_free.pth"

stage "6/7 calibration on val captions, early exit vs full depth on test"
"$PYTHON" -m lavis_free.evaluation.calibrate --cfg-path "$CFG" --calib-split val --test-split test --tolerance 0.01 \
    --no-progress --out "$REPORT/calibrate_caption" \
    --options "model.exits.inference.exit_threshold=null" "datasets.shapes_caption.build_info.storage=$DATA"
THRESHOLD="$("$PYTHON" -c "import json,sys; t=json.load(open(sys.argv[1]))['selected']['recompute']; print('' if t is None else t)" "$REPORT/calibrate_caption/calibration.json")"
echo "calibrated threshold (recompute): ${THRESHOLD:-none, exits off}"
if [[ -n "$THRESHOLD" ]]; then DEPTH="model.exits.inference.exit_threshold=$THRESHOLD"; else DEPTH="model.exits.inference.early_exit=False"; fi

stage "7/7 VQA and dialogue on test, full depth and at ${THRESHOLD:-full depth} (captions: step 6)"
for TASK in vqa dialogue; do
    "$PYTHON" evaluate.py --cfg-path "projects/free/shapes_${TASK}_frozen_lm.yaml" --job-id "${TASK}_$STAMP" \
        --options "$DEPTH" "datasets.shapes_${TASK}.build_info.storage=$DATA" \
        "run.output_dir=$REPORT/$TASK" > "$REPORT/$TASK.log" 2>&1 || { tail -n 30 "$REPORT/$TASK.log" >&2; exit 1; }
    grep -h '"test"' "$REPORT/$TASK/${TASK}_$STAMP/evaluate.txt" | cut -c1-400
done
echo
echo "frozen_lm: done in $(( $(date +%s) - start )) s; reports in $REPORT"
