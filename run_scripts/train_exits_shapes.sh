#!/usr/bin/env bash
# Train FREE exits and the paper's two baselines on a shipped shapes backbone (CFG; default the
# end-to-end `shapes_tiny`, CFG=projects/free/shapes_caption_frozen_lm.yaml the default backbone), export
# their inference checkpoints (exits only, no discriminators) and write the exit quality report:
#   1. generate the shapes data (seed 0) into $DATA (default data/shapes) unless it is there;
#   2. train.py with projects/free/shapes_caption.yaml once per layout: free, no_adversarial,
#      vanilla (each from the exits' `init`, not from the shipped exits);
#   3. export OUT_DIR/exits_<layout>.pth with exits_of(model).inference_checkpoint() (exits + their layout and backbone fingerprint);
#   4. python -m lavis_free.reports.exit_quality on the val split -> $REPORT
#      (default output/shapes_exits/report_<time>).
#
#   bash run_scripts/train_exits_shapes.sh OUT_DIR [extra train.py --options, e.g. run.max_epoch=1]
#
# `bash run_scripts/train_exits_shapes.sh lavis_free/models/assets/shapes_tiny` rebuilds the
# shipped exits. CFG (default projects/free/shapes_caption.yaml) and LAYOUTS (default
# "free no_adversarial vanilla"; the report needs all three) choose the project and layouts
# (run_scripts/train_shapes_tiny_t5.sh trains the T5 backbone's exits so). Uses $PYTHON, else $VENV/bin/python (VENV defaults to .venv). Training runs on
# $TRAIN_THREADS torch threads (default: every core; bench/threads.py measured 2 threads 1.55x
# faster than 1 on a quiet 2-core machine; use 1 on a machine other jobs are using), the report
# on $OMP_NUM_THREADS (default 1). The shipped exits were built with TRAIN_THREADS=1; float sums
# depend on the thread count, so a bit-for-bit rebuild needs that too.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash run_scripts/train_exits_shapes.sh OUT_DIR [train.py --options ...]" >&2
    exit 2
fi
OUT="$1"
shift

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    echo "train_exits_shapes: no python at $PYTHON; run run_scripts/setup_env.sh or set PYTHON" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TRAIN_THREADS="${TRAIN_THREADS:-$(nproc)}"

DATA="${DATA:-data/shapes}"
STAMP="$(date +%Y%m%d%H%M%S)"
REPORT="${REPORT:-output/shapes_exits/report_$STAMP}"
# A fresh feature cache per run (about 420 MB), shared by the three layouts (same backbone, same
# exit layers), in a temporary directory under $TMPDIR (default /tmp) removed when the script
# exits, however it exits: a cache left by an earlier run would give the first epoch features
# computed in other batches, equal only up to float rounding, and the exits would not be
# reproduced bit for bit.
CACHE="$(mktemp -d -t lavis_free_exit_features.XXXXXX)"
trap 'rm -rf "$CACHE"' EXIT
CFG="${CFG:-projects/free/shapes_caption.yaml}"
LAYOUTS="${LAYOUTS:-free no_adversarial vanilla}"
mkdir -p "$OUT" output/shapes_exits
echo "feature cache (removed at exit): $CACHE"

echo "== 1/4 data: $DATA"
if [[ ! -f "$DATA/meta.json" ]]; then
    "$PYTHON" -m lavis_free.datasets.shapes --out "$DATA" --seed 0
fi

for LAYOUT in $LAYOUTS; do
    JOB="${LAYOUT}_${STAMP}"
    RUN_DIR="output/shapes_exits/$JOB"
    echo "== 2/4 train $LAYOUT exits: $RUN_DIR (log: $RUN_DIR.log)"
    t0=$(date +%s)
    OMP_NUM_THREADS="$TRAIN_THREADS" "$PYTHON" train.py --cfg-path "$CFG" --job-id "$JOB" \
        --options "model.exits.layout=$LAYOUT" "model.exits_checkpoint=" "run.test_splits=[]" \
        "datasets.shapes_caption.build_info.storage=$DATA" "run.output_dir=output/shapes_exits" \
        "run.exit_feature_cache=$CACHE" "$@" > "$RUN_DIR.log" 2>&1 \
        || { tail -n 30 "$RUN_DIR.log" >&2; exit 1; }
    echo "   $(( $(date +%s) - t0 )) s; $(grep -h 'Train exits.*Total time' "$RUN_DIR.log" | tr '\n' ' ')"

    LAST="$(ls "$RUN_DIR"/checkpoint_[0-9]*.pth | sort -V | tail -n 1)"
    echo "== 3/4 export $LAST -> $OUT/exits_$LAYOUT.pth"
    "$PYTHON" - "$CFG" "$LAYOUT" "$LAST" "$OUT/exits_$LAYOUT.pth" "$@" <<'EOF'
import sys
from types import SimpleNamespace

import torch

import lavis_free  # noqa: F401
from lavis.common.registry import registry
from lavis_free.common.config import FreeConfig
from lavis_free.hosts import exits_of

cfg_path, layout, checkpoint, out = sys.argv[1:5]
config = FreeConfig(SimpleNamespace(cfg_path=cfg_path, options=[f"model.exits.layout={layout}", "model.exits_checkpoint=", *sys.argv[5:]]))
model = registry.get_model_class(config.model_cfg.arch).from_config(config.model_cfg)
model.load_checkpoint(checkpoint, origin="runner checkpoint of exit training")
torch.save(exits_of(model).inference_checkpoint(), out)
EOF
done

if [[ "$LAYOUTS" != "free no_adversarial vanilla" ]]; then
    echo "== 4/4 exit quality report: skipped (it compares all three layouts; LAYOUTS=$LAYOUTS)"
    exit 0
fi
echo "== 4/4 exit quality report (val): $REPORT"
"$PYTHON" -m lavis_free.reports.exit_quality --cfg-path "$CFG" --split val --out "$REPORT" \
    --free "$OUT/exits_free.pth" --no-adversarial "$OUT/exits_no_adversarial.pth" --vanilla "$OUT/exits_vanilla.pth" \
    --options "datasets.shapes_caption.build_info.storage=$DATA"
