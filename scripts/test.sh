#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh, with GoogleTest) and runs every check: lint (ruff,
# clang-format), pytest, then the GoogleTest suite through ctest. Fails when any check or test
# fails or when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGRAM_BUILD_TESTS=1 bash scripts/setup.sh
PY=${PYTHON:-python3}
status=0
bash scripts/lint.sh || status=$?
"$PY" -m pytest -q -ra tests/python "$@" || status=$?
if [ "$status" = 5 ]; then echo "pytest collected no tests"; fi
ctest --test-dir build --output-on-failure --no-tests=error || status=$?
exit "$status"
