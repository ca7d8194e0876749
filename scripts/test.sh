#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh, with GoogleTest) and runs every check: lint (ruff,
# clang-format), pytest, the GoogleTest suite through ctest, then builds and runs the LibTorch C++
# example against the installed library. Fails when any check or test fails or when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGRAM_BUILD_TESTS=1 bash scripts/setup.sh
PY=${PYTHON:-python3}
status=0
# A private inductor cache per run: inductor keys compiled graphs on the Dynamo graph, which names
# only the public ops, so a cache left by an older build of the extension (whose autograd kernels
# called other internal ops) would be reused and fail.
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
bash scripts/lint.sh || status=$?
"$PY" -m pytest -q -ra tests/python "$@" || status=$?
if [ "$status" = 5 ]; then echo "pytest collected no tests"; fi
ctest --test-dir build --output-on-failure --no-tests=error || status=$?
# The LibTorch C++ consumer: install the library and its CMake package, build examples/cpp
# against it with find_package(TorchEngram), run it.
{
  rm -rf build/install build/example
  cmake --install build --prefix build/install >/dev/null &&
    cmake -S examples/cpp -B build/example -DCMAKE_PREFIX_PATH="$PWD/build/install" >/dev/null &&
    cmake --build build/example >/dev/null &&
    build/example/engram_ops
} || { echo "examples/cpp: the C++ consumer failed"; status=1; }
exit "$status"
