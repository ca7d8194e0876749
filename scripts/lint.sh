#!/usr/bin/env bash
# Lint and format checks, run by scripts/test.sh: ruff (rules and formatting, pyproject.toml) and
# clang-format (.clang-format) over the C++ and CUDA sources. Fails on the first finding.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check python tests benchmarks examples scripts
"$PY" -m ruff format --check python tests benchmarks examples scripts
mapfile -t cxx < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.cpp' 'examples/*.cpp')
clang-format --dry-run -Werror "${cxx[@]}"
echo "lint: ruff and clang-format clean (${#cxx[@]} C++/CUDA files)"
