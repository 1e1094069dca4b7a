#!/usr/bin/env bash
# Set up the venv of a stack if needed (run_scripts/setup_env.sh), then run the test suite offline.
#
#   bash run_scripts/test.sh                                # default stack (.venv), whole suite
#   bash run_scripts/test.sh tests/test_runner.py -x        # extra arguments go to pytest
#   STACK=lavis-main bash run_scripts/test.sh               # second stack (.venv-lavis-main)
#
# STACK (default | lavis-main) and VENV mean what they mean to setup_env.sh; VENV defaults to the
# stack's own venv. "No tests collected" (pytest exit code 5) counts as a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export STACK="${STACK:-default}"
case "$STACK" in
    default) export VENV="${VENV:-$REPO/.venv}" ;;
    lavis-main) export VENV="${VENV:-$REPO/.venv-lavis-main}" ;;
    *) echo "test: STACK=$STACK is not a stack: use STACK=default or STACK=lavis-main" >&2; exit 2 ;;
esac
cd "$REPO"

bash "$REPO/run_scripts/setup_env.sh"

t0=$(date +%s)
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
echo "test: $STACK stack: pytest finished in $(( $(date +%s) - t0 )) s with exit code $rc"
if [[ $rc -eq 5 ]]; then
    echo "test: no tests were collected; treating that as a failure" >&2
    exit 1
fi
exit $rc
