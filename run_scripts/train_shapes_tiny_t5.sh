#!/usr/bin/env bash
# Rebuild the shipped `shapes_tiny_t5` type (blip2_t5_free) from scratch, offline, on CPU:
#   1. stage 1: the tiny BLIP-2 FlanT5 from random weights on the shapes captions
#      (projects/free/shapes_stage1_t5.yaml), exported into the package, tested, with the
#      most-frequent-caption baseline (run_scripts/train_shapes_tiny.sh's steps);
#   2. FREE exits on its decoder layers 2, 5, 8 (projects/free/shapes_caption_t5.yaml), exported
#      into the package (run_scripts/train_exits_shapes.sh's steps, layout free);
#   3. calibration: the most aggressive threshold within 1% relative CIDEr of full depth on val,
#      reported on test beside the oracle exit; put it in
#      lavis_free/models/configs/blip2_t5_free_shapes_tiny_t5.yaml (exits.inference.exit_threshold).
#
#   bash run_scripts/train_shapes_tiny_t5.sh
#
# Uses $PYTHON, else $VENV/bin/python (VENV defaults to .venv). Threads as the two scripts it runs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
export PYTHON
ASSETS=lavis_free/models/assets/shapes_tiny_t5
STAMP="$(date +%Y%m%d%H%M%S)"

echo "=== stage 1: the T5 backbone"
CFG=projects/free/shapes_stage1_t5.yaml MODEL=blip2_t5_free OUTPUT_ROOT=output/shapes_stage1_t5 \
    WEIGHTS="$ASSETS/blip2_t5_free_shapes_tiny_t5.pth" JOB="stage1_t5_$STAMP" \
    bash run_scripts/train_shapes_tiny.sh

echo "=== FREE exits on the frozen T5 decoder"
# exits.inference.exit_threshold=null: the shipped YAML's calibrated threshold belongs to the
# shipped exits, not to the ones being trained
CFG=projects/free/shapes_caption_t5.yaml LAYOUTS=free \
    bash run_scripts/train_exits_shapes.sh "$ASSETS" "model.exits.inference.exit_threshold=null"

echo "=== calibration (val) and test"
"$PYTHON" -m lavis_free.evaluation.calibrate --cfg-path projects/free/shapes_caption_t5.yaml \
    --calib-split val --test-split test --tolerance 0.01 \
    --thresholds 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.95 0.99 \
    --out "output/shapes_calibrate_t5/$STAMP" --options "model.exits.inference.exit_threshold=null"
