#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: the quick rho allocation sweep
# (python -m torch_engram.experiment.sweep --preset quick), writing results/sweep/{results.csv,
# results.json,sweep.png} and the trained models (results/sweep/models/). Extra arguments go to the
# sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m torch_engram.experiment.sweep --preset quick "$@"
