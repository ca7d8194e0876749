#!/usr/bin/env bash
# Developer build without pip: configures ./build (GoogleTest on unless ENGRAM_BUILD_TESTS=0) and
# links the extension into python/torch_engram, so `PYTHONPATH=python pytest` and
# `ctest --test-dir build` use this tree. PYTHON picks the interpreter whose torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
py=$(command -v "${PYTHON:-python3}")
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build "${gen[@]}" -DENGRAM_PYTHON_EXECUTABLE="$py" -DENGRAM_BUILD_TESTS="${ENGRAM_BUILD_TESTS:-ON}" \
  -DENGRAM_CUDA="${ENGRAM_CUDA:-auto}" -DCMAKE_BUILD_TYPE="${ENGRAM_BUILD_TYPE:-Release}" >/dev/null
cmake --build build --parallel "${MAX_JOBS:-$(nproc)}"
so=$(ls build/_C*.so)
ln -sf "../../$so" "python/torch_engram/$(basename "$so")"
