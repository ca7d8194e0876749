#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job on its built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m torch_engram "$@"
