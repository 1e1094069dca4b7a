#!/usr/bin/env bash
# Create (or reuse) a virtualenv of one supported stack and install lavis-free with its dev extra.
#
#   bash run_scripts/setup_env.sh                      # default stack, venv in <repo>/.venv
#   STACK=lavis-main bash run_scripts/setup_env.sh     # second stack, venv in <repo>/.venv-lavis-main
#   VENV=/some/where bash run_scripts/setup_env.sh
#   PYTHON=python3.11 bash run_scripts/setup_env.sh
#
# Stacks (README "Install"):
#   default     salesforce-lavis 1.0.2 + transformers 4.26.1 (what `pip install` gives): constraints.txt
#   lavis-main  salesforce-lavis 1.0.2 + transformers 4.33.2 (what LAVIS's GitHub main pins):
#               constraints-lavis-main.txt
#
# torch is installed first, alone, so pip picks the CPU wheel where the index offers one; then the
# project is installed editable under constraints.txt (torch/torchvision pins, numpy<2, the default
# stack's LAVIS and transformers), which keeps the resolver off CUDA builds of torch.
#
# lavis-main, and why it is installed this way: salesforce-lavis 1.0.2 declares
# transformers<4.27 (its code runs on 4.33.2: README "Install"), and pip has no way to override a
# dependency's declared requirement. Every single pip resolution that includes salesforce-lavis 1.0.2
# and transformers==4.33.2 is therefore ResolutionImpossible, even with salesforce-lavis already
# installed by `--no-deps` (the resolver reads the installed package's requirements again when it
# resolves lavis-free's). The ways round it were: (a) `--no-deps` for salesforce-lavis *and* the
# project, with both requirement lists repeated by hand; (b) a rewritten salesforce-lavis wheel, i.e.
# not the package on the index; (c) another installer with overrides (uv), which does not read
# pip's configuration. Chosen instead: install the default stack exactly as above (every
# requirement resolved by pip, nothing skipped), then `pip install -c constraints-lavis-main.txt`
# the packages whose pin differs between the two constraints files (transformers; its own new
# requirements, e.g. safetensors, are resolved normally). pip then reports the one known conflict,
# "salesforce-lavis 1.0.2 requires transformers<4.27,>=4.25.0", and this script checks with
# `pip check` that it is the only one. The price: a re-install into an existing lavis-main venv
# (setup.py or a constraints file changed) moves transformers down to 4.26.1 and back up (~10 s).
#
# The install is skipped when the venv already holds this exact stack, setup.py and constraints (a
# hash stamp in the venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${STACK:-default}"
case "$STACK" in
    default) default_venv="$REPO/.venv"; stack_constraints="$REPO/constraints.txt" ;;
    lavis-main) default_venv="$REPO/.venv-lavis-main"; stack_constraints="$REPO/constraints-lavis-main.txt" ;;
    *) echo "setup_env: STACK=$STACK is not a stack: use STACK=default or STACK=lavis-main" >&2; exit 2 ;;
esac
VENV="${VENV:-$default_venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.lavis_free_install_stamp"

seconds_since() { echo $(( $(date +%s) - $1 )); }
# requirement lines of a constraints file (comments and blank lines dropped), sorted
pins() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$1" | grep -v '^$' | LC_ALL=C sort -u; }

want="$( (echo "$STACK"; cat "$REPO/setup.py" "$REPO/constraints.txt" "$stack_constraints") | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "setup_env: $VENV ($STACK stack) is up to date (delete $STAMP to force a reinstall)"
    exit 0
fi

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_env: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
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

if [[ "$STACK" != default ]]; then
    mapfile -t moved < <(LC_ALL=C comm -13 <(pins "$REPO/constraints.txt") <(pins "$stack_constraints"))
    if [[ ${#moved[@]} -eq 0 ]]; then
        echo "setup_env: $stack_constraints pins nothing that constraints.txt does not: no $STACK stack to install" >&2
        exit 1
    fi
    t3=$(date +%s)
    echo "setup_env: $STACK stack: installing ${moved[*]} (pip reports salesforce-lavis 1.0.2's transformers<4.27 pin; see this script's header)"
    pip_install -c "$stack_constraints" "${moved[@]}"
    set +e
    conflicts="$("$VENV/bin/python" -m pip check 2>&1)"
    set -e
    unexpected="$(grep -v -E '^salesforce-lavis 1\.0\.2 has requirement transformers<4\.27,>=4\.25\.0, but you have transformers ' <<< "$conflicts" | grep -v '^No broken requirements found' || true)"
    if [[ -n "$unexpected" ]]; then
        echo "setup_env: pip check reports more than the known salesforce-lavis/transformers conflict:" >&2
        echo "$unexpected" >&2
        exit 1
    fi
    echo "setup_env: $STACK stack installed in $(seconds_since "$t3") s more; pip check: only the known conflict"
fi

echo "$want" > "$STAMP"
echo "setup_env: done in $(seconds_since "$t0") s; python: $VENV/bin/python"
