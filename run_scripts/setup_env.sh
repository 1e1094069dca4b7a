#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install lavis-free with its dev extra into it.
#
#   bash run_scripts/setup_env.sh          # venv in <repo>/.venv
#   VENV=/some/where bash run_scripts/setup_env.sh
#   PYTHON=python3.11 bash run_scripts/setup_env.sh
#
# torch is installed first, alone, so pip picks the CPU wheel where the index offers one; then the
# project is installed editable under constraints.txt (torch/torchvision pins, numpy<2), which keeps
# the resolver off CUDA builds of torch. The install is skipped when the venv already holds this
# exact setup.py + constraints.txt (a hash stamp in the venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.lavis_free_install_stamp"

seconds_since() { echo $(( $(date +%s) - $1 )); }

want="$(cat "$REPO/setup.py" "$REPO/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "setup_env: $VENV is up to date (delete $STAMP to force a reinstall)"
    exit 0
fi

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_env: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --progress-bar off "$@"; }

torch_pin="$(grep -E '^torch==' "$REPO/constraints.txt")"
t1=$(date +%s)
echo "setup_env: installing $torch_pin"
pip_install "$torch_pin"
echo "setup_env: torch installed in $(seconds_since "$t1") s"

t2=$(date +%s)
echo "setup_env: installing lavis-free (editable, dev extra) with constraints.txt"
pip_install -c "$REPO/constraints.txt" -e "$REPO[dev]"
echo "setup_env: project installed in $(seconds_since "$t2") s"

echo "$want" > "$STAMP"
echo "setup_env: done in $(seconds_since "$t0") s; python: $VENV/bin/python"
