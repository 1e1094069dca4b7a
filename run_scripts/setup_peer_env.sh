#!/usr/bin/env bash
# Create (or reuse) .venv-peer: a recent Hugging Face transformers beside the project's own stack,
# for bench/peer_hf.py (HF greedy and HF's self-speculative early exit, `assistant_early_exit`).
#
#   bash run_scripts/setup_peer_env.sh
#   PEER_TRANSFORMERS=5.18.0 VENV=/some/where bash run_scripts/setup_peer_env.sh
#
# Why a second venv: the project's stack pins transformers 4.26 (salesforce-lavis 1.0.2), while
# `generate(assistant_early_exit=K)` first appears in transformers 4.47.0 (absent from 4.46.3).
# This venv holds no LAVIS and no lavis_free: only torch, transformers, safetensors, numpy.
#
# torch (CPU) is found in this order, the first that works wins:
#   1. a local CPU wheel (pip's find-links, e.g. /opt/wheels here, or its cache) with --no-index;
#   2. the PyTorch CPU index (https://download.pytorch.org/whl/cpu);
#   3. plain PyPI (the CUDA-enabled build: correct on CPU, but several GB of dependencies).
# On this project's machines (1) works (torch-2.13.0+cpu, the wheel .venv uses) and (2) does not
# resolve (no route to download.pytorch.org).
#
# Idempotent: skipped when the venv holds these exact pins (a stamp file); prints what it installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv-peer}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${PEER_TORCH:-2.13.0}"              # the project's torch pin (constraints.txt)
# 4.57.6, the last 4.x: `assistant_early_exit` runs on OPT there (4.47.0 to 4.57.6), while on 5.x
# (5.18.0, 5.24.0 checked) the early-exit draft of an OPT fails with an IndexError in its cache
# (bench/peer_hf.py's docstring says why); bench/peer_hf.py runs on both
TRANSFORMERS_VERSION="${PEER_TRANSFORMERS:-4.57.6}"
STAMP="$VENV/.peer_install_stamp"
want="torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION safetensors numpy"

report() {
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
print(f"setup_peer_env:   torch build: {'CPU only' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}")
for name in ("torch", "transformers", "safetensors", "numpy", "tokenizers", "huggingface-hub"):
    try:
        print(f"setup_peer_env:   {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"setup_peer_env:   {name}: not installed")
EOF
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "setup_peer_env: $VENV is up to date (delete $STAMP to force a reinstall); it holds:"
    report
    exit 0
fi

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_peer_env: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
pip_install() { "$VENV/bin/python" -m pip install --progress-bar off "$@"; }

cpu_index=https://download.pytorch.org/whl/cpu
if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup_peer_env: torch $TORCH_VERSION already installed"
elif pip_install --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    # the wheel alone from local files; its small dependencies come from the index below
    echo "setup_peer_env: torch $TORCH_VERSION from a local wheel (pip's find-links / cache)"
elif "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('$cpu_index/torch/', timeout=10)" 2>/dev/null; then
    echo "setup_peer_env: torch $TORCH_VERSION from the PyTorch CPU index"
    pip_install "torch==$TORCH_VERSION" --index-url "$cpu_index" --extra-index-url https://pypi.org/simple
else
    echo "setup_peer_env: no local wheel and $cpu_index unreachable: torch $TORCH_VERSION from PyPI (large download)"
    pip_install "torch==$TORCH_VERSION"
fi

# torch is pinned here so that transformers' resolution cannot move it to another build
echo "setup_peer_env: installing transformers==$TRANSFORMERS_VERSION, safetensors, numpy"
pip_install "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" safetensors numpy

"$VENV/bin/python" - <<'EOF'
from transformers import GenerationConfig
assert hasattr(GenerationConfig(), "assistant_early_exit"), "this transformers has no assistant_early_exit (needs >= 4.47.0)"
EOF
echo "$want" > "$STAMP"
echo "setup_peer_env: done in $(( $(date +%s) - t0 )) s; python: $VENV/bin/python; installed:"
report
