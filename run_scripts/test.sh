#!/usr/bin/env bash
# Set up the venv if needed (run_scripts/setup_env.sh), then run the test suite offline.
#
#   bash run_scripts/test.sh                 # whole suite
#   bash run_scripts/test.sh tests/test_runner.py -x   # extra arguments go to pytest
#
# "No tests collected" (pytest exit code 5) counts as a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VENV="${VENV:-$REPO/.venv}"
cd "$REPO"

bash "$REPO/run_scripts/setup_env.sh"

t0=$(date +%s)
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
echo "test: pytest finished in $(( $(date +%s) - t0 )) s with exit code $rc"
if [[ $rc -eq 5 ]]; then
    echo "test: no tests were collected; treating that as a failure" >&2
    exit 1
fi
exit $rc
